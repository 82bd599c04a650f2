//! Lowerings for one runtime, run after the ToMe rewrites: they change how
//! the graph computes, never what.

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use crate::graph::{Dim, Graph, TensorType, FLOAT};
use crate::patch::int_attr;
use crate::values::Value;
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

/// A `FUSED_MERGE_OP` node writing `log(size)` spread over query rows
/// (attribute `log_size_rows`, [B,1,N,N]) where every reader of its
/// `log(size)` spreads it so for onnxruntime's `Attention` (`ort_attention`:
/// a Reshape to [B,1,1,N], then an Expand to [1,1,N,N] read by `Attention`
/// nodes as their `attention_bias`); `None` where anything else reads it
/// (an attention pool's bias, say). The two nodes go (`canon::remove_dead`);
/// onnxruntime ran them at 0.3 ms of ViT-S/16's 15 ms at batch 1.
///
/// ```text
///  BipartiteMerge ─ log_size ─ Reshape ─ Expand ─ Attention   ⇒   BipartiteMerge(log_size_rows=1) ─ log_size ─ Attention
/// ```
pub fn merge_bias_rows(g: &Graph, id: NodeIndex) -> Option<Patch> {
    let node = g.node(id);
    if node.op() != FUSED_MERGE_OP || node.proto.domain != OPS_DOMAIN || node.proto.output.len() != 3 || node.attr_int("log_size_rows").unwrap_or(0) != 0 {
        return None;
    }
    let log_size = node.proto.output[2].as_str();
    let size_ty = g.ty(&node.proto.output[1])?;
    let n = size_ty.dim(1)?;
    let readers_of = |t: &str| (!g.is_output(t)).then(|| g.consumers(t));
    let mut attentions = vec![];
    for (reshape, slot) in readers_of(log_size)? {
        let reshape = g.node(reshape);
        let spread = reshape.input(1).and_then(|t| g.constant_i64(t));
        if slot != 0 || reshape.op() != "Reshape" || spread.as_deref() != Some(&[0, 1, 1, -1]) {
            return None;
        }
        for (expand, slot) in readers_of(reshape.output())? {
            let expand = g.node(expand);
            let rows = expand.input(1).and_then(|t| g.constant_i64(t));
            if slot != 0 || expand.op() != "Expand" || rows.as_deref() != Some(&[1, 1, n, n]) {
                return None;
            }
            for (attention, slot) in readers_of(expand.output())? {
                let op = g.node(attention);
                if slot != 5 || op.op() != ORT_ATTENTION_OP || op.proto.domain != ORT_DOMAIN {
                    return None;
                }
                attentions.push(attention);
            }
        }
    }
    if attentions.is_empty() {
        return None;
    }
    let mut patch = Patch::new(format!("{}: log(size) spread over rows by the merge", node.name()), id);
    patch.removals.push(id);
    let mut merge = node.proto.clone();
    merge.attribute.push(int_attr("log_size_rows", 1));
    patch.nodes.push(merge);
    let shape = vec![size_ty.shape[0].clone(), Dim::Fixed(1), Dim::Fixed(n), Dim::Fixed(n)];
    patch.types.insert(log_size.to_string(), TensorType { elem: FLOAT, shape });
    patch.rewires.extend(attentions.into_iter().map(|node| Rewire { node, slot: 5, tensor: log_size.to_string() }));
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
    let constant = |t: &str| match g.constant_f32(t).as_deref() {
        Some(&[c]) => Some(c),
        _ => None,
    };
    if let Some((logits, factor)) = scalar_scale(g, id, &constant) {
        scale = factor;
        chain.push(id);
        id = sole_producer(g, logits)?;
    }
    let qk = g.node(id);
    chain.push(id);
    let (av_id, probs) = probabilities_reader(g, softmax.output(), &mut chain)?;
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
    let row_id = sole_producer(g, unsqueeze.input(0)?)?;
    let row = g.node(row_id);
    let one = row.input(1).and_then(|t| g.constant_f32(t));
    let fits = unsqueeze.op() == "Unsqueeze" && axes(g, unsqueeze).as_deref() == Some(&[1, 2]) && row.op() == "MatMul" && one.as_deref() == Some(&[1.0]);
    fits.then_some((row.input(0)?, [unsqueeze_id, row_id]))
}

/// The node writing `tensor` when nothing else reads it and it is no graph
/// output.
fn sole_producer(g: &Graph, tensor: &str) -> Option<NodeIndex> {
    let id = g.producer(tensor)?;
    (g.consumers(tensor).len() == 1 && !g.is_output(tensor)).then_some(id)
}

/// `(input, factor)` if `id` multiplies or divides its input by a scalar
/// that `scalar` knows, finite and not zero.
fn scalar_scale<'g>(g: &'g Graph, id: NodeIndex, scalar: &dyn Fn(&str) -> Option<f32>) -> Option<(&'g str, f32)> {
    let scalar = |t: &str| scalar(t).filter(|c| c.is_finite() && *c != 0.0);
    let node = g.node(id);
    match (node.op(), node.input(0)?, node.input(1)?) {
        ("Mul", a, b) => scalar(b).map(|c| (a, c)).or_else(|| scalar(a).map(|c| (b, c))),
        ("Div", a, b) => scalar(b).map(|c| (a, 1.0 / c)),
        _ => None,
    }
}

/// Q·Kᵀ scaled after its MatMul instead of q and kᵀ before it, for
/// OpenVINO (`--target openvino-ops`): its CPU plugin takes a scale after
/// the MatMul, and the Transpose making kᵀ, into its fused attention, but
/// leaves a Multiply and that Transpose per block outside it where they
/// come before (SDPA's split scale √s·√s in timm's exports, or q·s in
/// timm's classic ones). A scale already after the MatMul takes the
/// factors. `values` knows the scales computed from shapes (SDPA's).
/// Changes rounding only: (q·√s)·(kᵀ·√s) and (q·kᵀ)·s differ in the last
/// bits.
///
/// ```text
///  q ─ [Mul s₁] ─┐
///  kᵀ ─ [Mul s₂] ─ MatMul ─ [Mul|Div s₃] ─ logits   ⇒   q, kᵀ ─ MatMul ─ Mul(s₁·s₂·s₃) ─ logits
/// ```
/// `None` (unchanged) where nothing scales q or kᵀ, or the scores are not
/// float32.
pub fn scale_after_scores(g: &Graph, block: &VitBlock, values: &HashMap<String, Value>) -> Option<Patch> {
    let softmax = g.node(block.attention);
    if softmax.op() != "Softmax" {
        return None;
    }
    let scaled = |id: NodeIndex| scalar_scale(g, id, &|t: &str| known_scalar(g, values, t));
    let scores = scores_behind(g, softmax, &scaled)?;
    let (mut removals, mut factor, id) = (vec![], 1.0f64, scores.qk);
    // The new scale writes what the old one wrote, or Q·Kᵀ's output.
    let logits = match scores.scale {
        Some((scale, c)) => {
            removals.push(scale);
            factor *= c as f64;
            g.node(scale).output().to_string()
        }
        None => g.node(id).output().to_string(),
    };
    let qk = g.node(id);
    if qk.op() != "MatMul" || g.ty(qk.output()).is_none_or(|t| t.elem != FLOAT) {
        return None;
    }
    removals.push(id);
    let mut inputs = [qk.input(0)?, qk.input(1)?];
    let mut moved = false;
    for side in &mut inputs {
        if let Some((p, (unscaled, c))) = sole_producer(g, side).and_then(|p| Some((p, scaled(p)?))) {
            if g.ty(unscaled).is_some_and(|t| Some(t) == g.ty(side)) {
                removals.push(p);
                factor *= c as f64;
                *side = unscaled;
                moved = true;
            }
        }
    }
    if !moved {
        return None;
    }
    let mut patch = Patch::new(format!("{}: Q·Kᵀ scaled after its MatMul", block.name), id);
    patch.removals = removals;
    let mut e = Emitter::new(&mut patch, format!("{}.tome.scores", block.name), g.opset);
    let scores = e.op("MatMul", "qk", &inputs, vec![]);
    let scale = e.const_f32("scale", &[], &[factor as f32]);
    e.op("Mul", "scaled", &[&scores, &scale], vec![]);
    patch.nodes.last_mut()?.output = vec![logits];
    Some(patch)
}

/// A `FUSED_MERGE_OP` node reading k [B,H,N,D] (`keys_transposed` 0)
/// where it read kᵀ from the Transpose (or torch.export's Reshapes) that
/// makes it from k, so that Q·Kᵀ alone reads kᵀ and OpenVINO folds that
/// Transpose into the MatMul (`scale_after_scores`); `None` (unchanged)
/// otherwise.
pub fn merge_untransposed_keys(g: &Graph, id: NodeIndex) -> Option<Patch> {
    let node = g.node(id);
    if node.op() != FUSED_MERGE_OP || node.proto.domain != OPS_DOMAIN || node.attr_int("keys_transposed") != Some(1) {
        return None;
    }
    let kt = node.input(1)?;
    let kt_ty = g.ty(kt).filter(|t| t.rank() == 4)?;
    let k = key_source(g, g.producer(kt)?, kt_ty.dim(1)?, kt_ty.dim(2)?)?;
    let mut patch = Patch::new(format!("{}: keys read before their Transpose", node.name()), id);
    patch.removals.push(id);
    let mut merge = node.proto.clone();
    merge.input[1] = k.to_string();
    for a in merge.attribute.iter_mut().filter(|a| a.name == "keys_transposed") {
        a.i = 0;
    }
    patch.nodes.push(merge);
    Some(patch)
}

/// The nodes behind a Softmax's logits, each read by the next alone:
/// `Softmax ← [Add bias] ← [Mul|Div by a scalar] ← MatMul` (not checked to
/// be one).
struct Scores<'g> {
    /// The Add and its bias: any tensor the logits broadcast with.
    bias: Option<(NodeIndex, &'g str)>,
    /// The scale node and its factor (`scaled`).
    scale: Option<(NodeIndex, f32)>,
    qk: NodeIndex,
}

fn scores_behind<'g>(g: &'g Graph, softmax: &crate::graph::Node, scaled: &dyn Fn(NodeIndex) -> Option<(&'g str, f32)>) -> Option<Scores<'g>> {
    let mut id = sole_producer(g, softmax.input(0)?)?;
    let mut bias = None;
    if g.node(id).op() == "Add" {
        let add = g.node(id);
        // The logits come from Q·Kᵀ, scaled or not; the bias is the other side.
        let from_qk = |t: &str| g.producer(t).is_some_and(|p| g.node(p).op() == "MatMul" || scaled(p).is_some());
        let (logits, b) = [(add.input(0)?, add.input(1)?), (add.input(1)?, add.input(0)?)].into_iter().find(|(l, _)| from_qk(l))?;
        bias = Some((id, b));
        id = sole_producer(g, logits)?;
    }
    let mut scale = None;
    if let Some((logits, factor)) = scaled(id) {
        scale = Some((id, factor));
        id = sole_producer(g, logits)?;
    }
    Some(Scores { bias, scale, qk: id })
}

/// The value of a scalar `tensor`: a constant, or computed from shapes
/// (`values`).
fn known_scalar(g: &Graph, values: &HashMap<String, Value>, tensor: &str) -> Option<f32> {
    match (g.constant_f32(tensor).as_deref(), values.get(tensor).and_then(Value::known).as_deref()) {
        (Some(&[c]), _) => Some(c),
        (_, Some(&[c])) => Some(c as f32),
        _ => None,
    }
}

/// onnxruntime's fused attention (`com.microsoft` `Attention`), for
/// `--target onnxruntime` and `onnxruntime-ops`: x [B,N,C], the qkv
/// projection's weights [C,3C] and bias [3C], and `attention_bias`
/// [B,1,N,N]; outputs the attention [B,N,C] and `present` [2,B,H,N,D]
/// (k, then v), which the merge reads its keys from.
pub const ORT_ATTENTION_OP: &str = "Attention";
pub const ORT_DOMAIN: &str = "com.microsoft";

/// Replaces a block's qkv projection, Q·Kᵀ, scale, bias, Softmax, P·V and
/// the heads' concatenation by one `ORT_ATTENTION_OP` node; `None` (the
/// graph unchanged) where the block has another shape. `tokens` enter the
/// block. A `BipartiteMerge` reads its keys in the op's `present` (k
/// first; `keys_transposed` 0); other readers of k or kᵀ read k gathered
/// from it. What only the replaced nodes read is left for
/// `canon::remove_dead`.
///
/// ```text
///  x ─ MatMul(W) ─ Add(b) ─ Reshape [B,N,3,H,D] ─ Transpose [3,B,H,N,D] ─ q, k, v
///  q[·s] ─┐
///  kᵀ[·s] ─ MatMul ─ [·scale] ─ [+ bias] ─ Softmax ─ [Cast to float]* ─┐
///                                     v ─ MatMul ─ [Reshape] ─ Transpose ─ Reshape ─ out
///    ⇒  x, W, b[, Expand(bias)] ─ Attention(num_heads, scale) ─ out, present ─ BipartiteMerge (its keys)
/// ```
/// Seen in timm's exports (torchscript, and torch.export's, whose kᵀ goes
/// through [B·H,N,D] and whose merge reads the scaled kᵀ), and in
/// transformers' eager and SDPA ones (three projections; SDPA's split
/// scale, and its Reshape of P·V to its own shape): ViT, DeiT, DINOv2,
/// CLIP, SigLIP, VideoMAE, AST; and in torchvision's, which runs
/// sequence first (x moved to [N,B,C] before the projection, the heads
/// joined as [N,B,H,D]): there the output projection runs on the op's
/// output viewed as rows (`sequence_first_projection`), or, where it is
/// not torchvision's, the op's output moved to [N,B,C] stands in for the
/// joined heads. float16 graphs keep their nodes.
pub fn ort_attention(g: &Graph, block: &VitBlock, tokens: usize, values: &HashMap<String, Value>) -> Option<Patch> {
    let softmax = g.node(block.attention);
    if softmax.op() != "Softmax" || !matches!(softmax.attr_int("axis").unwrap_or(-1), -1 | 3) {
        return None;
    }
    // Scales are constants or computed from shapes (SDPA's √scale).
    let scaled = |id: NodeIndex| scalar_scale(g, id, &|t: &str| known_scalar(g, values, t));
    let mut chain = vec![block.attention];
    let scores = scores_behind(g, softmax, &scaled)?;
    let bias = scores.bias.map(|(add, bias)| {
        chain.push(add);
        bias
    });
    let mut scale = 1.0;
    if let Some((id, factor)) = scores.scale {
        scale *= factor;
        chain.push(id);
    }
    let id = scores.qk;
    let qk = g.node(id);
    chain.push(id);
    let (mut q, mut kt) = (qk.input(0)?, qk.input(1)?);
    // SDPA's split scale: q and kᵀ each times √scale. The merge may read
    // the scaled kᵀ too (torch.export's exports): `scaled_kt` keeps its
    // other readers and the factor.
    let mut scaled_kt = (vec![], 1.0);
    for (side, is_kt) in [(&mut q, false), (&mut kt, true)] {
        let Some((p, (unscaled, factor))) = g.producer(side).and_then(|p| Some((p, scaled(p)?))) else { continue };
        let others: Vec<_> = g.consumers(side).into_iter().filter(|&(c, _)| c != id).collect();
        if g.is_output(side) || (!others.is_empty() && !is_kt) {
            continue;
        }
        if is_kt {
            scaled_kt = (others, factor);
        }
        chain.push(p);
        scale *= factor;
        *side = unscaled;
    }
    let transpose_k = g.producer(kt)?;
    let (av_id, _) = probabilities_reader(g, softmax.output(), &mut chain)?;
    let av = g.node(av_id);
    let mut heads_out = sole_consumer(g, av.output())?;
    // transformers' SDPA exports reshape P·V to its own shape first.
    let same_shape = g.node(heads_out).op() == "Reshape" && g.ty(g.node(heads_out).output()).is_some_and(|t| Some(t) == g.ty(av.output()) && (1..4).all(|a| t.dim(a).is_some()));
    let reshaped = same_shape.then_some(heads_out);
    if let Some(id) = reshaped {
        heads_out = sole_consumer(g, g.node(id).output())?;
    }
    // The heads joined batch first ([B,N,H,D] viewed as [B,N,C]: the op's
    // output), or sequence first (torchvision's [N,B,H,D], which the op's
    // output moved to [N,B,C] stands in for).
    let sequence_first = transposed(g, heads_out, &[0, 2, 1, 3]).is_none();
    transposed(g, heads_out, if sequence_first { &[2, 0, 1, 3] } else { &[0, 2, 1, 3] })?;
    let out_id = if sequence_first { heads_out } else { sole_consumer(g, g.node(heads_out).output())? };
    let replaced: Vec<NodeIndex> = reshaped.into_iter().chain([out_id]).collect();
    // Shapes of the replaced tensors feed only the replaced Reshapes' shapes
    // (Hugging Face's exports); `canon::remove_dead` takes them after.
    let tensors = std::iter::once(av_id).chain(reshaped).chain([heads_out]).map(|id| g.node(id).output());
    let shapes: Vec<NodeIndex> = tensors.flat_map(|t| g.consumers(t)).map(|(c, _)| c).filter(|&c| g.node(c).op() == "Shape").collect();
    if !shapes.iter().all(|&s| feeds_only(g, s, &replaced)) {
        return None;
    }
    let out = g.node(out_id);
    let out_ok = sequence_first || (out.op() == "Reshape" && g.ty(out.output())?.rank() == 3);
    if qk.op() != "MatMul" || av.op() != "MatMul" || !out_ok {
        return None;
    }
    chain.extend(std::iter::once(av_id).chain(reshaped).chain([heads_out]));
    if !sequence_first {
        chain.push(out_id);
    }
    let (heads, dim) = (block.heads as i64, block.head_dim as i64);
    let qkv = qkv_projection(g, q, transpose_k, av.input(1)?, heads, dim)?;
    let x_ty = g.ty(qkv.x)?;
    if x_ty.elem != FLOAT || x_ty.rank() != 3 {
        return None;
    }
    let mut patch = Patch::new(format!("{}: onnxruntime attention", block.name), out_id);
    patch.removals = chain;
    let mut e = Emitter::new(&mut patch, format!("{}.tome.attention", block.name), g.opset);
    let (w, b) = match &qkv.weights {
        Weights::Packed(w, b) => (w.to_string(), b.map(str::to_string)),
        Weights::Split(w, b) => {
            let w = e.const_f32("qkv_weight", &[heads * dim, 3 * heads * dim], w);
            (w, Some(e.const_f32("qkv_bias", &[3 * heads * dim], b)))
        }
    };
    let mut inputs = vec![qkv.x, &w, b.as_deref().unwrap_or(""), "", "", ""];
    let expanded;
    if let Some(bias) = bias {
        let rows = e.const_i64("bias_rows", &[4], &[1, 1, tokens as i64, tokens as i64]);
        expanded = e.op("Expand", "bias", &[bias, &rows], vec![]);
        inputs[5] = &expanded;
    }
    while inputs.last() == Some(&"") {
        inputs.pop();
    }
    let attrs = vec![int_attr("num_heads", heads), crate::pb::AttributeProto { name: "scale".into(), r#type: 1, f: scale, ..Default::default() }];
    let present = e.name("present");
    let joined = if sequence_first { e.name("out") } else { out.output().to_string() };
    e.op_multi(ORT_ATTENTION_OP, "fused", &inputs, &[&joined, &present], attrs);
    e.in_domain(ORT_DOMAIN);
    patch.nodes.last_mut()?.output = vec![joined.clone(), present.clone()];
    if sequence_first {
        let mut e = Emitter::new(&mut patch, format!("{}.tome.attention", block.name), g.opset);
        if let Some(tail) = sequence_first_projection(g, out.output(), x_ty) {
            // The output projection on the op's [B,N,C] rows: no Transposes.
            let gemm = g.node(tail[1]);
            let rows_shape = e.const_i64("rows_shape", &[2], &[-1, heads * dim]);
            let rows = e.op("Reshape", "rows", &[&joined, &rows_shape], vec![]);
            let inputs: Vec<&str> = std::iter::once(rows.as_str()).chain(gemm.proto.input[1..].iter().map(String::as_str)).collect();
            let projected = e.op("Gemm", "out_proj", &inputs, gemm.proto.attribute.clone());
            let shape = e.op("Shape", "joined_shape", &[&joined], vec![]);
            e.op("Reshape", "batch_first", &[&projected, &shape], vec![]);
            patch.nodes.last_mut()?.output = vec![g.node(tail[3]).output().to_string()];
            patch.removals.extend(tail);
        } else {
            e.op("Transpose", "sequence_first", &[&joined], vec![crate::patch::ints_attr("perm", &[1, 0, 2])]);
            patch.nodes.last_mut()?.output = vec![out.output().to_string()];
            let x = g.ty(qkv.x)?;
            patch.types.insert(out.output().to_string(), TensorType { elem: FLOAT, shape: vec![x.shape[1].clone(), x.shape[0].clone(), x.shape[2].clone()] });
        }
    }
    // The merge reads its keys in `present` (k first, [2,B,H,N,D]); other
    // readers of k or kᵀ read k picked out of it.
    let is_merge = |(reader, slot): &(NodeIndex, usize)| {
        let n = g.node(*reader);
        *slot == 1 && n.op() == FUSED_MERGE_OP && n.proto.domain == OPS_DOMAIN
    };
    let key_readers = qkv.k.map(|k| g.consumers(k).into_iter().filter(|&(c, _)| c != transpose_k).collect::<Vec<_>>()).unwrap_or_default();
    let kt_readers: Vec<_> = g.consumers(kt).into_iter().filter(|(c, _)| !patch.removals.contains(c)).collect();
    let (merges, key_readers): (Vec<_>, Vec<_>) = key_readers.into_iter().partition(is_merge);
    let (kt_merges, kt_readers): (Vec<_>, Vec<_>) = kt_readers.into_iter().partition(is_merge);
    let (scaled_merges, scaled_readers): (Vec<_>, Vec<_>) = scaled_kt.0.into_iter().partition(is_merge);
    if let Some(q) = g.ty(q) {
        let shape = std::iter::once(Dim::Fixed(2)).chain(q.shape.iter().cloned()).collect();
        patch.types.insert(present.clone(), TensorType { elem: FLOAT, shape });
    }
    for (reader, slot) in merges.into_iter().chain(kt_merges).chain(scaled_merges) {
        let mut merge = g.node(reader).proto.clone();
        merge.input[slot] = present.clone();
        merge.attribute.iter_mut().filter(|a| a.name == "keys_transposed").for_each(|a| a.i = 0);
        patch.removals.push(reader);
        patch.nodes.push(merge);
    }
    if key_readers.is_empty() && kt_readers.is_empty() && scaled_readers.is_empty() {
        return Some(patch);
    }
    let mut e = Emitter::new(&mut patch, format!("{}.tome.attention", block.name), g.opset);
    let zero = e.const_i64("k_index", &[], &[0]);
    let keys = e.op("Gather", "k", &[&present, &zero], vec![int_attr("axis", 0)]);
    let transposes = !kt_readers.is_empty() || !scaled_readers.is_empty();
    let keys_t = transposes.then(|| e.op("Transpose", "kt", &[&keys], vec![crate::patch::ints_attr("perm", &[0, 1, 3, 2])]));
    let scaled_keys_t = match (&keys_t, scaled_readers.is_empty()) {
        (Some(keys_t), false) => {
            let factor = e.const_f32("kt_scale", &[], &[scaled_kt.1]);
            Some(e.op("Mul", "kt_scaled", &[keys_t, &factor], vec![]))
        }
        _ => None,
    };
    if let Some(ty) = g.ty(q) {
        patch.types.insert(keys.clone(), ty.clone());
    }
    let rewire = |readers: Vec<(NodeIndex, usize)>, tensor: &Option<String>| -> Vec<Rewire> {
        tensor.iter().flat_map(|t| readers.iter().map(|&(node, slot)| Rewire { node, slot, tensor: t.clone() })).collect()
    };
    patch.rewires.extend(rewire(key_readers, &Some(keys.clone())));
    patch.rewires.extend(rewire(kt_readers, &keys_t));
    patch.rewires.extend(rewire(scaled_readers, &scaled_keys_t));
    Some(patch)
}

/// A block's qkv projection as onnxruntime's `Attention` takes it.
struct QkvProjection<'g> {
    x: &'g str,
    weights: Weights<'g>,
    /// k [B,H,N,D] as the graph had it, where it had one.
    k: Option<&'g str>,
}

enum Weights<'g> {
    /// One projection's weights [C,3C] and bias [3C] (timm).
    Packed(&'g str, Option<&'g str>),
    /// Three projections' weights and biases, concatenated (Hugging Face).
    Split(Vec<f32>, Vec<f32>),
}

/// Where q [B,H,N,D], kᵀ [B,H,D,N] (written by `transpose_k`) and v
/// [B,H,N,D] come from: one projection of x split into heads, as timm's
/// `qkv` (picks 0, 1, 2 of [3,B,H,N,D]), or three of the same x, as
/// Hugging Face's `query`, `key` and `value` (each [B,N,H,D] moved to
/// [B,H,N,D]; kᵀ to [B,H,D,N]), whose weights are inline.
fn qkv_projection<'g>(g: &'g Graph, q: &'g str, transpose_k: NodeIndex, v: &'g str, heads: i64, dim: i64) -> Option<QkvProjection<'g>> {
    let width = heads * dim;
    if let Some(k) = key_source(g, transpose_k, heads, dim) {
        return one_projection(g, [q, k, v], heads, dim);
    }
    // [B,N,C] ─ Reshape [B,N,H,D] ─ Transpose(perm), the projection before.
    let heads_of = |t: &'g str, perm: &[i64]| {
        let moved = transposed(g, g.producer(t)?, perm)?;
        let reshape = g.producer_node(moved).filter(|n| n.op() == "Reshape")?;
        let four = g.ty(moved)?;
        (four.rank() == 4 && four.dim(2) == Some(heads) && four.dim(3) == Some(dim)).then_some(())?;
        projection(g, reshape.input(0)?)
    };
    let (k_out, v_out) = (g.node(transpose_k).output(), v);
    let parts = [heads_of(q, &[0, 2, 1, 3])?, heads_of(k_out, &[0, 2, 3, 1])?, heads_of(v_out, &[0, 2, 1, 3])?];
    let x = parts[0].0;
    let (mut w, mut b) = (vec![0f32; (width * 3 * width) as usize], vec![0f32; 3 * width as usize]);
    let width = width as usize;
    for (i, (xi, wi, bi)) in parts.into_iter().enumerate() {
        let wi = g.constant_f32(wi).filter(|w| w.len() == width * width && xi == x)?;
        for row in 0..width {
            w[row * 3 * width + i * width..][..width].copy_from_slice(&wi[row * width..][..width]);
        }
        if let Some(bi) = bi {
            b[i * width..][..width].copy_from_slice(&g.constant_f32(bi).filter(|b| b.len() == width)?);
        }
    }
    Some(QkvProjection { x, weights: Weights::Split(w, b), k: None })
}

/// q, k and v [B,H,N,D] picked (0, 1, 2) out of one projection of x
/// [B,N,C]: timm's, [B,N,3,H,D] moved to [3,B,H,N,D], or torchvision's,
/// which runs sequence first: x moved to [N,B,C], projected, [N,B,3,C]
/// moved to [3,N,B,C] (an Unsqueeze, a Transpose, a Squeeze), and each
/// pick [N,B,C] viewed as [N,B·H,D], moved to [B·H,N,D] and viewed as
/// [B,H,N,D].
fn one_projection<'g>(g: &'g Graph, qkv: [&'g str; 3], heads: i64, dim: i64) -> Option<QkvProjection<'g>> {
    let width = heads * dim;
    let float = |t: &str, dims: &[i64]| g.ty(t).is_some_and(|t| t.elem == FLOAT && t.rank() == dims.len() && dims.iter().enumerate().all(|(a, &d)| t.dim(a) == Some(d)));
    let sequence_first = |t: &str| {
        let view = g.producer_node(t).filter(|n| n.op() == "Reshape")?;
        let moved = transposed(g, g.producer(view.input(0)?)?, &[1, 0, 2])?;
        let split = g.producer_node(moved).filter(|n| n.op() == "Reshape")?;
        let (heads_ty, split_ty) = (g.ty(view.output())?, g.ty(moved)?);
        let fits = heads_ty.rank() == 4 && heads_ty.dim(1) == Some(heads) && heads_ty.dim(3) == Some(dim);
        (fits && split_ty.rank() == 3 && split_ty.dim(2) == Some(dim)).then_some(())?;
        pick(g, split.input(0)?)
    };
    let same_source = |picked: [Option<(&'g str, i64)>; 3]| {
        let (source, _) = picked[0]?;
        (0..3).all(|i| picked[i] == Some((source, i as i64))).then_some(source)
    };
    let (x, projected) = if let Some(source) = same_source(qkv.map(|t| pick(g, t))) {
        let split = g.producer_node(source).filter(|n| n.op() == "Transpose" && n.attr_ints("perm") == Some(&[2, 0, 3, 1, 4]))?;
        let reshape = g.producer_node(split.input(0)?).filter(|n| n.op() == "Reshape")?;
        let five = g.ty(reshape.output())?;
        if five.rank() != 5 || five.dim(2) != Some(3) || five.dim(3) != Some(heads) || five.dim(4) != Some(dim) {
            return None;
        }
        let (x, w, b) = projection(g, reshape.input(0)?)?;
        (x, (w, b))
    } else {
        let source = same_source(qkv.map(sequence_first))?;
        let squeeze = g.producer_node(source).filter(|n| n.op() == "Squeeze" && axes(g, n).as_deref() == Some(&[3]))?;
        let moved = g.producer_node(squeeze.input(0)?).filter(|n| n.op() == "Transpose" && n.attr_ints("perm") == Some(&[3, 1, 2, 0, 4]))?;
        let unsqueeze = g.producer_node(moved.input(0)?).filter(|n| n.op() == "Unsqueeze" && axes(g, n).as_deref() == Some(&[0]))?;
        let reshape = g.producer_node(unsqueeze.input(0)?).filter(|n| n.op() == "Reshape")?;
        let four = g.ty(reshape.output())?;
        if four.rank() != 4 || four.dim(2) != Some(3) || four.dim(3) != Some(width) {
            return None;
        }
        let (x_moved, w, b) = projection(g, reshape.input(0)?)?;
        (transposed(g, g.producer(x_moved)?, &[1, 0, 2])?, (w, b))
    };
    let (w, b) = projected;
    let ok = float(w, &[width, 3 * width]) && b.is_none_or(|b| float(b, &[3 * width]));
    ok.then_some(QkvProjection { x, weights: Weights::Packed(w, b), k: Some(qkv[1]) })
}

/// torchvision's output projection of the heads joined sequence first
/// (`joined` [N,B,H,D]; `x` the attention's input [B,N,C]): Reshape
/// [N·B,C] ─ Gemm ─ Reshape [N,B,C] ─ Transpose [1,0,2] back to batch
/// first, as those four nodes, where nothing else reads what they compute
/// (the Shapes building their Reshapes' shapes aside). Gemm works row by
/// row, so on the op's [B,N,C] output viewed as rows it gives the same
/// [B,N,C] with no Transposes.
fn sequence_first_projection(g: &Graph, joined: &str, x: &TensorType) -> Option<[NodeIndex; 4]> {
    let flat = sole_consumer(g, joined)?;
    let gemm = sole_consumer(g, g.node(flat).output())?;
    let unflat = sole_consumer(g, g.node(gemm).output())?;
    let back = sole_consumer(g, g.node(unflat).output())?;
    let tail = [flat, gemm, unflat, back];
    let rows = g.ty(g.node(flat).output())?;
    if x.rank() != 3 {
        return None;
    }
    let sequence_first = [x.shape[1].clone(), x.shape[0].clone(), x.shape[2].clone()];
    let fits = g.node(flat).op() == "Reshape" && rows.rank() == 2 && rows.shape[1] == x.shape[2];
    let fits = fits && g.node(gemm).op() == "Gemm" && g.node(gemm).attr_int("transA").unwrap_or(0) == 0;
    // Back to the op's own shape: the Reshape after the Gemm reshapes to [N,B,C].
    let fits = fits && g.node(unflat).op() == "Reshape" && g.ty(g.node(unflat).output())?.shape[..] == sequence_first[..];
    let fits = fits && transposed(g, back, &[1, 0, 2]).is_some();
    let shapes = tail[..3].iter().flat_map(|&id| g.consumers(g.node(id).output())).filter(|&(c, _)| g.node(c).op() == "Shape");
    (fits && shapes.into_iter().all(|(s, _)| feeds_only(g, s, &tail))).then_some(tail)
}

/// The axes of a Squeeze or Unsqueeze: its second input (opset 13 on) or
/// its attribute.
fn axes(g: &Graph, n: &crate::graph::Node) -> Option<Vec<i64>> {
    n.input(1).and_then(|a| g.constant_i64(a)).or_else(|| n.attr_ints("axes").map(<[i64]>::to_vec))
}

/// k [B,H,N,D] whose kᵀ `transpose_k` writes: a Transpose of its last two
/// axes, or (torch.export's exports) a Reshape to [B,H,D,N] of k reshaped
/// to [B·H,N,D] and transposed there.
fn key_source(g: &Graph, transpose_k: NodeIndex, heads: i64, dim: i64) -> Option<&str> {
    if let Some(k) = transposed(g, transpose_k, &[0, 1, 3, 2]) {
        return Some(k);
    }
    let reshape = g.node(transpose_k);
    let batched = transposed(g, g.producer(reshape.input(0)?)?, &[0, 2, 1])?;
    let flat = g.producer_node(batched).filter(|n| n.op() == "Reshape")?;
    let k = flat.input(0)?;
    let (kt_ty, k_ty, flat_ty) = (g.ty(reshape.output())?, g.ty(k)?, g.ty(batched)?);
    let n = k_ty.dim(2)?;
    let fits = reshape.op() == "Reshape" && k_ty.rank() == 4 && k_ty.dim(1) == Some(heads) && k_ty.dim(3) == Some(dim);
    let fits = fits && kt_ty.rank() == 4 && kt_ty.shape[0] == k_ty.shape[0] && kt_ty.shape[1..] == k_ty.shape[1..2].iter().chain([&k_ty.shape[3], &k_ty.shape[2]]).cloned().collect::<Vec<_>>()[..];
    (fits && flat_ty.rank() == 3 && flat_ty.dim(1) == Some(n) && flat_ty.dim(2) == Some(dim)).then_some(k)
}

/// The P·V node reading the attention probabilities `probs` (a Softmax's
/// output) and the tensor it reads, through float-to-float Casts (Hugging
/// Face's eager exports cast them to the query's type, twice), which join
/// `chain`.
fn probabilities_reader<'g>(g: &'g Graph, mut probs: &'g str, chain: &mut Vec<NodeIndex>) -> Option<(NodeIndex, &'g str)> {
    let [(mut reader, 0)] = g.consumers(probs)[..] else { return None };
    while g.node(reader).op() == "Cast" && g.node(reader).attr_int("to") == Some(FLOAT as i64) && !g.is_output(probs) {
        chain.push(reader);
        probs = g.node(reader).output();
        let [(next, 0)] = g.consumers(probs)[..] else { return None };
        reader = next;
    }
    Some((reader, probs))
}

/// The input of `id` when it is a Transpose with permutation `perm`.
fn transposed<'g>(g: &'g Graph, id: NodeIndex, perm: &[i64]) -> Option<&'g str> {
    let node = g.node(id);
    (node.op() == "Transpose" && node.attr_ints("perm") == Some(perm)).then(|| node.input(0))?
}

/// The one node reading `tensor` (Shape nodes aside) when it is no graph
/// output.
fn sole_consumer(g: &Graph, tensor: &str) -> Option<NodeIndex> {
    let readers: Vec<_> = g.consumers(tensor).into_iter().filter(|&(c, _)| g.node(c).op() != "Shape").collect();
    match readers[..] {
        [(id, 0)] if !g.is_output(tensor) => Some(id),
        _ => None,
    }
}

/// Whether everything `from` computes is read by nodes of `to` alone,
/// within a few nodes (a shape vector built for the Reshapes there).
fn feeds_only(g: &Graph, from: NodeIndex, to: &[NodeIndex]) -> bool {
    let mut todo = vec![(from, 0)];
    while let Some((id, depth)) = todo.pop() {
        for out in &g.node(id).proto.output {
            if g.is_output(out) || depth > 8 {
                return false;
            }
            let readers = g.consumers(out);
            if readers.is_empty() {
                return false;
            }
            todo.extend(readers.into_iter().filter(|(c, _)| !to.contains(c)).map(|(c, _)| (c, depth + 1)));
        }
    }
    true
}

/// `(t, i)` when `tensor` is item `i` of `t` along axis 0: a Gather of a
/// scalar index, or a Squeeze of axis 0 of a Split's output `i` (slices of
/// one each along axis 0).
fn pick<'g>(g: &'g Graph, tensor: &str) -> Option<(&'g str, i64)> {
    let node = g.producer_node(tensor)?;
    match node.op() {
        "Gather" if node.attr_int("axis").unwrap_or(0) == 0 => {
            let index = g.constant(node.input(1)?).filter(|t| t.dims.is_empty()).and_then(crate::graph::tensor_i64)?;
            Some((node.input(0)?, index[0]))
        }
        "Squeeze" if axes(g, node).as_deref() == Some(&[0]) => {
            // torch.export's exports: a Slice [i, i + 1) of axis 0.
            if let Some(slice) = g.producer_node(node.input(0)?).filter(|n| n.op() == "Slice") {
                let ints = |k: usize| slice.input(k).filter(|t| !t.is_empty()).map(|t| g.constant_i64(t));
                let axes_ok = ints(3).is_none_or(|a| a.as_deref() == Some(&[0]));
                let steps_ok = ints(4).is_none_or(|s| s.as_deref() == Some(&[1]));
                return match (ints(1).flatten().as_deref(), ints(2).flatten().as_deref()) {
                    (Some(&[i]), Some(&[end])) if i >= 0 && end == i + 1 && axes_ok && steps_ok => Some((slice.input(0)?, i)),
                    _ => None,
                };
            }
            let split = g.producer_node(node.input(0)?).filter(|n| n.op() == "Split" && n.attr_int("axis").unwrap_or(0) == 0)?;
            let sizes = split.input(1).filter(|s| !s.is_empty()).and_then(|s| g.constant_i64(s)).or_else(|| split.attr_ints("split").map(<[i64]>::to_vec));
            if sizes.is_some_and(|s| s.iter().any(|&n| n != 1)) {
                return None;
            }
            let i = split.proto.output.iter().position(|o| o == node.input(0).unwrap_or_default())?;
            Some((split.input(0)?, i as i64))
        }
        _ => None,
    }
}

/// `(x, W, b)` of a projection `x·W + b` (or `x·W`) writing `tensor`, W
/// and b constants (seen through an Identity).
fn projection<'g>(g: &'g Graph, tensor: &str) -> Option<(&'g str, &'g str, Option<&'g str>)> {
    let constant = |t: &'g str| -> Option<&'g str> {
        match g.producer_node(t) {
            Some(n) if n.op() == "Identity" => n.input(0).filter(|i| g.is_constant(i)),
            _ => g.is_constant(t).then_some(t),
        }
    };
    let node = g.producer_node(tensor)?;
    let (matmul, b) = match node.op() {
        "Add" => {
            let (a, c) = (node.input(0)?, node.input(1)?);
            match (constant(a), constant(c)) {
                (None, Some(b)) => (a, Some(b)),
                (Some(b), None) => (c, Some(b)),
                _ => return None,
            }
        }
        "MatMul" => (tensor, None),
        _ => return None,
    };
    let matmul = g.producer_node(matmul).filter(|n| n.op() == "MatMul")?;
    Some((matmul.input(0)?, constant(matmul.input(1)?)?, b))
}
