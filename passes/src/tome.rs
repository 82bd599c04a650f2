//! The Token Merging rewrites (`TOME_SPEC.md`). Each pass reads the graph
//! and returns a patch; nothing here mutates.

use std::collections::{HashMap, HashSet};

use petgraph::stable_graph::NodeIndex;

use crate::graph::{Dim, Graph, TensorType, FLOAT, INT64};
use crate::matcher::VitBlock;
use crate::patch::{int_attr, tokens_type, Emitter, Patch, Rewire};
use crate::PassError;

/// The tensors a merge leaves for the blocks after it.
#[derive(Clone, Debug)]
pub struct Merged {
    pub x: String,
    /// Tokens each token stands for, [B, N - r, 1].
    pub size: String,
    pub tokens: usize,
}

/// Adds `log(size)` to the attention logits before the Softmax:
/// `logits[b, h, i, j] += log(size[b, j])`.
pub fn proportional_attention(g: &Graph, block: &VitBlock, size: &str) -> Result<Patch, PassError> {
    let logits = g.node(block.softmax).input(0).unwrap_or_default().to_string();
    let ty = g.ty(&logits).cloned().ok_or_else(|| PassError::MissingType(logits.clone()))?;
    let anchor = g.producer(&logits).unwrap_or(block.softmax);
    let mut patch = Patch::new(format!("{}: proportional attention", block.name), anchor);
    let mut e = Emitter::new(&mut patch, format!("{}.tome.prop_attn", block.name), g.opset);
    let log_size = e.op("Log", "log_size", &[size], vec![]);
    // [B, N, 1] -> [B, 1, 1, N] as one Reshape: a Transpose here leads tract
    // to run the Softmax on a strided layout, its slow path (5x slower).
    let n = g.ty(size).and_then(|t| t.dim(1)).ok_or_else(|| PassError::MissingType(size.to_string()))?;
    let row_shape = e.const_i64("bias_shape", &[4], &[-1, 1, 1, n]);
    let bias = e.op("Reshape", "bias", &[&log_size, &row_shape], vec![]);
    let biased = e.op("Add", "logits", &[&logits, &bias], vec![]);
    patch.types.insert(biased.clone(), ty);
    patch.rewires.push(Rewire { node: block.softmax, slot: 0, tensor: biased });
    Ok(patch)
}

/// Bipartite soft matching on the mean key, then the size-weighted merge of
/// the residual stream after attention; every reader of that stream is
/// rewired to the `tokens - r` merged tokens.
///
/// ```text
///  keys ─ mean over heads ─ L2 normalise ─ A=even, B=odd ─ A·Bᵀ (+ protect prefix)
///       ─ max/argmax per A ─ TopK order ─ src = first r, unm = rest (ascending)
///  [x·size, size] ─ A rows: gather unm, gather src ─ one-hotᵀ(dst)·src + B rows
///       ─ concat(unm[:pa], B[:pb], unm[pa:], B[pb:]) ─ x = sum / size
/// ```
pub fn merge(
    g: &Graph,
    block: &VitBlock,
    tokens: usize,
    r: usize,
    size: Option<&str>,
    prefix: usize,
) -> Result<(Patch, Merged), PassError> {
    let (n, c) = (tokens as i64, block.width as i64);
    let (na, nb, r) = ((n + 1) / 2, n / 2, r as i64);
    let nu = na - r;
    let (pa, pb) = ((prefix as i64 + 1) / 2, prefix as i64 / 2);
    let x = block.residual.as_str();
    let x_ty = g.ty(x).cloned().ok_or_else(|| PassError::MissingType(x.to_string()))?;
    let readers = g.consumers(x);

    let mut patch = Patch::new(format!("{}: merge r={r}", block.name), block.attn_residual);
    patch.resized_axis = Some(1);
    let mut e = Emitter::new(&mut patch, format!("{}.tome.merge", block.name), g.opset);

    // Tokens start out standing for one patch each.
    let (size, weighted) = match size {
        Some(s) => (s.to_string(), e.op("Mul", "weighted", &[x, s], vec![])),
        None => {
            let shape = e.op("Shape", "x_shape", &[x], vec![]);
            let batch = e.slice("batch", &shape, 0, 0, 1, 1);
            let tail = e.const_i64("ones_tail", &[2], &[1, 1]);
            let target = e.op("Concat", "ones_shape", &[&batch, &tail], vec![int_attr("axis", 0)]);
            let ones = e.const_f32("ones", &[1, n, 1], &vec![1.0; tokens]);
            (e.op("Expand", "size_in", &[&ones, &target], vec![]), x.to_string())
        }
    };
    let stacked = e.op("Concat", "with_size", &[&weighted, &size], vec![int_attr("axis", 2)]);
    let a = e.slice("a", &stacked, 1, 0, n, 2);
    let b = e.slice("b", &stacked, 1, 1, n, 2);

    // Bipartite soft matching.
    let key_mean = e.reduce("ReduceMean", "key_mean", &block.keys, &[1], false);
    let metric_raw = e.transpose("metric_raw", &key_mean, &[0, 2, 1]);
    let norm = e.reduce("ReduceL2", "metric_norm", &metric_raw, &[2], true);
    let metric = e.op("Div", "metric", &[&metric_raw, &norm], vec![]);
    let metric_a = e.slice("metric_a", &metric, 1, 0, n, 2);
    let metric_b = e.slice("metric_b", &metric, 1, 1, n, 2);
    let metric_b_t = e.transpose("metric_b_t", &metric_b, &[0, 2, 1]);
    let mut scores = e.op("MatMul", "scores", &[&metric_a, &metric_b_t], vec![]);
    // -inf where a protected A token would move or a token would merge into a protected B token.
    let blocked = |i: i64, p: i64| if i < p { f32::NEG_INFINITY } else { 0.0 };
    if pa > 0 {
        let rows: Vec<f32> = (0..na).map(|i| blocked(i, pa)).collect();
        let rows = e.const_f32("protect_a", &[na, 1], &rows);
        scores = e.op("Add", "scores_protect_a", &[&scores, &rows], vec![]);
    }
    if pb > 0 {
        let columns: Vec<f32> = (0..nb).map(|j| blocked(j, pb)).collect();
        let columns = e.const_f32("protect_b", &[1, nb], &columns);
        scores = e.op("Add", "scores_protect_b", &[&scores, &columns], vec![]);
    }
    let best = e.reduce("ReduceMax", "best", &scores, &[2], false);
    let best_dst = e.op("ArgMax", "best_dst", &[&scores], vec![int_attr("axis", 2), int_attr("keepdims", 0)]);
    let all = e.const_i64("order_k", &[1], &[na]);
    let sort_desc = vec![int_attr("axis", 1), int_attr("largest", 1), int_attr("sorted", 1)];
    let order = e.op_multi("TopK", "order", &[&best, &all], &["score", "index"], sort_desc);
    let src = e.slice("src", &order[1], 1, 0, r, 1);
    let mut unm = e.slice("unm", &order[1], 1, r, na, 1);
    if prefix > 0 {
        // Unmerged tokens keep their positional order so the prefix stays in front.
        let as_float = e.cast("unm_float", &unm, FLOAT);
        let k = e.const_i64("unm_k", &[1], &[nu]);
        let sort_asc = vec![int_attr("axis", 1), int_attr("largest", 0), int_attr("sorted", 1)];
        let sorted = e.op_multi("TopK", "unm_sorted", &[&as_float, &k], &["value", "index"], sort_asc);
        unm = e.cast("unm_ascending", &sorted[0], INT64);
    }
    let dst = e.op("GatherElements", "dst", &[&best_dst, &src], vec![int_attr("axis", 1)]);

    // Merge: unmerged A rows are gathered; src rows are added into their dst B rows.
    let unm_index = e.unsqueeze("unm_index", &unm, &[2]);
    let a_unm = e.op("GatherND", "a_unm", &[&a, &unm_index], vec![int_attr("batch_dims", 1)]);
    let src_index = e.unsqueeze("src_index", &src, &[2]);
    let a_src = e.op("GatherND", "a_src", &[&a, &src_index], vec![int_attr("batch_dims", 1)]);
    let dst_column = e.unsqueeze("dst_column", &dst, &[2]);
    let b_positions = e.const_i64("b_positions", &[nb], &(0..nb).collect::<Vec<_>>());
    let hits = e.op("Equal", "dst_one_hot_bool", &[&dst_column, &b_positions], vec![]);
    let one_hot = e.cast("dst_one_hot", &hits, FLOAT);
    let one_hot_t = e.transpose("dst_one_hot_t", &one_hot, &[0, 2, 1]);
    let added = e.op("MatMul", "scatter_add", &[&one_hot_t, &a_src], vec![]);
    let b_merged = e.op("Add", "b_merged", &[&b, &added], vec![]);

    let mut parts = vec![];
    if pa > 0 {
        parts.push(e.slice("unm_prefix", &a_unm, 1, 0, pa, 1));
    }
    if pb > 0 {
        parts.push(e.slice("b_prefix", &b_merged, 1, 0, pb, 1));
    }
    if nu > pa {
        parts.push(if pa > 0 { e.slice("unm_rest", &a_unm, 1, pa, nu, 1) } else { a_unm.clone() });
    }
    parts.push(if pb > 0 { e.slice("b_rest", &b_merged, 1, pb, nb, 1) } else { b_merged.clone() });
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let merged = e.op("Concat", "tokens", &refs, vec![int_attr("axis", 1)]);
    let sums = e.slice("sums", &merged, 2, 0, c, 1);
    let size_out = e.slice("size", &merged, 2, c, c + 1, 1);
    let x_out = e.op("Div", "x", &[&sums, &size_out], vec![]);

    let out_tokens = (n - r) as usize;
    patch.types.insert(x_out.clone(), tokens_type(&x_ty, out_tokens, block.width));
    patch.types.insert(size_out.clone(), tokens_type(&x_ty, out_tokens, 1));
    for (node, slot) in readers {
        patch.rewires.push(Rewire { node, slot, tensor: x_out.clone() });
    }
    Ok((patch, Merged { x: x_out, size: size_out, tokens: out_tokens }))
}

/// Turns a mean over tokens into `sum(x·size) / sum(size)` over the same tokens.
pub fn size_weighted_pool(
    g: &Graph,
    reduce: NodeIndex,
    slice: Option<NodeIndex>,
    size: &str,
) -> Result<Patch, PassError> {
    let node = g.node(reduce);
    let x = node.input(0).unwrap_or_default().to_string();
    let output = node.output().to_string();
    let keepdims = node.attr_int("keepdims").unwrap_or(1) != 0;
    let mut patch = Patch::new(format!("{}: size-weighted pool", node.name()), reduce);
    patch.removals.push(reduce);
    let mut e = Emitter::new(&mut patch, format!("{}.tome.pool", node.name()), g.opset);
    let kept = match slice {
        Some(s) => {
            let mut inputs: Vec<&str> = g.node(s).proto.input.iter().map(String::as_str).collect();
            inputs[0] = size;
            e.op("Slice", "size_kept", &inputs, vec![])
        }
        None => size.to_string(),
    };
    let weighted = e.op("Mul", "weighted", &[&x, &kept], vec![]);
    let sum = e.reduce("ReduceSum", "weighted_sum", &weighted, &[1], keepdims);
    let total = e.reduce("ReduceSum", "size_sum", &kept, &[1], keepdims);
    patch.nodes.push(crate::pb::NodeProto {
        name: format!("{}.tome.pool.mean", node.name()),
        op_type: "Div".into(),
        input: vec![sum, total],
        output: vec![output],
        ..Default::default()
    });
    Ok(patch)
}

/// Token count seen by each node once merges are in: the count left by the
/// last merge upstream of it, or `tokens` before the first merge.
pub fn tokens_per_node(g: &Graph, tokens: usize, merged: &[Merged]) -> Result<HashMap<NodeIndex, usize>, PassError> {
    let stage_of: HashMap<&str, usize> = merged.iter().enumerate().map(|(i, m)| (m.x.as_str(), i + 1)).collect();
    let count = |stage: usize| if stage == 0 { tokens } else { merged[stage - 1].tokens };
    let mut stage: HashMap<NodeIndex, usize> = HashMap::new();
    for id in g.topological_order()? {
        let s = g
            .node(id)
            .proto
            .input
            .iter()
            .map(|i| stage_of.get(i.as_str()).copied().or_else(|| g.producer(i).and_then(|p| stage.get(&p).copied())))
            .map(|s| s.unwrap_or(0))
            .max()
            .unwrap_or(0);
        stage.insert(id, s);
    }
    Ok(stage.into_iter().map(|(id, s)| (id, count(s))).collect())
}

/// Shape constants (Reshape, Expand, ConstantOfShape) that spell the original
/// token count, re-spelled with the count of tokens that reach them. Dynamo
/// exports bake N into these; classic exports compute it with Shape ops.
pub fn retarget_token_constants(
    g: &Graph,
    tokens: usize,
    per_node: &HashMap<NodeIndex, usize>,
    original: &HashSet<NodeIndex>,
) -> Vec<Patch> {
    let mut ids: Vec<NodeIndex> = original.iter().copied().collect();
    ids.sort_by_key(|id| g.node(*id).order);
    let n0 = tokens as i64;
    let mut patches = vec![];
    for id in ids {
        let now = per_node.get(&id).copied().unwrap_or(tokens) as i64;
        let node = g.node(id);
        let slot = match node.op() {
            "Reshape" | "Expand" => 1,
            "ConstantOfShape" => 0,
            _ => continue,
        };
        let (Some(shape_in), Some(out_ty)) = (node.input(slot), g.ty(node.output())) else { continue };
        let Some(mut values) = g.constant_i64(shape_in) else { continue };
        if now == n0 {
            continue;
        }
        let mut changed = false;
        for (axis, v) in values.iter_mut().enumerate() {
            if *v == n0 && out_ty.shape.get(axis) == Some(&Dim::Fixed(n0)) {
                *v = now;
                changed = true;
            }
        }
        if !changed {
            continue;
        }
        let mut patch = Patch::new(format!("{}: {now} tokens", node.name()), id);
        let name = format!("{}.tome.tokens", node.name());
        patch.initializers.push(crate::graph::int64_tensor(&name, &[values.len() as i64], &values));
        patch.types.insert(name.clone(), TensorType::new(INT64, vec![Dim::Fixed(values.len() as i64)]));
        patch.rewires.push(Rewire { node: id, slot, tensor: name });
        patches.push(patch);
    }
    patches
}
