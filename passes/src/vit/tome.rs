//! The Token Merging rewrites (`TOME_SPEC.md`). Each pass reads the graph
//! and returns a patch; nothing here mutates.

use std::collections::{HashMap, HashSet};

use petgraph::stable_graph::NodeIndex;

use crate::graph::{Dim, Graph, TensorType, FLOAT, INT64};
use crate::vit::matcher::VitBlock;
use crate::patch::{int_attr, tokens_type, Emitter, Patch, Rewire};
use crate::{Ops, PassError};

/// The op and domain of a block's matching and merge as one node
/// (`Ops::Merge`, `Ops::Tract`): inputs x [B,N,C], then the block's keys
/// [B,H,N,D] (attribute `keys_transposed` for [B,H,D,N]) or the similarity scores
/// [B,⌈N/2⌉,⌊N/2⌋], float32, then
/// size [B,N,1] after the first merge; attributes `r` and `prefix`;
/// outputs x and size [B,N-r,·], and optionally `log(size)` [B,N-r,1] for
/// the next block's proportional bias (`lower::merge_log_size`). tract with
/// tome-compile's ops, and onnxruntime and OpenVINO with its plugins, run it.
pub const FUSED_MERGE_OP: &str = "BipartiteMerge";
/// The tract target's proportional-attention Add: logits [B,H,N,N] float32
/// plus bias [B,1,1,N], in the same domain.
pub const PROP_BIAS_OP: &str = "ProportionalBias";
/// The domain of tome-compile's own ops.
pub const OPS_DOMAIN: &str = "ai.tome";

/// Where a merge happens: the tokens entering the block, how many of them
/// merge away, and the protected prefix tokens (cls, dist, registers).
#[derive(Clone, Copy, Debug)]
pub struct MergeAt {
    pub tokens: usize,
    pub r: usize,
    pub prefix: usize,
}

/// The tensors a merge leaves for the blocks after it.
#[derive(Clone, Debug)]
pub struct Merged {
    pub x: String,
    /// Tokens each token stands for, [B, N - r, 1] (empty for the timing bound).
    pub size: String,
    pub tokens: usize,
    /// For each original token, the index of the token now standing for it,
    /// [B, N0] int64; kept only when the head needs the full sequence back.
    pub source: Option<String>,
    /// The image index, for the merges after this one (standard-op form only).
    pub images: Option<Images>,
}

/// Each image's index, [B, 1, 1] int64, and that shape, [3] int64: built
/// once, by the first standard-op merge, for the scatters of every merge.
#[derive(Clone, Debug)]
pub struct Images {
    pub index: String,
    pub shape: String,
}

/// Adds `log(size)` to the attention logits before the Softmax:
/// `logits[b, h, i, j] += log(size[b, j])`. A fused `Attention` op takes the
/// bias as (or added to) its additive mask, spelled out over the query rows
/// as onnxruntime and tract require.
///
/// With `fused` (the tract target) the Add is a `PROP_BIAS_OP` node: tract's
/// generic broadcast Add is slow once the bias varies with the batch.
pub fn proportional_attention(g: &Graph, block: &VitBlock, size: &str, fused: bool) -> Result<Patch, PassError> {
    let attention = g.node(block.attention);
    let fused_attention = attention.op() == "Attention";
    let logits = if fused_attention { attention.input(3) } else { attention.input(0) }.map(str::to_string);
    let anchor = logits.as_deref().and_then(|l| g.producer(l)).unwrap_or(block.attention);
    let mut patch = Patch::new(format!("{}: proportional attention", block.name), anchor);
    let mut e = Emitter::new(&mut patch, format!("{}.tome.prop_attn", block.name), g.opset);
    let n = g.ty(size).and_then(|t| t.dim(1)).ok_or_else(|| PassError::MissingType(size.to_string()))?;
    let mut bias = key_bias(&mut e, size, fused);
    let elem = logits.as_deref().and_then(|l| g.ty(l)).map(|t| t.elem).unwrap_or(FLOAT);
    if elem != FLOAT {
        bias = e.cast("bias_cast", &bias, elem);
    }
    if fused_attention {
        let rows = e.const_i64("bias_rows", &[4], &[1, 1, n, n]);
        bias = e.op("Expand", "bias_expanded", &[&bias, &rows], vec![]);
    }
    let biased = match &logits {
        Some(l) if fused && elem == FLOAT && !fused_attention => {
            let out = e.op(PROP_BIAS_OP, "logits", &[l, &bias], vec![]);
            e.in_domain(OPS_DOMAIN);
            out
        }
        Some(l) => e.op("Add", "logits", &[l, &bias], vec![]),
        None => bias,
    };
    if let Some(ty) = logits.as_deref().and_then(|l| g.ty(l)) {
        patch.types.insert(biased.clone(), ty.clone());
    }
    let slot = if fused_attention { 3 } else { 0 };
    patch.rewires.push(Rewire { node: block.attention, slot, tensor: biased });
    Ok(patch)
}

/// `log(size)` as a bias over keys, [B, 1, 1, N], from sizes [B, N, 1],
/// for the blocks' attention and an attention pool alike: a Reshape (a
/// view, free in onnxruntime and OpenVINO). For tract (`tract`) the size
/// axis is dropped by a MatMul with [1.0] (exact) instead: tract pushes a
/// Reshape's unit-axis removal down through the logits, which become
/// [B, H, N, N, 1] with the Softmax axis no longer last, and tract then
/// runs the Softmax on its single-threaded slow path. A Transpose is worse
/// there: tract swaps the Q·Kᵀ output layout and the Softmax runs strided.
/// Where the attention becomes a `FusedAttention` node, that op reads
/// `log(size)` itself (`lower::fuse_attention`).
fn key_bias(e: &mut Emitter, size: &str, tract: bool) -> String {
    let log_size = e.op("Log", "log_size", &[size], vec![]);
    if !tract {
        let shape = e.const_i64("bias_shape", &[4], &[0, 1, 1, -1]);
        return e.op("Reshape", "bias", &[&log_size, &shape], vec![]);
    }
    let one = e.const_f32("one", &[1], &[1.0]);
    let row = e.op("MatMul", "bias_row", &[&log_size, &one], vec![]);
    e.unsqueeze("bias", &row, &[1, 2])
}

/// Bipartite soft matching on the mean key, then the size-weighted merge of
/// the residual stream after attention; every reader of that stream is
/// rewired to the `tokens - r` merged tokens.
///
/// ```text
///  keys ─ sum over heads ─ L2 normalise ─ A=even, B=odd ─ A·Bᵀ (+ protect prefix)
///       ─ argmax, max per A ─ TopK order ─ src = first r, unm = rest (ascending)
///  x, size ─ gather unm and src rows (GatherND), B = odd tokens (Gather)
///       ─ every B token: (size·x + Σ size·x of the src joining it) / Σ size,
///         the sums by a MatMul with the one-hot joins (no scatter)
///       ─ concat(unm[:pa], B[:pb], unm[pa:], B[pb:])
/// ```
///
/// `previous` is the merge before this one; with `track` the merge also
/// composes the token sources (`Merged::source`). With `ops` other than
/// `Ops::Standard` (and no `track`) the matching and merge are one
/// `FUSED_MERGE_OP` node.
pub fn merge(
    g: &Graph,
    block: &VitBlock,
    at: MergeAt,
    previous: Option<&Merged>,
    track: bool,
    ops: Ops,
) -> Result<(Patch, Merged), PassError> {
    let size = previous.map(|m| m.size.as_str());
    let MergeAt { tokens, r, prefix } = at;
    let mut stream = StreamRewrite::new(g, block, format!("{}: merge r={r}", block.name))?;
    let x_ty = stream.ty.clone();
    let mut e = Emitter::new(&mut stream.patch, format!("{}.tome.merge", block.name), g.opset);
    // Matching and merging run in float32 whatever the model's type.
    let (x, keys) = match x_ty.elem {
        FLOAT => (block.residual.clone(), block.keys.clone()),
        _ => (e.cast("x_float", &block.residual, FLOAT), e.cast("keys_float", &block.keys, FLOAT)),
    };
    let x = x.as_str();
    let (x_out, size_out, images, source) = if ops.fuses_merge() && !track {
        let mut attrs = vec![int_attr("keys_transposed", block.keys_transposed as i64)];
        let mut inputs = vec![x, keys.as_str()];
        inputs.extend(size);
        attrs.extend([int_attr("r", r as i64), int_attr("prefix", prefix as i64)]);
        let outs = e.op_multi(FUSED_MERGE_OP, "bipartite", &inputs, &["x", "size"], attrs);
        e.in_domain(OPS_DOMAIN);
        e.patch.label += &format!(" as {FUSED_MERGE_OP}");
        (outs[0].clone(), outs[1].clone(), None, None)
    } else {
        let matched = bipartite_match(&mut e, block, &keys, at);
        let images = match previous.and_then(|m| m.images.clone()) {
            Some(images) => images,
            None => image_index(&mut e, x),
        };
        let (x_out, size_out) = merge_rows(&mut e, x, size, &images, &matched, at);
        let source = track.then(|| track_sources(&mut e, previous.and_then(|m| m.source.as_deref()), &matched, at));
        (x_out, size_out, Some(images), source)
    };
    let x_out = match x_ty.elem {
        FLOAT => x_out,
        elem => e.cast("x_cast", &x_out, elem),
    };
    Ok(stream.finish(block, Merged { x: x_out, size: size_out, tokens: tokens - r, source, images }))
}

/// The outcome of bipartite matching, as indices [B, k, 1] int64:
/// `src`, the r A tokens that merge away, and `unm`, the
/// A tokens that stay (ascending when there is a prefix), both as token
/// indices (A token i is token 2i); `dst`, the B index each src joins.
struct Matched {
    src: String,
    dst: String,
    unm: String,
}

/// The A tokens' best B match by cosine similarity of the mean key; the r
/// best-matched A tokens merge away (`TOME_SPEC.md`).
fn bipartite_match(e: &mut Emitter, block: &VitBlock, keys: &str, at: MergeAt) -> Matched {
    let Sizes { n, na, nb, r, nu, pa, pb } = Sizes::of(at);
    let mut scores = similarity(e, block, keys, n);
    // -inf where a protected A token would move or a token would merge
    // into a protected B token. (Added to the best score instead, the A
    // rows' -inf makes OpenVINO 2026.4 return -inf for every A token: it
    // folds that Add into the ReduceMax wrongly.)
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
    // Not TopK(k = 1): tract runs that over the last axis 20x slower.
    let best_dst = e.op("ArgMax", "best_dst", &[&scores], vec![int_attr("axis", 2), int_attr("keepdims", 1)]);
    let best = e.reduce("ReduceMax", "best", &scores, &[2], true);
    let all = e.const_i64("order_k", &[1], &[na]);
    let sort_desc = vec![int_attr("axis", 1), int_attr("largest", 1), int_attr("sorted", 1)];
    let order = e.op_multi("TopK", "order", &[&best, &all], &["score", "index"], sort_desc);
    let src_a = e.slice("src_a", &order[1], 1, 0, r, 1);
    let dst = e.op("GatherElements", "dst", &[&best_dst, &src_a], vec![int_attr("axis", 1)]);
    let two = e.const_i64("two", &[1], &[2]);
    let order_tokens = e.op("Mul", "order_tokens", &[&order[1], &two], vec![]);
    let src = e.slice("src", &order_tokens, 1, 0, r, 1);
    let mut unm = e.slice("unm", &order_tokens, 1, r, na, 1);
    if at.prefix > 0 {
        // Unmerged tokens keep their positional order so the prefix stays in front.
        let k = e.const_i64("unm_k", &[1], &[nu]);
        let sort_asc = vec![int_attr("axis", 1), int_attr("largest", 0), int_attr("sorted", 1)];
        unm = e.op_multi("TopK", "unm_sorted", &[&unm, &k], &["value", "index"], sort_asc).swap_remove(0);
    }
    Matched { src, dst, unm }
}

/// The merged stream and sizes, `concat(unm[:pa], B[:pb], unm[pa:], B[pb:])`
/// (B token j is token 2j+1). The unm and src rows are read by (image,
/// row) cells with GatherND, which the runtimes run as whole-row copies;
/// the B tokens are sliced out whole and merged as ToMe's weighted mean,
/// every B token j becoming (size·x of j + Σ size·x of the src joining j) /
/// (their sizes' sum), the sums taken by a MatMul with the one-hot
/// `joins` [B, nb, r] (1 where src i joins j). No write reduces, and no
/// scatter is needed.
fn merge_rows(e: &mut Emitter, x: &str, size: Option<&str>, images: &Images, m: &Matched, at: MergeAt) -> (String, String) {
    let Sizes { n, nb, r, nu, .. } = Sizes::of(at);
    let size = match size {
        Some(s) => s.to_string(),
        // Every token stands for one patch.
        None => {
            let one = e.const_f32("one_each", &[1, n, 1], &vec![1.0; n as usize]);
            e.op("Expand", "ones", &[&one, &images.shape], vec![])
        }
    };
    // No A token stays when r takes them all (no prefix then).
    let unm = (nu > 0).then(|| cells(e, "unm", images, &m.unm, nu));
    let src = cells(e, "src", images, &m.src, r);
    let rows = |e: &mut Emitter, what: &str, data: &str| {
        let unm = unm.as_ref().map(|unm| e.op("GatherND", &format!("unm_{what}"), &[data, unm], vec![]));
        let src = e.op("GatherND", &format!("src_{what}"), &[data, &src], vec![]);
        (unm, src, every_other(e, &format!("b_{what}"), data, 1, 1, n))
    };
    let (unm_x, src_x, b_x) = rows(e, "x", x);
    let (unm_size, src_size, b_size) = rows(e, "size", &size);
    let dst_t = e.transpose("dst_t", &m.dst, &[0, 2, 1]);
    let b_index = e.const_i64("b_index", &[nb, 1], &(0..nb).collect::<Vec<_>>());
    let joins_bool = e.op("Equal", "joins_bool", &[&dst_t, &b_index], vec![]);
    let joins = e.cast("joins", &joins_bool, FLOAT);
    let src_weighted = e.op("Mul", "src_weighted", &[&src_x, &src_size], vec![]);
    let joined = e.op("MatMul", "joined", &[&joins, &src_weighted], vec![]);
    let b_weighted = e.op("Mul", "b_weighted", &[&b_x, &b_size], vec![]);
    let sum = e.op("Add", "sum", &[&b_weighted, &joined], vec![]);
    let joined_size = e.op("MatMul", "joined_size", &[&joins, &src_size], vec![]);
    let b_size = e.op("Add", "b_size_merged", &[&b_size, &joined_size], vec![]);
    let b_x = e.op("Div", "b_x_merged", &[&sum, &b_size], vec![]);
    (in_order(e, "x", unm_x.as_deref(), &b_x, at), in_order(e, "size", unm_size.as_deref(), &b_size, at))
}

/// Tokens `start, start + 2, …` (below n) along `axis`: a Gather of constant
/// indices, which OpenVINO runs compiled where it runs a strided Slice on
/// its reference path.
fn every_other(e: &mut Emitter, what: &str, input: &str, axis: i64, start: i64, n: i64) -> String {
    let tokens: Vec<i64> = (start..n).step_by(2).collect();
    let tokens = e.const_i64(&format!("{what}_tokens"), &[tokens.len() as i64], &tokens);
    e.op("Gather", what, &[input, &tokens], vec![int_attr("axis", axis)])
}

/// `index` [B, k, 1] as (image, index) cells [B, k, 2] for GatherND.
fn cells(e: &mut Emitter, what: &str, images: &Images, index: &str, k: i64) -> String {
    let per = e.const_i64(&format!("{what}_per_image"), &[3], &[1, k, 1]);
    let image = e.op("Expand", &format!("{what}_image"), &[&images.index, &per], vec![]);
    e.op("Concat", &format!("{what}_cells"), &[&image, index], vec![int_attr("axis", 2)])
}

/// The output rows `concat(unm[:pa], B[:pb], unm[pa:], B[pb:])`.
fn in_order(e: &mut Emitter, what: &str, unm: Option<&str>, b: &str, at: MergeAt) -> String {
    let Sizes { nb, nu, pa, pb, .. } = Sizes::of(at);
    let Some(unm) = unm else { return b.to_string() };
    let parts = match pb {
        0 => vec![unm.to_string(), b.to_string()],
        _ => {
            let mut parts = vec![e.slice(&format!("{what}_unm_prefix"), unm, 1, 0, pa, 1), e.slice(&format!("{what}_b_prefix"), b, 1, 0, pb, 1)];
            if nu > pa {
                parts.push(e.slice(&format!("{what}_unm_rest"), unm, 1, pa, nu, 1));
            }
            parts.push(e.slice(&format!("{what}_b_rest"), b, 1, pb, nb, 1));
            parts
        }
    };
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    e.op("Concat", what, &refs, vec![int_attr("axis", 1)])
}

/// A merge's token counts: n tokens, A (even) and B (odd) halves, r merging
/// away, nu A tokens staying, and the prefix split over A and B.
#[derive(Clone, Copy)]
struct Sizes {
    n: i64,
    na: i64,
    nb: i64,
    r: i64,
    nu: i64,
    pa: i64,
    pb: i64,
}

impl Sizes {
    fn of(at: MergeAt) -> Sizes {
        let (n, r, p) = (at.tokens as i64, at.r as i64, at.prefix as i64);
        let (na, nb) = ((n + 1) / 2, n / 2);
        Sizes { n, na, nb, r, nu: na - r, pa: (p + 1) / 2, pb: p / 2 }
    }
}

/// `Images` from the stream x [B, N, C].
fn image_index(e: &mut Emitter, x: &str) -> Images {
    let shape = e.op("Shape", "x_shape", &[x], vec![]);
    let zero = e.const_i64("zero", &[], &[0]);
    let batch = e.op("Gather", "batch", &[&shape, &zero], vec![int_attr("axis", 0)]);
    let step = e.const_i64("step", &[], &[1]);
    let index = e.op("Range", "image_range", &[&zero, &batch, &step], vec![]);
    let column = e.const_i64("image_column", &[3], &[-1, 1, 1]);
    let index = e.op("Reshape", "image", &[&index, &column], vec![]);
    let shape = e.op("Shape", "image_shape", &[&index], vec![]);
    Images { index, shape }
}

/// Where B token j lands in the output `concat(unm[:pa], B[:pb], unm[pa:], B[pb:])`.
fn b_places(nb: i64, nu: i64, pa: i64, pb: i64) -> Vec<i64> {
    (0..nb).map(|j| if j < pb { pa + j } else { nu + j }).collect()
}

/// Cosine similarity of the mean key between A (even) and B (odd) tokens,
/// [B, ceil(n/2), floor(n/2)]. The mean's 1/heads cancels in the
/// normalisation, so the sum over heads stands for it.
fn similarity(e: &mut Emitter, block: &VitBlock, keys: &str, n: i64) -> String {
    let key_sum = e.reduce("ReduceSum", "key_sum", keys, &[1], false);
    let metric_raw = match block.keys_transposed {
        true => e.transpose("metric_raw", &key_sum, &[0, 2, 1]),
        false => key_sum,
    };
    let metric = e.op("LpNormalization", "metric", &[&metric_raw], vec![int_attr("axis", 2), int_attr("p", 2)]);
    let metric_a = every_other(e, "metric_a", &metric, 1, 0, n);
    let metric_b = every_other(e, "metric_b", &metric, 1, 1, n);
    let metric_b_t = e.transpose("metric_b_t", &metric_b, &[0, 2, 1]);
    e.op("MatMul", "scores", &[&metric_a, &metric_b_t], vec![])
}

/// A patch that replaces the residual stream after attention with fewer
/// tokens: the stream's type, and the readers to point at the new stream.
struct StreamRewrite {
    patch: Patch,
    ty: TensorType,
    readers: Vec<(NodeIndex, usize)>,
}

impl StreamRewrite {
    fn new(g: &Graph, block: &VitBlock, label: String) -> Result<StreamRewrite, PassError> {
        let ty = g.ty(&block.residual).cloned().ok_or_else(|| PassError::MissingType(block.residual.clone()))?;
        let mut patch = Patch::new(label, block.attn_residual);
        patch.resized_axis = Some(1);
        Ok(StreamRewrite { patch, ty, readers: g.consumers(&block.residual) })
    }

    /// Records the types of the shortened stream (and size, if any) and
    /// points every reader of the old stream at it.
    fn finish(mut self, block: &VitBlock, merged: Merged) -> (Patch, Merged) {
        self.patch.types.insert(merged.x.clone(), tokens_type(&self.ty, merged.tokens, block.width));
        if !merged.size.is_empty() {
            self.patch.types.insert(merged.size.clone(), tokens_type(&self.ty, merged.tokens, 1));
        }
        for (node, slot) in self.readers {
            self.patch.rewires.push(Rewire { node, slot, tensor: merged.x.clone() });
        }
        (self.patch, merged)
    }
}

/// Where each token of this block lands after the merge, composed with the
/// sources so far. In the output `concat(unm[:pa], b[:pb], unm[pa:], b[pb:])`
/// the p-th unmerged A token sits at `p + (p >= pa ? pb : 0)`, B token j at
/// `j < pb ? pa + j : nu + j`, and a merged A token where its dst B token is.
/// Positions are one-hot sums in float32, exact below 2^24.
fn track_sources(e: &mut Emitter, previous: Option<&str>, m: &Matched, at: MergeAt) -> String {
    let Sizes { na, nb, nu, pa, pb, .. } = Sizes::of(at);
    let (unm, src, dst) = (m.unm.as_str(), m.src.as_str(), m.dst.as_str());
    let a_tokens = e.const_i64("a_tokens", &[na], &(0..na).map(|i| 2 * i).collect::<Vec<_>>());
    // Unmerged A tokens: one-hot [B, nu, na] weighted by their output position.
    let unm_hits = e.op("Equal", "unm_one_hot_bool", &[unm, &a_tokens], vec![]);
    let unm_one_hot = e.cast("unm_one_hot", &unm_hits, FLOAT);
    let unm_place: Vec<f32> = (0..nu).map(|p| (p + if p >= pa { pb } else { 0 }) as f32).collect();
    let unm_place = e.const_f32("unm_place", &[nu, 1], &unm_place);
    let unm_weighted = e.op("Mul", "unm_placed", &[&unm_one_hot, &unm_place], vec![]);
    let from_unm = e.reduce("ReduceSum", "a_from_unm", &unm_weighted, &[1], false);
    // Merged A tokens: one-hot [B, r, na] weighted by where their dst landed.
    let src_hits = e.op("Equal", "src_one_hot_bool", &[src, &a_tokens], vec![]);
    let src_one_hot = e.cast("src_one_hot", &src_hits, FLOAT);
    let b_place: Vec<f32> = b_places(nb, nu, pa, pb).into_iter().map(|p| p as f32).collect();
    let b_place = e.const_f32("b_place", &[nb], &b_place);
    let dst_place = e.op("Gather", "dst_place", &[&b_place, dst], vec![int_attr("axis", 0)]);
    let src_weighted = e.op("Mul", "src_placed", &[&src_one_hot, &dst_place], vec![]);
    let from_src = e.reduce("ReduceSum", "a_from_src", &src_weighted, &[1], false);
    let a_place = e.op("Add", "a_place", &[&from_unm, &from_src], vec![]);
    // Interleave A (even) and B (odd) positions back into this block's token order.
    let a_paired = e.slice("a_place_paired", &a_place, 1, 0, nb, 1);
    let zeros = e.op("Sub", "b_zeros", &[&a_paired, &a_paired], vec![]);
    let b_place_row = e.op("Add", "b_place_row", &[&zeros, &b_place], vec![]);
    let a_column = e.unsqueeze("a_place_pair", &a_paired, &[2]);
    let b_column = e.unsqueeze("b_place_pair", &b_place_row, &[2]);
    let pairs = e.op("Concat", "place_pairs", &[&a_column, &b_column], vec![int_attr("axis", 2)]);
    let flat = e.const_i64("place_flat_shape", &[2], &[0, 2 * nb]);
    let mut place = e.op("Reshape", "place_interleaved", &[&pairs, &flat], vec![]);
    if na > nb {
        let last = e.slice("a_place_last", &a_place, 1, nb, na, 1);
        place = e.op("Concat", "place_all", &[&place, &last], vec![int_attr("axis", 1)]);
    }
    let place = e.cast("place", &place, INT64);
    match previous {
        Some(prev) => e.op("GatherElements", "source", &[&place, prev], vec![int_attr("axis", 1)]),
        None => place,
    }
}

/// The timing bound in place of `merge` (`Options::bound`): keeps the first
/// `tokens - r` tokens of the stream after attention. Same token counts as
/// the merge, none of its cost, wrong numbers. A `Slice`, which OpenVINO
/// runs as a view; tract's (`Ops::Tract`) would move up through the
/// residual Add into the attention's output projection, slicing that
/// projection's input, so it gets a `Gather` of the kept tokens, which
/// stays where the merge is: 0.7-0.9% faster than the slice on ViT-S/16.
pub fn truncate(g: &Graph, block: &VitBlock, tokens: usize, r: usize, ops: Ops) -> Result<(Patch, Merged), PassError> {
    let mut stream = StreamRewrite::new(g, block, format!("{}: drop r={r} (timing bound)", block.name))?;
    let out = tokens - r;
    let mut e = Emitter::new(&mut stream.patch, format!("{}.tome.bound", block.name), g.opset);
    let x = match ops {
        Ops::Tract => {
            let kept = e.const_i64("kept", &[out as i64], &(0..out as i64).collect::<Vec<_>>());
            e.op("Gather", "x", &[&block.residual, &kept], vec![int_attr("axis", 1)])
        }
        _ => e.slice("x", &block.residual, 1, 0, out as i64, 1),
    };
    Ok(stream.finish(block, Merged { x, size: String::new(), tokens: out, source: None, images: None }))
}

/// Gives every original token the value of the token it was merged into:
/// `full[b, j] = tokens[b, source[b, j]]`. The producer of `tensor` is
/// renamed so that every reader, graph outputs included, gets `full` under
/// the old name.
pub fn unmerge(g: &Graph, tensor: &str, source: &str, tokens: usize) -> Result<(Patch, String), PassError> {
    let missing = || PassError::MissingType(tensor.to_string());
    let producer = g.producer(tensor).ok_or_else(missing)?;
    let ty = g.ty(tensor).cloned().ok_or_else(missing)?;
    let mut patch = Patch::new(format!("{tensor}: unmerge"), producer);
    let prefix = format!("{}.tome.unmerge", g.node(producer).name());
    let merged = format!("{prefix}.merged");
    patch.renames.push((producer, tensor.to_string(), merged.clone()));
    let mut e = Emitter::new(&mut patch, &prefix, g.opset);
    let index = e.unsqueeze("source_index", source, &[2]);
    let width = ty.dim(2).unwrap_or(0);
    e.gather_rows("tokens", &merged, &index, width);
    if let Some(node) = patch.nodes.last_mut() {
        node.output = vec![tensor.to_string()];
    }
    patch.types.insert(tensor.to_string(), tokens_type(&ty, tokens, width as usize));
    Ok((patch, tensor.to_string()))
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
    let elem = g.ty(&x).map(|t| t.elem).unwrap_or(FLOAT);
    let x = if elem == FLOAT { x } else { e.cast("x_float", &x, FLOAT) };
    let weighted = e.op("Mul", "weighted", &[&x, &kept], vec![]);
    let sum = e.reduce("ReduceSum", "weighted_sum", &weighted, &[1], keepdims);
    let total = e.reduce("ReduceSum", "size_sum", &kept, &[1], keepdims);
    let mut mean = vec![sum, total];
    let mut op = "Div";
    if elem != FLOAT {
        mean = vec![e.op("Div", "mean_float", &[&mean[0], &mean[1]], vec![])];
        op = "Cast";
    }
    patch.nodes.push(crate::pb::NodeProto {
        name: format!("{}.tome.pool.mean", node.name()),
        op_type: op.into(),
        input: mean,
        output: vec![output],
        attribute: if elem == FLOAT { vec![] } else { vec![int_attr("to", elem as i64)] },
        ..Default::default()
    });
    Ok(patch)
}

/// Token count seen by each node once merges are in: the count left by the
/// last stage boundary upstream of it (a merge, or the unmerge), or `tokens`
/// before the first. `stages` lists each boundary's tensor and count, in order.
pub fn tokens_per_node(g: &Graph, tokens: usize, stages: &[(String, usize)]) -> Result<HashMap<NodeIndex, usize>, PassError> {
    let stage_of: HashMap<&str, usize> = stages.iter().enumerate().map(|(i, s)| (s.0.as_str(), i + 1)).collect();
    let count = |stage: usize| if stage == 0 { tokens } else { stages[stage - 1].1 };
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
/// exports bake N into these; torchvision's attention concatenates a baked N
/// with computed dims (`Concat([N], B·H, D)`); classic exports compute N with
/// Shape ops and need nothing.
pub fn retarget_token_constants(
    g: &Graph,
    tokens: usize,
    per_node: &HashMap<NodeIndex, usize>,
    original: &HashSet<NodeIndex>,
) -> Vec<Patch> {
    let mut ids: Vec<NodeIndex> = original.iter().copied().collect();
    ids.sort_by_key(|id| g.node(*id).order);
    let mut patches = vec![];
    let mut seen = HashSet::new();
    for id in ids {
        let now = per_node.get(&id).copied().unwrap_or(tokens);
        let node = g.node(id);
        let slot = match node.op() {
            "Reshape" | "Expand" => 1,
            "ConstantOfShape" => 0,
            _ => continue,
        };
        let (Some(shape_in), Some(out_ty)) = (node.input(slot), g.ty(node.output())) else { continue };
        if now == tokens {
            continue;
        }
        // (node, slot) holding a constant piece of the shape, and its offset in the shape.
        let mut pieces = vec![(id, slot, shape_in.to_string(), 0usize)];
        if let Some(concat) = g.producer(shape_in).filter(|c| g.node(*c).op() == "Concat" && !g.is_constant(shape_in)) {
            let mut offset = 0;
            pieces.clear();
            for (k, input) in g.node(concat).proto.input.iter().enumerate() {
                let Some(len) = g.ty(input).and_then(|t| t.dim(0)) else { break };
                pieces.push((concat, k, input.clone(), offset));
                offset += len as usize;
            }
        }
        for (holder, slot, tensor, offset) in pieces {
            let Some(mut values) = g.constant_i64(&tensor) else { continue };
            let mut changed = false;
            for (k, v) in values.iter_mut().enumerate() {
                if *v == tokens as i64 && out_ty.shape.get(offset + k) == Some(&Dim::Fixed(tokens as i64)) {
                    *v = now as i64;
                    changed = true;
                }
            }
            if !changed || !seen.insert((holder, slot)) {
                continue;
            }
            let holder_name = g.node(holder).name();
            let mut patch = Patch::new(format!("{holder_name}: {now} tokens"), holder);
            let name = format!("{holder_name}.tome.tokens{slot}");
            patch.initializers.push(crate::graph::int64_tensor(&name, &[values.len() as i64], &values));
            patch.types.insert(name.clone(), TensorType::new(INT64, vec![Dim::Fixed(values.len() as i64)]));
            patch.rewires.push(Rewire { node: holder, slot, tensor: name });
            patches.push(patch);
        }
    }
    patches
}

/// Graph output `name`: the size of each token of the graph output `tokens`
/// ([B, N, 1] float32), `size` as the last merge left it, or ones when no
/// block merges.
pub fn size_output(g: &Graph, tokens: &str, size: Option<&str>, name: &str) -> Result<Patch, PassError> {
    let producer = g.producer(tokens).ok_or_else(|| PassError::MissingType(tokens.to_string()))?;
    let mut patch = Patch::new(format!("{name}: token sizes"), producer);
    let mut e = Emitter::new(&mut patch, name, g.opset);
    let size = match size {
        Some(s) => s.to_string(),
        None => {
            let shape = e.op("Shape", "tokens_shape", &[tokens], vec![]);
            let rows = e.slice("rows", &shape, 0, 0, 2, 1);
            let one = e.const_i64("unit", &[1], &[1]);
            let dims = e.op("Concat", "dims", &[&rows, &one], vec![int_attr("axis", 0)]);
            let fill = crate::pb::AttributeProto {
                name: "value".into(),
                r#type: 4,
                t: Some(crate::graph::float_tensor("", &[1], &[1.0])),
                ..Default::default()
            };
            e.op("ConstantOfShape", "ones", &[&dims], vec![fill])
        }
    };
    patch.nodes.push(crate::pb::NodeProto {
        name: format!("{name}.identity"),
        op_type: "Identity".into(),
        input: vec![size],
        output: vec![name.to_string()],
        ..Default::default()
    });
    Ok(patch)
}

/// Shape vectors computed from the graph input's batch size with the
/// original token count baked in (torch 2.4's exporter: `[batch·197, 64]`
/// as `Cast(Concat(Mul(197, batch), 64))`), re-spelled as constants and the
/// batch read off the input, with the count of tokens that reach them. Shape
/// vectors that read an inner tensor's `Shape` follow the merge already and
/// are left alone; so are the constant spellings `retarget_token_constants` handles.
pub fn retarget_computed_shapes(
    g: &Graph,
    tokens: usize,
    per_node: &HashMap<NodeIndex, usize>,
    original: &HashSet<NodeIndex>,
) -> Vec<Patch> {
    let (shapes, Some(batch)) = crate::values::linear_shapes(g) else { return vec![] };
    // Constants that `retarget_token_constants` replaced are gone.
    let mut ids: Vec<NodeIndex> = original.iter().copied().filter(|id| g.net.contains_node(*id)).collect();
    ids.sort_by_key(|id| g.node(*id).order);
    let mut patches = vec![];
    for id in ids {
        let now = per_node.get(&id).copied().unwrap_or(tokens);
        let node = g.node(id);
        let Some(slot) = crate::canon::shape_slot(node.op()) else { continue };
        let Some(shape) = node.input(slot) else { continue };
        let Some(elems) = shapes.get(shape) else { continue };
        if now == tokens || g.is_constant(shape) || !reads_only_input_shapes(g, shape) {
            continue;
        }
        let n = tokens as i64;
        let respelled: Vec<(i64, i64)> = elems
            .iter()
            .map(|&(a, c)| match (a, c) {
                (0, c) if c == n => (0, now as i64),
                (a, 0) if a == n => (now as i64, 0),
                other => other,
            })
            .collect();
        if respelled == *elems {
            continue;
        }
        let name = format!("{}.tome.tokens{slot}", node.name());
        let mut patch = Patch::new(format!("{}: {now} tokens", node.name()), id);
        let spelled = crate::canon::spell_shape(&mut Emitter::new(&mut patch, &name, g.opset), &respelled, &batch);
        patch.types.insert(spelled.clone(), TensorType::new(INT64, vec![Dim::Fixed(elems.len() as i64)]));
        patch.rewires.push(Rewire { node: id, slot, tensor: spelled });
        patches.push(patch);
    }
    patches
}

/// Whether every `Shape` that `tensor` is computed from reads a graph input.
fn reads_only_input_shapes(g: &Graph, tensor: &str) -> bool {
    let mut todo = vec![tensor.to_string()];
    let mut seen = HashSet::new();
    while let Some(t) = todo.pop() {
        let Some(node) = g.producer_node(&t) else { continue };
        if !seen.insert(t.clone()) {
            continue;
        }
        if seen.len() > 64 {
            return false;
        }
        if node.op() == "Shape" {
            if !node.input(0).is_some_and(|i| g.inputs.iter().any(|x| x == i)) {
                return false;
            }
            continue;
        }
        todo.extend(node.proto.input.iter().filter(|i| !i.is_empty()).cloned());
    }
    true
}

/// Proportional attention in an attention pool (SigLIP's MAP head): its
/// logits over the final tokens get `log(size)` per key, as the blocks'
/// do. Logits [B·H, Q, N] (torch's MultiheadAttention, batch-major over
/// heads) take the bias spread over heads; [B, H, Q, N] take it as is.
///
/// `tract` as for `proportional_attention`'s `fused`: the bias keeps the
/// form tract's Softmax stays fast with.
pub fn pool_attention_bias(g: &Graph, pool: &crate::vit::matcher::AttentionPool, size: &str, tract: bool) -> Result<Patch, PassError> {
    let softmax = g.node(pool.softmax);
    let logits = softmax.input(0).ok_or_else(|| PassError::MissingType(pool.name.clone()))?.to_string();
    let ty = g.ty(&logits).cloned().ok_or_else(|| PassError::MissingType(logits.clone()))?;
    let n = g.ty(size).and_then(|t| t.dim(1)).ok_or_else(|| PassError::MissingType(size.to_string()))?;
    let mut patch = Patch::new(format!("{}: proportional attention", pool.name), g.producer(&logits).unwrap_or(pool.softmax));
    let mut e = Emitter::new(&mut patch, format!("{}.tome.prop_attn", pool.name), g.opset);
    let mut bias = key_bias(&mut e, size, tract);
    if ty.rank() == 3 {
        let heads = e.const_i64("heads", &[4], &[1, pool.heads as i64, 1, 1]);
        let spread = e.op("Expand", "bias_heads", &[&bias, &heads], vec![]);
        let rows = e.const_i64("bias_rows", &[3], &[-1, 1, n]);
        bias = e.op("Reshape", "bias_flat", &[&spread, &rows], vec![]);
    }
    if ty.elem != FLOAT {
        bias = e.cast("bias_cast", &bias, ty.elem);
    }
    let biased = e.op("Add", "logits", &[&logits, &bias], vec![]);
    patch.types.insert(biased.clone(), ty);
    patch.rewires.push(Rewire { node: pool.softmax, slot: 0, tensor: biased });
    Ok(patch)
}
