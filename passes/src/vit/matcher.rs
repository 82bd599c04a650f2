//! Finds the transformer blocks of a ViT, its prefix tokens and its head.
//! Matchers only read the graph; they return typed structs or a reason.

use std::collections::{HashSet, VecDeque};

use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;

use crate::graph::{Dim, Graph, TensorType};
use crate::PassError;

/// One pre-norm transformer block, anchored on its attention: a Softmax
/// between two MatMuls, or the fused `Attention` op (opset 23).
#[derive(Clone, Debug)]
pub struct VitBlock {
    pub index: usize,
    /// Prefix of every node the rewrite adds to this block.
    pub name: String,
    pub attention: NodeIndex,
    /// K with any scalar scale stripped: Kᵀ [B, H, D, N] as it enters Q·Kᵀ,
    /// or K [B, H, N, D] as the `Attention` op takes it.
    pub keys: String,
    pub keys_transposed: bool,
    pub block_input: String,
    /// The `x + Attn(LN1(x))` node; its output is where tokens merge.
    pub attn_residual: NodeIndex,
    pub residual: String,
    pub block_output: String,
    pub heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
    pub width: usize,
}

/// How the model reads its tokens after the last block.
#[derive(Clone, Debug, PartialEq)]
pub enum Head {
    /// Reads these prefix tokens (cls; DeiT's cls and dist), which never move.
    Tokens(Vec<i64>),
    /// A mean over the token axis (of the tokens a Slice keeps, from `start`),
    /// which must become size-weighted.
    AveragePool { reduce: NodeIndex, slice: Option<NodeIndex>, start: usize },
    /// A learned probe attends over every final token (SigLIP's MAP head):
    /// with proportional attention, `log(size)` goes on its logits over keys.
    AttentionPool(AttentionPool),
    /// `reader` uses `tensor` as a sequence of every patch (a Reshape back to
    /// an H×W grid, say): it needs the full sequence back (`--unmerge`). A
    /// graph output of every token (`op` "output", a backbone's
    /// `last_hidden_state`) may instead carry the merged tokens
    /// (`Options::merged_tokens`). Prefix tokens read beside it never move.
    Grid { tensor: String, reader: String, op: String },
}

impl Head {
    pub fn describe(&self) -> String {
        match self {
            Head::Tokens(ix) if ix.len() == 1 => format!("token {}", ix[0]),
            Head::Tokens(ix) => format!("tokens {ix:?}"),
            Head::AveragePool { start, .. } => format!("average pool over tokens {start}.. (size-weighted)"),
            Head::AttentionPool(p) => format!("attention pool {} ({} heads; proportional over its keys)", p.name, p.heads),
            Head::Grid { reader, op, .. } if op == "output" => format!("{reader} is every token"),
            Head::Grid { reader, op, .. } => format!("{reader} ({op}) reads every patch token (unmerged)"),
        }
    }
}

/// An attention whose queries are learned probes and whose keys are the
/// final tokens: logits [B·H, Q, N] (torch's MultiheadAttention) or
/// [B, H, Q, N], Q small.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionPool {
    pub name: String,
    pub softmax: NodeIndex,
    pub heads: usize,
}

/// Everything the rewrite needs to know about the model.
#[derive(Clone, Debug)]
pub struct VitModel {
    pub blocks: Vec<VitBlock>,
    pub tokens: usize,
    pub patches: usize,
    pub prefix: usize,
    pub head: Head,
    /// What the patch embedding says the model reads: `video, 2x14x14
    /// tubelets (Conv3d)`, `image, 14x14 patches`, `spectrogram, 12x17 patches`.
    pub family: String,
}

/// Finds every block, the prefix tokens and the head, or says why not.
pub fn match_vit(g: &Graph) -> Result<VitModel, PassError> {
    let order = g.topological_order()?;
    let mut blocks: Vec<VitBlock> = vec![];
    let mut rejected = vec![];
    let mut pools = vec![];
    for &id in order.iter().filter(|&&id| matches!(g.node(id).op(), "Softmax" | "Attention")) {
        match match_block(g, id, blocks.len()) {
            Ok(b) => blocks.push(b),
            Err(why) => match blocks.last().and_then(|last| attention_pool(g, id, last)) {
                Some(pool) => pools.push(pool),
                None => rejected.push(format!("{}: {why}", g.node(id).name())),
            },
        }
    }
    if blocks.is_empty() {
        let detail = match rejected.as_slice() {
            [] => "the graph has no Softmax".to_string(),
            [one] => one.clone(),
            [first, ..] => format!("{} attention nodes were rejected, the first: {first}", rejected.len()),
        };
        return Err(PassError::NoBlocks(detail));
    }
    if let Some(why) = rejected.first() {
        return Err(PassError::Unsupported(format!("an attention Softmax is not part of a ViT block ({why})")));
    }
    for pair in blocks.windows(2) {
        if pair[1].block_input != pair[0].block_output {
            return Err(PassError::Unsupported(format!(
                "{} does not read the output of {} ({} vs {}): the blocks are not one chain",
                pair[1].name, pair[0].name, pair[1].block_input, pair[0].block_output
            )));
        }
    }
    let tokens = blocks[0].tokens;
    if let Some(b) = blocks.iter().find(|b| b.tokens != tokens) {
        return Err(PassError::Unsupported(format!(
            "{} has {} tokens but the first block has {tokens}: token counts must be equal before merging",
            b.name, b.tokens
        )));
    }
    let (prefix, patches) = prefix_and_patches(g, &blocks[0])?;
    let last = blocks.last().map(|b| b.block_output.clone()).unwrap_or_default();
    let head = match pools.as_slice() {
        [] => match_head(g, &last, tokens, prefix)?,
        [pool] => pool_head(g, &last, tokens, pool)?,
        [_, second, ..] => {
            return Err(PassError::Unsupported(format!(
                "{} is a second attention pool over the final tokens; tome-compile handles one",
                g.node(second.softmax).name()
            )))
        }
    };
    let family = embedding_family(g, &blocks[0]);
    Ok(VitModel { blocks, tokens, patches, prefix, head, family })
}

/// One attention node seen by `diagnose`: its name, its op, and the block it
/// anchors or why it anchors none.
pub type Diagnosis = (String, String, Result<String, String>);

/// Every attention node (Softmax or `Attention`), in order, with the block
/// it anchors or the reason it does not: what `inspect` shows when a model
/// cannot be compiled.
pub fn diagnose(g: &Graph) -> Result<Vec<Diagnosis>, PassError> {
    let order = g.topological_order()?;
    let mut found = vec![];
    for &id in order.iter().filter(|&&id| matches!(g.node(id).op(), "Softmax" | "Attention")) {
        let node = g.node(id);
        let result = match_block(g, id, found.len()).map(|b| {
            format!("{} heads x {}, {} tokens, width {}, merges after {}", b.heads, b.head_dim, b.tokens, b.width, b.residual)
        });
        found.push((node.name().to_string(), node.op().to_string(), result));
    }
    Ok(found)
}

/// Matches one block around its Softmax.
///
/// ```text
///  x ─┬─ LN1 ─ qkv ─ … ─ q ──┐
///     │              … ─ kᵀ ─ MatMul ─ [scale, bias] ─ Softmax ─ MatMul(v) ─ … proj
///     └──────────────────────────────────────────────────────────────── Add ─ x_mid
///  x_mid ─┬─ LN2 ─ MLP ─ [LayerScale] ─┐
///         └──────────────────────────── Add ─ x_out
/// ```
/// Seen in timm (classic and dynamo exporters, with and without the SDPA
/// split scale, and the opset-23 `Attention` op), DeiT, torchvision
/// (sequence-first MultiheadAttention), Hugging Face ViT (eager and SDPA),
/// DINOv2-style (registers, LayerScale) and CLIP-style exports.
fn match_block(g: &Graph, attention: NodeIndex, index: usize) -> Result<VitBlock, String> {
    let (keys, keys_transposed) = match g.node(attention).op() {
        "Attention" => (fused_attention_keys(g, attention)?, false),
        _ => (softmax_keys(g, attention)?, true),
    };
    let kt = g.ty(&keys).ok_or("keys have no known shape")?;
    let (heads, head_dim, tokens) = match (kt.shape.as_slice(), keys_transposed) {
        ([_, Dim::Fixed(h), Dim::Fixed(d), Dim::Fixed(n)], true) | ([_, Dim::Fixed(h), Dim::Fixed(n), Dim::Fixed(d)], false) => {
            (*h as usize, *d as usize, *n as usize)
        }
        _ => return Err(format!("keys {kt} are not [batch, heads, head_dim, tokens] with static sizes")),
    };
    if let Some(table) = position_table(g, &keys, tokens) {
        return Err(format!(
            "{table} multiplies the keys by a table over token positions (rotary position embeddings, as in EVA-02); \
             merged tokens have no position there, and ToMe has no published semantics for it"
        ));
    }
    let upstream = g.reachable(attention, Direction::Incoming);
    let attn_residual = find_residual_add(g, attention, &upstream)?;
    let add = g.node(attn_residual);
    let residual = add.output().to_string();
    let rt = g.ty(&residual).ok_or("the attention residual has no known shape")?;
    let width = match rt.shape.as_slice() {
        [_, Dim::Fixed(n), Dim::Fixed(c)] if *n as usize == tokens => *c as usize,
        _ => return Err(format!("the attention residual {residual} is {rt}, expected [batch, {tokens}, channels]")),
    };
    let block_input = add
        .proto
        .input
        .iter()
        .find(|i| g.producer(i).is_none_or(|p| upstream.contains(&p)) && !g.is_constant(i))
        .cloned()
        .ok_or("the residual Add does not read the block input")?;
    let block_output = find_mlp_residual(g, attn_residual, &residual)?;
    Ok(VitBlock {
        index,
        name: format!("blocks.{index}"),
        attention,
        keys,
        keys_transposed,
        block_input,
        attn_residual,
        residual,
        block_output,
        heads,
        head_dim,
        tokens,
        width,
    })
}

/// A node between the key projection and Q·Kᵀ that multiplies the keys by
/// a constant table with a token-position axis (rotary embeddings' cos and
/// sin), by name. Walks up from the keys to the nearest MatMul or Gemm.
fn position_table(g: &Graph, keys: &str, tokens: usize) -> Option<String> {
    let positional = |t: &str| {
        g.is_constant(t) && g.ty(t).is_some_and(|ty| ty.rank() >= 2 && ty.shape.iter().any(|d| d.fixed().is_some_and(|d| d as usize >= tokens / 2 && d as usize <= tokens)))
    };
    let mut todo = vec![keys.to_string()];
    let mut seen = HashSet::new();
    while let Some(t) = todo.pop() {
        let Some(id) = g.producer(&t).filter(|id| seen.insert(*id) && seen.len() < 64) else { continue };
        let node = g.node(id);
        match node.op() {
            "MatMul" | "Gemm" => continue,
            "Mul" if node.proto.input.iter().any(|i| positional(i)) => return Some(node.name().to_string()),
            _ => todo.extend(node.proto.input.iter().filter(|i| !i.is_empty() && !g.is_constant(i)).cloned()),
        }
    }
    None
}

/// Kᵀ of a Softmax(Q·Kᵀ) attention.
fn softmax_keys(g: &Graph, softmax: NodeIndex) -> Result<String, String> {
    let sm = g.node(softmax);
    let logits = sm.input(0).ok_or("Softmax has no input")?;
    let lt = g.ty(logits).ok_or("attention logits have no known shape")?;
    if lt.rank() != 4 {
        let folded = lt.shape.first().is_some_and(|d| matches!(d, Dim::Symbol(s) if s.contains('*')));
        return Err(match (lt.rank(), folded) {
            (3, true) => format!(
                "attention logits {lt} fold windows into the batch axis: windowed attention (SAM, ViTDet, Swin), for \
                 which ToMe has no published semantics"
            ),
            _ => format!("attention logits {lt} are not [batch, heads, tokens, tokens]"),
        });
    }
    let axis = sm.attr_int("axis").unwrap_or(-1);
    if axis != -1 && axis != 3 {
        return Err(format!("Softmax over axis {axis}, expected the last axis"));
    }
    let qk = walk_to_matmul(g, logits, lt)?;
    let keys_raw = g.node(qk).input(1).ok_or("Q·Kᵀ MatMul has no second input")?;
    Ok(strip_scalar_scale(g, keys_raw))
}

/// K of the opset-23 `Attention` op: 4-D, no causal mask, no KV cache.
fn fused_attention_keys(g: &Graph, id: NodeIndex) -> Result<String, String> {
    let node = g.node(id);
    if node.attr_int("is_causal").unwrap_or(0) != 0 || node.input(4).is_some() {
        return Err("a causal or cached Attention is not a ViT's attention".into());
    }
    if let Some(mask) = node.input(3) {
        if g.ty(mask).is_none_or(|t| t.elem != crate::graph::FLOAT) {
            return Err(format!("Attention mask {mask} is not float32; only additive float masks are supported"));
        }
    }
    let keys = node.input(1).ok_or("Attention has no K input")?;
    if g.ty(keys).is_none_or(|t| t.rank() != 4) {
        return Err("Attention takes 3-D Q/K/V; only the 4-D [batch, heads, tokens, head_dim] form is supported".into());
    }
    Ok(strip_scalar_scale(g, keys))
}

/// Walks from the logits back through scale, bias and casts to Q·Kᵀ.
fn walk_to_matmul(g: &Graph, logits: &str, lt: &TensorType) -> Result<NodeIndex, String> {
    let mut tensor = logits.to_string();
    let tokens = lt.shape.last().cloned();
    for _ in 0..8 {
        let id = g.producer(&tensor).ok_or_else(|| format!("{tensor} is not produced by a node"))?;
        let node = g.node(id);
        match node.op() {
            "MatMul" => return Ok(id),
            "Mul" | "Div" | "Add" | "Sub" | "Cast" => {
                let same = node.proto.input.iter().find(|i| g.ty(i).is_some_and(|t| t.shape == lt.shape));
                let same = same.ok_or_else(|| format!("{} ({}) does not carry the logits", node.name(), node.op()))?;
                let per_key = |t: &TensorType| t.rank() >= 2 && t.shape.last() == tokens.as_ref();
                let bias = node.proto.input.iter().filter(|i| *i != same).filter_map(|i| g.ty(i)).find(|t| per_key(t));
                match bias {
                    Some(t) if node.op() == "Add" && Some(&t.shape[t.rank() - 2]) == tokens.as_ref() => {
                        return Err(format!(
                            "{} adds a token-by-token bias to the logits (a relative position bias, as in BEiT or Swin); \
                             merged tokens would misindex it",
                            node.name()
                        ))
                    }
                    Some(_) if matches!(node.op(), "Add" | "Sub") => {
                        return Err(format!(
                            "{} adds a per-key attention mask to the logits that is not all zero; merged tokens would \
                             misindex it, and tome-compile does not merge masks yet",
                            node.name()
                        ))
                    }
                    _ => (),
                }
                tensor = same.clone();
            }
            op => return Err(format!("{} ({op}) sits between Q·Kᵀ and the Softmax", node.name())),
        }
    }
    Err("no Q·Kᵀ MatMul within 8 nodes of the Softmax".into())
}

/// SDPA exports scale kᵀ by √scale before Q·Kᵀ; the metric is scale-free,
/// so read K before that multiply for the closest match to the reference.
fn strip_scalar_scale(g: &Graph, keys: &str) -> String {
    let Some(node) = g.producer_node(keys) else { return keys.to_string() };
    if !matches!(node.op(), "Mul" | "Div") {
        return keys.to_string();
    }
    let scalar = |t: &str| g.ty(t).is_some_and(|t| t.shape.iter().all(|d| *d == Dim::Fixed(1)));
    match (node.input(0), node.input(1)) {
        (Some(a), Some(b)) if scalar(b) && g.ty(a) == g.ty(keys) => a.to_string(),
        (Some(a), Some(b)) if node.op() == "Mul" && scalar(a) && g.ty(b) == g.ty(keys) => b.to_string(),
        _ => keys.to_string(),
    }
}

/// The first Add after the Softmax that also reads a tensor from before it.
fn find_residual_add(g: &Graph, softmax: NodeIndex, upstream: &HashSet<NodeIndex>) -> Result<NodeIndex, String> {
    let mut queue = VecDeque::from([(softmax, 0)]);
    let mut seen = HashSet::new();
    while let Some((id, depth)) = queue.pop_front() {
        for (next, _) in g.consumers(g.node(id).output()) {
            if !seen.insert(next) || depth > 24 {
                continue;
            }
            let node = g.node(next);
            let reads_block_input = node.proto.input.iter().any(|i| {
                !g.is_constant(i) && g.producer(i).is_none_or(|p| upstream.contains(&p) && p != id)
            });
            if node.op() == "Add" && reads_block_input {
                return Ok(next);
            }
            queue.push_back((next, depth + 1));
        }
    }
    Err("no residual Add after the attention".into())
}

/// The MLP residual: an Add reading `residual` and something computed from it.
fn find_mlp_residual(g: &Graph, attn_residual: NodeIndex, residual: &str) -> Result<String, String> {
    let downstream = g.reachable(attn_residual, Direction::Outgoing);
    g.consumers(residual)
        .into_iter()
        .map(|(id, _)| g.node(id))
        .find(|n| {
            n.op() == "Add"
                && n.proto.input.iter().any(|i| i != residual && g.producer(i).is_some_and(|p| downstream.contains(&p)))
        })
        .map(|n| n.output().to_string())
        .ok_or_else(|| format!("no MLP residual Add reads {residual}"))
}

/// Patches from the patch embedding feeding the first block: a Conv of any
/// rank (Conv2d over images, Conv3d over video tubelets, overlapping strides
/// over spectrograms), whose output's spatial axes multiply to the patch
/// count. The prefix tokens are what Concats on the way to the first block
/// put in front of them, which must add up with the patches to the block's
/// tokens; a model where the two disagree is refused, naming the Conv.
fn prefix_and_patches(g: &Graph, first: &VitBlock) -> Result<(usize, usize), PassError> {
    let mut upstream = g.producer(&first.block_input).map(|id| g.reachable(id, Direction::Incoming)).unwrap_or_default();
    upstream.extend(g.producer(&first.block_input));
    let conv = g.nodes().filter(|id| upstream.contains(id) && g.node(*id).op() == "Conv").find_map(|id| {
        let t = g.ty(g.node(id).output())?;
        let spatial: Option<Vec<i64>> = (2..t.rank()).map(|a| t.dim(a)).collect();
        Some((id, spatial?.iter().product::<i64>() as usize))
    });
    let Some((conv, patches)) = conv else {
        return Err(PassError::Unsupported(
            "no patch-embedding Conv before the first block, so the prefix tokens (cls, dist, registers) are unknown".into(),
        ));
    };
    // The patch tokens' path: what the Conv's values flow through (not its
    // shape, which the cls token's Expand reads for the batch size).
    let mut path = HashSet::from([conv]);
    let mut todo = vec![conv];
    while let Some(id) = todo.pop() {
        for (next, _) in g.node(id).proto.output.iter().flat_map(|o| g.consumers(o)) {
            if upstream.contains(&next) && g.node(next).op() != "Shape" && path.insert(next) {
                todo.push(next);
            }
        }
    }
    let mut prefix = 0;
    for id in path.iter().copied().filter(|id| g.node(*id).op() == "Concat") {
        let node = g.node(id);
        if g.ty(node.output()).is_none_or(|t| t.rank() != 3) {
            continue;
        }
        let axis = node.attr_int("axis").unwrap_or(0);
        if axis != 1 && axis != -2 {
            continue;
        }
        let on_path = |t: &str| g.producer(t).is_some_and(|p| path.contains(&p));
        let inputs = &node.proto.input;
        let Some(last_patch) = inputs.iter().rposition(|t| on_path(t)) else { continue };
        if inputs[last_patch + 1..].iter().any(|t| g.ty(t).and_then(|t| t.dim(1)).unwrap_or(0) > 0) {
            return Err(PassError::Unsupported(format!(
                "{} puts tokens after the patch tokens; tome-compile protects prefix tokens only",
                node.name()
            )));
        }
        for t in inputs.iter().filter(|t| !on_path(t)) {
            prefix += g.ty(t).and_then(|t| t.dim(1)).unwrap_or(0) as usize;
        }
    }
    if prefix + patches != first.tokens {
        return Err(PassError::Unsupported(format!(
            "the patch embedding {} yields {patches} patches and {prefix} tokens are put in front of them, but the first \
             block sees {} tokens: the prefix tokens cannot be established",
            g.node(conv).name(),
            first.tokens
        )));
    }
    Ok((prefix, patches))
}

/// A Softmax after the last block over logits whose last axis is the final
/// tokens and whose queries do not come from them: an attention pool.
///
/// ```text
///  probe ─ q ─┐
///  x_last ─ k ─ MatMul ─ [scale] ─ Softmax ─ MatMul(v from x_last)
/// ```
/// Seen in Hugging Face `SiglipVisionModel`'s head (TorchScript exporter).
fn attention_pool(g: &Graph, softmax: NodeIndex, last: &VitBlock) -> Option<AttentionPool> {
    let node = g.node(softmax);
    let logits = g.ty(node.input(0)?)?;
    let axis = node.attr_int("axis").unwrap_or(-1);
    if !(axis == -1 || axis == logits.rank() as i64 - 1) || !(3..=4).contains(&logits.rank()) {
        return None;
    }
    let queries = logits.dim(logits.rank() - 2)?;
    if logits.dim(logits.rank() - 1)? != last.tokens as i64 || queries as usize >= last.tokens {
        return None;
    }
    let qk = walk_to_matmul(g, node.input(0)?, logits).ok()?;
    let last_out = g.producer(&last.block_output)?;
    let after_last = g.reachable(last_out, Direction::Outgoing);
    let from_last = |t: &str| g.producer(t).is_some_and(|p| p == last_out || after_last.contains(&p));
    // Fewer queries than tokens: the queries are probes, not the tokens.
    let k = g.node(qk).input(1)?;
    if !from_last(k) {
        return None;
    }
    let head_dim = g.ty(k).and_then(|t| t.dim(t.rank() - 2))? as usize;
    Some(AttentionPool { name: node.name().to_string(), softmax, heads: (last.width / head_dim.max(1)).max(1) })
}

/// The head of a model whose final tokens go to an attention pool: nothing
/// but the pool (and the shapes it reads) may read them.
fn pool_head(g: &Graph, last: &str, tokens: usize, pool: &AttentionPool) -> Result<Head, PassError> {
    let pool_inputs = g.reachable(pool.softmax, Direction::Incoming);
    let pool_reads = |id: NodeIndex| pool_inputs.contains(&id) || g.reachable(pool.softmax, Direction::Outgoing).contains(&id);
    let is_token_tensor = |t: &str| g.ty(t).is_some_and(|ty| ty.rank() == 3 && ty.dim(1) == Some(tokens as i64));
    let mut queue = VecDeque::from([last.to_string()]);
    let mut seen = HashSet::new();
    while let Some(tensor) = queue.pop_front() {
        if g.is_output(&tensor) {
            return Ok(Head::Grid { tensor: tensor.clone(), reader: format!("graph output {tensor}"), op: "output".into() });
        }
        for (id, _) in g.consumers(&tensor) {
            let node = g.node(id);
            if !seen.insert(id) || node.op() == "Shape" || pool_reads(id) && !is_token_tensor(node.output()) {
                continue;
            }
            if is_token_tensor(node.output()) {
                queue.push_back(node.output().to_string());
            } else {
                return Ok(Head::Grid { tensor, reader: format!("node {}", node.name()), op: node.op().to_string() });
            }
        }
    }
    Ok(Head::AttentionPool(pool.clone()))
}

/// The input kind and patch grid of the patch embedding feeding the first
/// block: a Conv3d reads video tubelets; a Conv2d reads an image, or a
/// spectrogram when the graph input is [batch, time, frequency].
fn embedding_family(g: &Graph, first: &VitBlock) -> String {
    let mut upstream = g.producer(&first.block_input).map(|id| g.reachable(id, Direction::Incoming)).unwrap_or_default();
    upstream.extend(g.producer(&first.block_input));
    let Some(conv) = g.nodes().find(|id| upstream.contains(id) && g.node(*id).op() == "Conv") else { return "unknown".into() };
    let Some(out) = g.ty(g.node(conv).output()) else { return "unknown".into() };
    let grid: Vec<String> = (2..out.rank()).map(|a| out.dim(a).map(|d| d.to_string()).unwrap_or_else(|| "?".into())).collect();
    let input_rank = g.inputs.first().and_then(|i| g.ty(i)).map(|t| t.rank()).unwrap_or(4);
    match (out.rank(), input_rank) {
        (5, _) => format!("video, {} tubelets (Conv3d)", grid.join("x")),
        (_, 3) => format!("spectrogram, {} patches", grid.join("x")),
        _ => format!("image, {} patches", grid.join("x")),
    }
}

/// Follows the tokens after the last block to the head. A reader that is
/// neither a prefix-token read nor a mean over tokens (a Reshape back to a
/// patch grid, say) makes the head a `Grid`: merging breaks it unless the
/// full token sequence is restored first.
fn match_head(g: &Graph, last: &str, tokens: usize, prefix: usize) -> Result<Head, PassError> {
    let is_token_tensor = |t: &str| g.ty(t).is_some_and(|ty| ty.rank() == 3 && ty.dim(1) == Some(tokens as i64));
    let mut read = vec![];
    let mut pool = None;
    let mut dense = None;
    let mut queue = VecDeque::from([last.to_string()]);
    let mut seen = HashSet::new();
    while let Some(tensor) = queue.pop_front() {
        if g.is_output(&tensor) && dense.is_none() {
            dense = Some(Head::Grid { tensor: tensor.clone(), reader: format!("graph output {tensor}"), op: "output".into() });
        }
        let grid = |node: &crate::graph::Node| Head::Grid {
            tensor: tensor.clone(),
            reader: format!("node {}", node.name()),
            op: node.op().to_string(),
        };
        for (id, _) in g.consumers(&tensor) {
            if !seen.insert(id) {
                continue;
            }
            let node = g.node(id);
            let out = node.output();
            let axis = node.attr_int("axis");
            let index = node.input(1).and_then(|i| g.constant_i64(i));
            match node.op() {
                // Reads no token values; whatever uses the shape is checked where it meets the tokens.
                "Shape" => {}
                "Gather" if axis == Some(1) && index.as_ref().is_some_and(|v| v.len() == 1 && v[0] < prefix as i64) => {
                    read.extend(index.unwrap_or_default());
                }
                "Slice" => {
                    let Some(start) = slice_start_on_tokens(g, node) else { return Ok(grid(node)) };
                    for (next, _) in g.consumers(out) {
                        let n = g.node(next);
                        if n.op() == "Shape" {
                            continue;
                        }
                        if n.op() != "ReduceMean" || !reduces_tokens(g, n) {
                            return Ok(grid(n));
                        }
                        pool = Some(Head::AveragePool { reduce: next, slice: Some(id), start });
                    }
                }
                "ReduceMean" if reduces_tokens(g, node) => {
                    pool = Some(Head::AveragePool { reduce: id, slice: None, start: 0 });
                }
                _ if is_token_tensor(out) && !matches!(node.op(), "Reshape" | "Transpose" | "Gather" | "Slice") => {
                    queue.push_back(out.to_string());
                }
                _ => return Ok(grid(node)),
            }
        }
    }
    match (pool, read.is_empty()) {
        (Some(_), _) if dense.is_some() => {
            Err(PassError::Unsupported("the head mixes an average pool and a graph output of every token".into()))
        }
        (_, _) if dense.is_some() => Ok(dense.unwrap_or(Head::Tokens(vec![]))),
        (Some(p), true) => Ok(p),
        (None, false) => {
            read.sort();
            read.dedup();
            Ok(Head::Tokens(read))
        }
        (Some(_), false) => Err(PassError::Unsupported("the head mixes prefix tokens and an average pool".into())),
        (None, true) => Err(PassError::Unsupported("nothing reads the tokens after the last block".into())),
    }
}

/// Start of a Slice on the token axis (axis 1), if that is all it slices.
fn slice_start_on_tokens(g: &Graph, node: &crate::graph::Node) -> Option<usize> {
    let starts = g.constant_i64(node.input(1)?)?;
    let axes = match node.input(3) {
        Some(a) => g.constant_i64(a)?,
        None => vec![0],
    };
    let steps = match node.input(4) {
        Some(s) => g.constant_i64(s)?,
        None => vec![1],
    };
    match (starts.as_slice(), axes.as_slice(), steps.as_slice()) {
        ([s], [1], [1]) if *s >= 0 => Some(*s as usize),
        _ => None,
    }
}

/// Whether a Reduce* node reduces exactly the token axis of a [B, N, C] tensor;
/// axes come from the attribute (opset < 18) or the second input.
fn reduces_tokens(g: &Graph, node: &crate::graph::Node) -> bool {
    let axes = node.attr_ints("axes").map(<[i64]>::to_vec).or_else(|| node.input(1).and_then(|a| g.constant_i64(a)));
    matches!(axes.as_deref(), Some([1]) | Some([-2]))
}
