//! ONNX files: reading and writing (external data included), validation of
//! what a user hands in, `.npz` tensors, and MAC counts.

pub mod io;
pub mod macs;
pub mod npz;
pub mod validate;

/// `proto` as tract reads it: onnxruntime's contrib ops (the `Attention`
/// that `--target onnxruntime` writes, say) spelled out as the standard ops
/// they fuse (`tome_passes::contrib::unfuse`), on a copy; `proto` itself
/// where it has none.
pub fn tract_readable(proto: &tome_passes::pb::ModelProto) -> Result<std::borrow::Cow<'_, tome_passes::pb::ModelProto>, crate::Error> {
    let contrib = proto.graph.iter().flat_map(|g| &g.node).any(|n| n.domain == "com.microsoft");
    if !contrib {
        return Ok(std::borrow::Cow::Borrowed(proto));
    }
    let mut copy = proto.clone();
    tome_passes::contrib::unfuse(&mut copy)?;
    Ok(std::borrow::Cow::Owned(copy))
}
