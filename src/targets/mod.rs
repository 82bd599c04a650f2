//! Deployment targets: the compile entry points per target and format, and
//! the TensorRT rule checker with its op table.

pub mod check;
pub mod deploy;
pub mod tensorrt_rules;
