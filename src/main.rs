//! The `tome-compile` command; the command line itself is `tome_compile::cli`,
//! so that the Python package runs the same code.

fn main() -> std::process::ExitCode {
    tome_compile::cli::main(std::env::args_os())
}
