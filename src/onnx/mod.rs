//! ONNX files: reading and writing (external data included), validation of
//! what a user hands in, `.npz` tensors, and MAC counts.

pub mod io;
pub mod macs;
pub mod npz;
pub mod validate;
