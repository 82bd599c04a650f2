//! OpenVINO's extension for `--target openvino-ops`: the op `BipartiteMerge`
//! (domain `ai.tome`, `TOME_SPEC.md`), a block's matching and size-weighted
//! merge in one node. OpenVINO runs the standard-op merge as about 40
//! small nodes per block at 5-10 µs each; this node reads each token once.
//!
//! ```python
//! core = openvino.Core()
//! core.add_extension("target/release/libtome_ov_ops.so")
//! ```
//!
//! The op's class is C++ (`cpp/extension.cpp`, built against OpenVINO's
//! headers by `build.rs`); it calls tome-kernels' merge through
//! `tome_bipartite_merge` below. Built without OpenVINO, the library has no
//! `create_extensions` and OpenVINO refuses to load it.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use tome_kernels::merge::{log_of, log_rows_of, Merge, Metric, Task};

#[cfg(openvino)]
extern "C" {
    fn tome_create_extensions(extensions: *mut c_void);
}

/// OpenVINO's entry point (`Core.add_extension`): fills its vector of
/// extensions with the op and its ONNX front-end mapping.
///
/// # Safety
/// OpenVINO calls it with its `std::vector<ov::Extension::Ptr>`.
#[cfg(openvino)]
#[no_mangle]
pub unsafe extern "C" fn create_extensions(extensions: *mut c_void) {
    tome_create_extensions(extensions)
}

/// A runtime's parallel for, as the C++ op hands it over: runs
/// `task(data, i)` for each i in 0..count and returns when all have run.
pub type ParallelFor = unsafe extern "C" fn(count: usize, task: unsafe extern "C" fn(*const c_void, usize), data: *const c_void);

/// The merge of a batch for the C++ op: `dims` is [batch, n, c, r, prefix,
/// heads, d, keys_transposed, log_size_rows] (keys [batch, heads, n, d], or [batch, heads,
/// d, n] when keys_transposed is 1; heads 0 for scores [batch, ⌈n/2⌉,
/// ⌊n/2⌋] in their place), `size` may be null (every token one patch).
/// The images run on `parallel` (OpenVINO's TBB threads). 0 on success, else 1 with a NUL-ended message in `error` (cut to
/// `error_len` bytes).
///
/// # Safety
/// x, keys and size hold the values their shapes say; `out_x` [batch,
/// n-r, c], `out_size` [batch, n-r] and `out_log_size` (the sizes' logs;
/// may be null) [batch, n-r] ([batch, n-r, n-r] when log_size_rows is 1) are writable; `parallel` runs each
/// task once and returns when all have run.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tome_bipartite_merge(
    x: *const f32,
    keys: *const f32,
    size: *const f32,
    dims: *const usize,
    parallel: ParallelFor,
    out_x: *mut f32,
    out_size: *mut f32,
    out_log_size: *mut f32,
    error: *mut c_char,
    error_len: usize,
) -> i32 {
    let [batch, n, c, r, prefix, heads, d, keys_transposed, log_size_rows] = *(dims as *const [usize; 9]);
    let slice = |p: *const f32, len: usize| if len == 0 { &[][..] } else { std::slice::from_raw_parts(p, len) };
    let merge = Merge {
        x: slice(x, batch * n * c),
        metric: match heads {
            0 => Metric::Scores(slice(keys, batch * n.div_ceil(2) * (n / 2))),
            _ => Metric::dense_keys(slice(keys, batch * heads * n * d), heads, n, d, keys_transposed == 1),
        },
        size: (!size.is_null()).then(|| slice(size, batch * n)),
        batch,
        n,
        c,
        r,
        prefix,
    };
    let result = merge.check_lengths().and_then(|()| {
        let out_n = n - r;
        let out_x = if out_n * c * batch == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(out_x, batch * out_n * c) };
        let out_size = if out_n * batch == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(out_size, batch * out_n) };
        let panicked = AtomicBool::new(false);
        let pool = |count: usize, task: &(dyn Fn(usize) + Sync)| {
            let job = Task { task, panicked: &panicked };
            parallel(count, run_task, &job as *const Task as *const c_void);
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| merge.run_on(&pool, out_x, out_size)));
        if outcome.is_err() || panicked.load(Ordering::Relaxed) {
            return Err("the kernel panicked".to_string());
        }
        if !out_log_size.is_null() && out_n * batch > 0 {
            match log_size_rows {
                1 => log_rows_of(out_size, out_n, std::slice::from_raw_parts_mut(out_log_size, batch * out_n * out_n)),
                _ => log_of(out_size, std::slice::from_raw_parts_mut(out_log_size, batch * out_n)),
            }
        }
        Ok(())
    });
    let Err(message) = result else { return 0 };
    if !error.is_null() && error_len > 0 {
        let len = message.len().min(error_len - 1);
        std::ptr::copy_nonoverlapping(message.as_ptr(), error as *mut u8, len);
        *error.add(len) = 0;
    }
    1
}

/// The kernel's task `job` (a `Task`), run for item `i`.
unsafe extern "C" fn run_task(job: *const c_void, i: usize) {
    (*(job as *const Task)).run(i)
}
