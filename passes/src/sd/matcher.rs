//! Finds a UNet's transformer blocks (diffusers' `BasicTransformerBlock`):
//! three pre-norm sub-layers on one residual stream [B, N, C].
//!
//! ```text
//!   x ─┬─ LayerNorm (norm1) ─ self-attention (attn1) ─┐
//!      └──────────────────────────────────────────────Add ─ x1
//!   x1 ─┬─ LayerNorm (norm2) ─ cross-attention (attn2, keys from the text) ─┐
//!       └──────────────────────────────────────────────────────────────────Add ─ x2
//!   x2 ─┬─ LayerNorm (norm3) ─ feed-forward (ff, GEGLU) ─┐
//!       └────────────────────────────────────────────────Add ─ block output
//! ```
//!
//! Seen in torch.onnx (TorchScript, opset 17) exports of diffusers 0.42's
//! `UNet2DConditionModel` (SD 1.x and SDXL layouts) and in optimum-onnx
//! 0.1's `unet/model.onnx` (opset 18). A block must start with
//! self-attention; cross-attention is optional (a block without text
//! conditioning has norm1, attn1, norm3, ff only).

use std::collections::HashSet;

use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;

use crate::graph::Graph;
use crate::PassError;

/// What a sub-layer computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SelfAttention,
    CrossAttention,
    FeedForward,
}

impl Kind {
    /// tomesd's name for merging around it (`--merge`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::SelfAttention => "attn",
            Kind::CrossAttention => "crossattn",
            Kind::FeedForward => "mlp",
        }
    }
}

/// One pre-norm sub-layer: `out = stream + branch(norm(stream))`.
#[derive(Clone, Debug)]
pub struct SubLayer {
    pub kind: Kind,
    /// The LayerNormalization reading the stream; its output is what merges.
    pub norm: NodeIndex,
    /// The residual Add, and which of its inputs is the branch (what unmerges).
    pub residual: NodeIndex,
    pub branch_slot: usize,
}

/// A transformer block: its input stream and its sub-layers in order.
#[derive(Clone, Debug)]
pub struct UnetBlock {
    /// The block's name: its first LayerNorm's name up to `/norm1`.
    pub name: String,
    /// The stream entering the block (tomesd's metric), [B, N, C].
    pub input: String,
    pub tokens: usize,
    pub width: usize,
    pub sublayers: Vec<SubLayer>,
}

/// The transformer blocks of a UNet, in graph order.
pub fn match_unet(g: &Graph) -> Result<Vec<UnetBlock>, PassError> {
    let order = g.topological_order()?;
    let mut blocks = vec![];
    let mut used: HashSet<NodeIndex> = HashSet::new();
    for id in order {
        let node = g.node(id);
        if node.op() != "LayerNormalization" || used.contains(&id) {
            continue;
        }
        let Some(input) = node.input(0).map(str::to_string) else { continue };
        let Some(first) = sublayer(g, &input) else { continue };
        if first.norm != id || first.kind != Kind::SelfAttention {
            continue;
        }
        let Some(ty) = g.ty(&input) else { continue };
        let (Some(tokens), Some(width)) = (ty.dim(1), ty.dim(2)) else { continue };
        if ty.rank() != 3 {
            continue;
        }
        let mut sublayers = vec![first];
        let mut stream = g.node(sublayers[0].residual).output().to_string();
        while sublayers.len() < 3 {
            let Some(next) = sublayer(g, &stream) else { break };
            let last = sublayers[sublayers.len() - 1].kind;
            let follows = matches!((last, next.kind), (Kind::SelfAttention, Kind::CrossAttention | Kind::FeedForward) | (Kind::CrossAttention, Kind::FeedForward));
            if !follows {
                break;
            }
            stream = g.node(next.residual).output().to_string();
            sublayers.push(next);
        }
        if sublayers.last().map(|s| s.kind) != Some(Kind::FeedForward) {
            continue;
        }
        used.extend(sublayers.iter().map(|s| s.norm));
        let name = node.name();
        let name = name.rsplit_once("/norm1").map_or(name, |(head, _)| head).to_string();
        blocks.push(UnetBlock { name, input, tokens: tokens as usize, width: width as usize, sublayers });
    }
    Ok(blocks)
}

/// The sub-layer reading `stream`: a LayerNorm of it, and an Add of it and
/// a branch computed from that LayerNorm.
fn sublayer(g: &Graph, stream: &str) -> Option<SubLayer> {
    let consumers = g.consumers(stream);
    let norm = consumers.iter().find(|(id, slot)| *slot == 0 && g.node(*id).op() == "LayerNormalization")?.0;
    let mut adds = consumers.iter().filter(|(id, _)| g.node(*id).op() == "Add");
    let (residual, stream_slot) = *adds.next()?;
    if adds.next().is_some() {
        return None;
    }
    let branch_slot = 1 - stream_slot;
    let branch = g.node(residual).input(branch_slot)?.to_string();
    let branch_node = g.producer(&branch)?;
    let after_norm = g.reachable(norm, Direction::Outgoing);
    if !after_norm.contains(&branch_node) {
        return None;
    }
    let before_branch = g.reachable(branch_node, Direction::Incoming);
    let region: HashSet<NodeIndex> = after_norm.intersection(&before_branch).copied().chain([branch_node]).collect();
    let softmax = region.iter().find(|id| g.node(**id).op() == "Softmax");
    let kind = match softmax {
        None => Kind::FeedForward,
        Some(&softmax) if reads_outside(g, softmax, norm) => Kind::CrossAttention,
        Some(_) => Kind::SelfAttention,
    };
    Some(SubLayer { kind, norm, residual, branch_slot })
}

/// Whether what `softmax` computes reads a float tensor of rank 2 or more
/// that is neither from `norm` nor constant: the text's encoder states, in
/// cross-attention (a shape read from the stream does not count).
fn reads_outside(g: &Graph, softmax: NodeIndex, norm: NodeIndex) -> bool {
    let upstream_of_norm = g.reachable(norm, Direction::Incoming);
    let own: HashSet<NodeIndex> = g.reachable(softmax, Direction::Incoming).into_iter().filter(|id| *id != norm && !upstream_of_norm.contains(id)).collect();
    let produced_inside = |t: &str| g.producer(t).is_some_and(|p| p == norm || own.contains(&p));
    let is_activation = |t: &str| g.ty(t).is_some_and(|ty| ty.rank() >= 2 && matches!(ty.elem, crate::graph::FLOAT | crate::graph::FLOAT16));
    own.iter().any(|id| g.node(*id).proto.input.iter().any(|t| !t.is_empty() && !produced_inside(t) && !g.is_constant(t) && is_activation(t)))
}
