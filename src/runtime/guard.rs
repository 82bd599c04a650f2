//! Turns panics (tract's, on odd graphs) into `Error::Panic`, without the
//! default hook printing them: the command line never shows a panic.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::Error;

thread_local! {
    /// Whether this thread is inside `catch_panics`; the hook stays quiet then.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// The last quiet panic's message and location, for the error.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Installs, once per process, a hook that records panics on threads inside
/// `catch_panics` and hands every other panic to the previous hook.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let message = payload_text(info.payload());
                let at = info.location().map(|l| format!(" at {}:{}", short_path(l.file()), l.line())).unwrap_or_default();
                CAUGHT.with(|c| *c.borrow_mut() = Some(format!("{message}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// A dependency's source path from its crate folder on
/// (`smallvec-1.16.6/src/lib.rs`), not the build machine's registry path.
fn short_path(file: &str) -> &str {
    match file.split_once("/registry/src/") {
        Some((_, rest)) => rest.split_once('/').map_or(rest, |(_, crate_path)| crate_path),
        None => file,
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "unknown panic".to_string(),
    }
}

/// Runs `f`; a panic inside becomes `Error::Panic` naming `during` (what was
/// being done, e.g. "analysing the model with tract").
pub fn catch_panics<T>(during: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    install_hook();
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.unwrap_or_else(|payload| {
        let message = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| payload_text(payload.as_ref()));
        Err(Error::Panic { during: during.to_string(), message: message.replace('\n', " ") })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_what_was_being_done() {
        let r: Result<(), Error> = catch_panics("testing", || panic!("boom"));
        let text = r.unwrap_err().to_string();
        assert!(text.contains("while testing") && text.contains("boom") && text.contains("guard.rs"), "{text}");
    }

    #[test]
    fn nested_guards_restore_the_outer_state() {
        let r: Result<(), Error> = catch_panics("outer", || {
            let inner: Result<(), Error> = catch_panics("inner", || panic!("first"));
            assert!(inner.is_err());
            panic!("second")
        });
        assert!(r.unwrap_err().to_string().contains("second"));
        assert!(!QUIET.with(Cell::get));
    }
}
