//! Lowerings for one runtime, run after the ToMe rewrites: they change how
//! the graph computes, never what.

use petgraph::stable_graph::NodeIndex;

use crate::graph::{Graph, FLOAT};
use crate::vit::matcher::VitBlock;
use crate::patch::{Emitter, Patch, Rewire};
use crate::vit::tome::{FUSED_MERGE_OP, OPS_DOMAIN, PROP_BIAS_OP};

/// A block's attention as one node, for tract with tome-compile's ops
/// registered: inputs q [B,H,N,D], kᵀ [B,H,D,N], v [B,H,N,Dv] and an
/// optional bias [B,1,1,N] or [B,N,1] (the same values in memory: the
/// proportional bias as `log(size)` leaves the merge) (float32); attribute
/// `scale` (float); output `softmax(scale·q·kᵀ + bias)·v`, [B,H,N,Dv].
pub const FUSED_ATTENTION_OP: &str = "FusedAttention";

/// A LayerNormalization over the last axis as one node, for tract with
/// tome-compile's ops registered: inputs x [.., C], scale [C] and an
/// optional bias [C] (float32); attribute `epsilon`; output
/// `(x - mean) / sqrt(var + epsilon) · scale + bias` over the last axis.
/// tract expands the standard op into a reduction, a subtraction and its
/// RmsNorm, three passes over the stream where this is one per row.
pub const FUSED_LAYER_NORM_OP: &str = "FusedLayerNorm";

/// `node` as a `FUSED_LAYER_NORM_OP` node when it is a float32
/// LayerNormalization over the last axis whose mean and inverse standard
/// deviation outputs nobody reads; `None` (unchanged) otherwise.
pub fn fuse_layer_norm(g: &Graph, id: NodeIndex) -> Option<Patch> {
    let node = g.node(id);
    let x_ty = g.ty(node.input(0)?)?;
    let rank = x_ty.rank() as i64;
    let last_axis = matches!(node.attr_int("axis").unwrap_or(-1), a if a == -1 || a == rank - 1);
    let vector = |t: &str| g.ty(t).is_some_and(|t| t.elem == FLOAT && t.rank() == 1);
    let inputs: Vec<&str> = node.proto.input.iter().map(String::as_str).filter(|i| !i.is_empty()).collect();
    let extra_outputs = node.proto.output.iter().skip(1).any(|o| !o.is_empty());
    if node.op() != "LayerNormalization" || !node.proto.domain.is_empty() || x_ty.elem != FLOAT || rank < 2 || !last_axis
        || extra_outputs || !(2..=3).contains(&inputs.len()) || !inputs[1..].iter().all(|t| vector(t))
    {
        return None;
    }
    let epsilon = node.attr("epsilon").map(|a| a.f).unwrap_or(1e-5);
    let mut patch = Patch::new(format!("{}: fused layer norm", node.name()), id);
    patch.removals.push(id);
    let epsilon = crate::pb::AttributeProto { name: "epsilon".into(), r#type: 1, f: epsilon, ..Default::default() };
    patch.nodes.push(crate::pb::NodeProto {
        name: format!("{}.tome.fused", node.name()),
        op_type: FUSED_LAYER_NORM_OP.into(),
        domain: OPS_DOMAIN.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![node.output().to_string()],
        attribute: vec![epsilon],
        ..Default::default()
    });
    Some(patch)
}

/// A `FUSED_MERGE_OP` node writing `log(size)` as its third output in place
/// of the `Log` that reads its sizes (the proportional bias of the next
/// block or of an attention pool); `None` (unchanged) where no `Log` reads
/// them or the node has that output already. OpenVINO runs a
/// `Log` on its reference path: 11 of them were 0.5-1.1% of ViT-S/16's
/// time at batch 1.
///
/// ```text
///  BipartiteMerge ─ x, size ─ Log ─ log_size   ⇒   BipartiteMerge ─ x, size, log_size
/// ```
pub fn merge_log_size(g: &Graph, id: NodeIndex) -> Option<Patch> {
    let node = g.node(id);
    if node.op() != FUSED_MERGE_OP || node.proto.domain != OPS_DOMAIN || node.proto.output.len() != 2 {
        return None;
    }
    let size = node.proto.output[1].as_str();
    // The sizes are float32 (the merge runs in float32), and so is their Log.
    let (log_id, _) = g.consumers(size).into_iter().find(|&(c, _)| g.node(c).op() == "Log" && g.node(c).proto.domain.is_empty())?;
    let logs = g.node(log_id).output();
    if g.is_output(logs) {
        return None;
    }
    let mut patch = Patch::new(format!("{}: log(size) from the merge", node.name()), id);
    patch.removals.extend([id, log_id]);
    let mut merge = node.proto.clone();
    let log_size = format!("{}.log_size", node.name());
    merge.output.push(log_size.clone());
    patch.nodes.push(merge);
    if let Some(ty) = g.ty(size) {
        patch.types.insert(log_size.clone(), ty.clone());
    }
    for (reader, slot) in g.consumers(logs) {
        patch.rewires.push(Rewire { node: reader, slot, tensor: log_size.clone() });
    }
    Some(patch)
}

/// Replaces a block's Q·Kᵀ, scale, proportional bias, Softmax and P·V by
/// one `FUSED_ATTENTION_OP` node writing the P·V output; `None` (the graph
/// unchanged) where the block's attention has another shape.
///
/// ```text
///  q ──┐
///  kᵀ ─ MatMul ─ [Mul|Div by a constant] ─ [ProportionalBias(bias)] ─ Softmax ─ [Cast to float]* ─┐
///                                                                                    v ─ MatMul ─ out
///    ⇒  q, kᵀ, v[, bias] ─ FusedAttention(scale) ─ out
/// ```
/// Seen in timm (classic and dynamo exporters, SDPA split scale), DeiT,
/// torchvision, CLIP-, DINOv2-style and Hugging Face ViT exports (eager ones
/// cast the probabilities to float). The opset-23 `Attention` op and float16
/// graphs keep their nodes.
pub fn fuse_attention(g: &Graph, block: &VitBlock) -> Option<Patch> {
    let softmax = g.node(block.attention);
    if softmax.op() != "Softmax" || !matches!(softmax.attr_int("axis").unwrap_or(-1), -1 | 3) {
        return None;
    }
    let mut chain = vec![block.attention];
    // Each node of the chain must feed only the next one.
    let mut id = sole_producer(g, softmax.input(0)?)?;
    let mut bias = None;
    if g.node(id).op() == PROP_BIAS_OP {
        let key_bias = g.node(id).input(1)?;
        bias = Some(match bias_row(g, key_bias) {
            Some((log_size, nodes)) => {
                chain.extend(nodes);
                log_size.to_string()
            }
            None => key_bias.to_string(),
        });
        chain.push(id);
        id = sole_producer(g, g.node(id).input(0)?)?;
    }
    let mut scale = 1.0;
    if let Some((logits, factor)) = scalar_scale(g, id) {
        scale = factor;
        chain.push(id);
        id = sole_producer(g, logits)?;
    }
    let qk = g.node(id);
    chain.push(id);
    let mut probs = softmax.output();
    let [(mut av_id, 0)] = g.consumers(probs)[..] else { return None };
    // Hugging Face eager exports cast the probabilities to the query's type,
    // twice: float to float, nothing to compute.
    while g.node(av_id).op() == "Cast" && g.node(av_id).attr_int("to") == Some(FLOAT as i64) && !g.is_output(probs) {
        chain.push(av_id);
        probs = g.node(av_id).output();
        let [(next, 0)] = g.consumers(probs)[..] else { return None };
        av_id = next;
    }
    let av = g.node(av_id);
    let (q, kt, v) = (qk.input(0)?, qk.input(1)?, av.input(1)?);
    let float4 = |t: &str| g.ty(t).is_some_and(|t| t.elem == FLOAT && t.rank() == 4);
    if qk.op() != "MatMul" || av.op() != "MatMul" || g.is_output(probs) || ![q, kt, v].into_iter().all(float4) {
        return None;
    }
    let mut patch = Patch::new(format!("{}: fused attention", block.name), av_id);
    patch.removals = chain;
    patch.removals.push(av_id);
    let mut e = Emitter::new(&mut patch, format!("{}.tome.attention", block.name), g.opset);
    let mut inputs = vec![q, kt, v];
    inputs.extend(bias.as_deref());
    let scale_attr = crate::pb::AttributeProto { name: "scale".into(), r#type: 1, f: scale, ..Default::default() };
    e.op(FUSED_ATTENTION_OP, "fused", &inputs, vec![scale_attr]);
    e.in_domain(OPS_DOMAIN);
    patch.nodes.last_mut()?.output = vec![av.output().to_string()];
    Some(patch)
}

/// tract's proportional bias as `tome::key_bias` writes it, `log(size)`
/// [B,N,1] made [B,1,1,N] by a MatMul with [1.0] and an Unsqueeze of axes
/// 1 and 2, read by nothing else: `log(size)`, which holds the same values
/// in memory, and those two nodes.
fn bias_row<'g>(g: &'g Graph, bias: &str) -> Option<(&'g str, [NodeIndex; 2])> {
    let unsqueeze_id = sole_producer(g, bias)?;
    let unsqueeze = g.node(unsqueeze_id);
    let axes = unsqueeze.input(1).and_then(|a| g.constant_i64(a)).or_else(|| unsqueeze.attr_ints("axes").map(<[i64]>::to_vec));
    let row_id = sole_producer(g, unsqueeze.input(0)?)?;
    let row = g.node(row_id);
    let one = row.input(1).and_then(|t| g.constant_f32(t));
    let fits = unsqueeze.op() == "Unsqueeze" && axes.as_deref() == Some(&[1, 2]) && row.op() == "MatMul" && one.as_deref() == Some(&[1.0]);
    fits.then_some((row.input(0)?, [unsqueeze_id, row_id]))
}

/// The node writing `tensor` when nothing else reads it and it is no graph
/// output.
fn sole_producer(g: &Graph, tensor: &str) -> Option<NodeIndex> {
    let id = g.producer(tensor)?;
    (g.consumers(tensor).len() == 1 && !g.is_output(tensor)).then_some(id)
}

/// `(logits, factor)` if `id` multiplies or divides the logits by a scalar
/// constant.
fn scalar_scale(g: &Graph, id: NodeIndex) -> Option<(&str, f32)> {
    let node = g.node(id);
    let scalar = |t: &str| match g.constant_f32(t).as_deref() {
        Some(&[c]) if c.is_finite() && c != 0.0 => Some(c),
        _ => None,
    };
    match (node.op(), node.input(0)?, node.input(1)?) {
        ("Mul", a, b) => scalar(b).map(|c| (a, c)).or_else(|| scalar(a).map(|c| (b, c))),
        ("Div", a, b) => scalar(b).map(|c| (a, 1.0 / c)),
        _ => None,
    }
}
