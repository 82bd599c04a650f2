//! Multiply-accumulate count of a graph: MatMul, Gemm, Conv and the fused ops, from the
//! inferred shapes, for one image (symbolic axes, the batch, count as 1).
//! The rest (softmax, norms, element-wise ops) is small next to these in a
//! ViT and is left out, as in the ToMe paper's FLOP counts.

use std::collections::HashMap;

use tome_passes::{pb, Dim, TensorType};

/// MACs of a graph, split into the model's own nodes and the ones the ToMe
/// rewrite added (named `*.tome.*`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Macs {
    pub model: u64,
    pub tome: u64,
}

impl Macs {
    pub fn total(&self) -> u64 {
        self.model + self.tome
    }
}

fn dims(t: &TensorType) -> Vec<u64> {
    t.shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => (*v).max(0) as u64,
            Dim::Symbol(_) => 1,
        })
        .collect()
}

/// MACs of one node, when it is a MatMul, Gemm, Conv, tract's
/// `FusedAttention` or a `BipartiteMerge` given keys, with known shapes.
pub fn node_macs(node: &pb::NodeProto, types: &HashMap<String, TensorType>) -> Option<u64> {
    let ty = |slot: usize| node.input.get(slot).and_then(|t| types.get(t)).map(dims);
    let out = node.output.first().and_then(|t| types.get(t)).map(dims)?;
    let volume: u64 = out.iter().product();
    match node.op_type.as_str() {
        "MatMul" => {
            let a = ty(0)?;
            Some(volume * *a.last()?)
        }
        "Gemm" => {
            let a = ty(0)?;
            let trans_a = node.attribute.iter().any(|x| x.name == "transA" && x.i != 0);
            let k = if trans_a { *a.first()? } else { *a.get(1)? };
            Some(volume * k)
        }
        "Conv" => {
            let w = ty(1)?;
            Some(volume * w.iter().skip(1).product::<u64>())
        }
        // softmax(q·kᵀ)·v: [B,H,N,D]·[B,H,D,N], then [B,H,N,N]·[B,H,N,Dv].
        tome_passes::vit::lower::FUSED_ATTENTION_OP => {
            let (q, v) = (ty(0)?, ty(2)?);
            let n = *q.get(2)?;
            Some(q.iter().product::<u64>() * n + volume * v.get(2)?)
        }
        // The similarity of A (even) and B (odd) tokens over the keys' d;
        // given scores, their MatMul counts instead.
        tome_passes::vit::tome::FUSED_MERGE_OP => {
            let (x, keys) = (ty(0)?, ty(1)?);
            let transposed = node.attribute.iter().any(|a| a.name == "keys_transposed" && a.i != 0);
            let n = *x.get(1)?;
            let d = match keys.len() {
                4 => keys[if transposed { 2 } else { 3 }],
                5 => keys[4],
                _ => 0,
            };
            Some(n.div_ceil(2) * (n / 2) * d)
        }
        _ => None,
    }
}

/// MACs of every node `node_macs` counts in `model`, per image.
pub fn count(model: &pb::ModelProto, types: &HashMap<String, TensorType>) -> Macs {
    let mut macs = Macs::default();
    for node in model.graph.iter().flat_map(|g| &g.node) {
        let Some(m) = node_macs(node, types) else { continue };
        if node.name.contains(".tome.") {
            macs.tome += m;
        } else {
            macs.model += m;
        }
    }
    macs
}

/// `1.23 G` style.
pub fn human(macs: u64) -> String {
    let v = macs as f64;
    if v >= 1e9 {
        format!("{:.2} G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1} M", v / 1e6)
    } else {
        format!("{macs}")
    }
}
