//! `tome_compile._native`: the command line, run in process. The Python
//! side (`python/tome_compile/`) turns keyword arguments into the same flags
//! the `tome-compile` command takes, so both give the same bytes. The module
//! is also onnxruntime's custom-op library (`plugins/onnxruntime`).

use pyo3::exceptions::PyException;
// onnxruntime's custom-op library lives in this module too: its entry point
// `RegisterCustomOps` is exported from here (`tome_compile.onnxruntime_ops()`).
use tome_ort_ops as _;
use pyo3::prelude::*;

pyo3::create_exception!(_native, TomeCompileError, PyException, "A failed tome-compile command: `.kind`, `.message` and `.exit_code` as its `--json` error.");

/// Runs `argv` (program name first) as the `tome-compile` command and
/// returns its exit code; what it prints goes to the process's stdout/stderr.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(|| tome_compile::cli::run_command_line(argv.into_iter().map(Into::into)))
}

/// Runs `argv` and returns its `--json` result as a JSON string, or raises
/// `TomeCompileError(kind, message, exit_code)`.
#[pyfunction]
fn execute(py: Python<'_>, argv: Vec<String>) -> PyResult<String> {
    match py.detach(|| tome_compile::cli::execute(argv.into_iter().map(Into::into))) {
        Ok(value) => Ok(value.to_string()),
        Err(f) => Err(TomeCompileError::new_err((f.kind.name(), f.message, f.kind.exit_code()))),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(execute, m)?)?;
    m.add("TomeCompileError", m.py().get_type::<TomeCompileError>())?;
    Ok(())
}
