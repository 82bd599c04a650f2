//! onnxruntime's transformer fusions (`com.microsoft` contrib ops, written by
//! `onnxruntime.transformers.optimizer`) turned back into the standard ops
//! they fuse, before anything is inferred: tract cannot read them, and the
//! merge goes between the residual Add and the LayerNorm that
//! `SkipLayerNormalization` fuses. Run the optimizer again on the compiled
//! model to fuse what still can be.
//!
//! ```text
//!  SkipLayerNormalization(x, skip, γ, β, bias) → y, _, _, sum
//!      ⇒  sum = (x + bias) + skip;  y = LayerNormalization(sum, γ, β)
//!  BiasGelu(x, bias)  ⇒  Gelu(x + bias);   Gelu(x)  ⇒  x·½·(1 + erf(x/√2))
//!  FastGelu(x, bias)  ⇒  the tanh approximation of Gelu(x + bias)
//!  Attention(x, W, b, attention_bias) → y, present
//!      ⇒  qkv = x·W + b ─ Reshape [B,N,3,H,D] ─ Transpose [3,B,H,N,D] ─ q, k, v;
//!         y = softmax(scale·q·kᵀ + attention_bias)·v as [B,N,C]; present = (k, v)
//! ```
//! `--target onnxruntime` writes that `Attention` (`vit::lower::ort_attention`),
//! so compiled models read back too. Other contrib ops (`MultiHeadAttention`,
//! an `Attention` with a mask, a past or rotary embeddings) hide the keys and
//! tokens the merge needs, and `com.microsoft.nchwc` ops are laid out for one
//! CPU: refused, naming the node.

use crate::graph::float_tensor;
use crate::patch::{int_attr, ints_attr};
use crate::pb;
use crate::PassError;

const CONTRIB: &str = "com.microsoft";

/// Rewrites the contrib ops of `model` as standard ops; returns one line per
/// op kind rewritten (`"24 SkipLayerNormalization"`).
pub fn unfuse(model: &mut pb::ModelProto) -> Result<Vec<String>, PassError> {
    let graph = model.graph.as_mut().ok_or(PassError::NoGraph)?;
    let foreign = |n: &&pb::NodeProto| n.domain.starts_with(CONTRIB) && n.domain != CONTRIB;
    if let Some(n) = graph.node.iter().find(foreign) {
        return Err(PassError::Unsupported(format!(
            "{} ({}, domain {}) is not a standard ONNX op (a runtime's own layout or fusion); compile the model as \
             exported, then optimize it for the runtime",
            n.name, n.op_type, n.domain
        )));
    }
    if !graph.node.iter().any(|n| n.domain == CONTRIB) {
        return Ok(vec![]);
    }
    let opset = crate::graph::default_opset(model);
    let graph = model.graph.as_mut().ok_or(PassError::NoGraph)?;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut constants = vec![];
    for node in std::mem::take(&mut graph.node) {
        if node.domain != CONTRIB {
            nodes.push(node);
            continue;
        }
        let mut e = Unfused { name: node.name.clone(), nodes: vec![], constants: vec![], opset };
        match node.op_type.as_str() {
            "SkipLayerNormalization" => e.skip_layer_norm(&node)?,
            "Attention" => {
                let width = node.input.get(1).and_then(|w| graph.initializer.iter().find(|t| &t.name == w)).map(|w| w.dims.clone());
                e.attention(&node, width)?
            }
            "BiasGelu" | "Gelu" => {
                let x = e.biased(&node, "biased");
                e.gelu_erf(&x, &node.output[0]);
            }
            "FastGelu" => {
                let x = e.biased(&node, "biased");
                e.gelu_tanh(&x, &node.output[0]);
            }
            op => {
                return Err(PassError::Unsupported(format!(
                    "{} ({op}, {CONTRIB}) is an onnxruntime fusion that hides what tome-compile rewrites; compile the \
                     model as exported, then run onnxruntime's optimizer on the compiled model",
                    node.name
                )))
            }
        }
        *counts.entry(node.op_type.clone()).or_default() += 1;
        nodes.extend(e.nodes);
        constants.extend(e.constants);
    }
    graph.node = nodes;
    graph.initializer.extend(constants);
    if !graph.node.iter().any(|n| n.domain == CONTRIB) {
        model.opset_import.retain(|o| o.domain != CONTRIB);
    }
    Ok(counts.into_iter().map(|(op, n)| format!("{n} {op}")).collect())
}

/// The standard nodes replacing one contrib node, named after it.
struct Unfused {
    name: String,
    nodes: Vec<pb::NodeProto>,
    constants: Vec<pb::TensorProto>,
    opset: i64,
}

impl Unfused {
    fn op(&mut self, op: &str, what: &str, inputs: &[&str], output: Option<&str>, attribute: Vec<pb::AttributeProto>) -> String {
        let name = format!("{}.{what}", self.name);
        let out = output.map(str::to_string).unwrap_or_else(|| name.clone());
        self.nodes.push(pb::NodeProto {
            name,
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute,
            ..Default::default()
        });
        out
    }

    fn scalar(&mut self, what: &str, v: f32) -> String {
        let name = format!("{}.{what}", self.name);
        self.constants.push(float_tensor(&name, &[], &[v]));
        name
    }

    /// Input 0 plus input 1 when there is one (the fused bias).
    fn biased(&mut self, node: &pb::NodeProto, what: &str) -> String {
        match node.input.get(1).filter(|b| !b.is_empty()) {
            Some(bias) => self.op("Add", what, &[&node.input[0], bias], None, vec![]),
            None => node.input[0].clone(),
        }
    }

    fn skip_layer_norm(&mut self, node: &pb::NodeProto) -> Result<(), PassError> {
        let input = |k: usize| node.input.get(k).filter(|s| !s.is_empty()).cloned();
        let output = |k: usize| node.output.get(k).filter(|s| !s.is_empty()).cloned();
        if output(1).is_some() || output(2).is_some() {
            return Err(PassError::Unsupported(format!(
                "{} (SkipLayerNormalization) exposes its mean or inverse deviation, which only training reads",
                node.name
            )));
        }
        if self.opset < 17 {
            return Err(PassError::Unsupported(format!(
                "{} (SkipLayerNormalization) needs LayerNormalization, opset 17; this model imports opset {}: \
                 compile the model as exported, then optimize",
                node.name, self.opset
            )));
        }
        let (Some(x), Some(skip), Some(gamma)) = (input(0), input(1), input(2)) else {
            return Err(PassError::Unsupported(format!("{} (SkipLayerNormalization) lacks an input", node.name)));
        };
        let x = match input(4) {
            Some(bias) => self.op("Add", "bias", &[&x, &bias], None, vec![]),
            None => x,
        };
        let sum = self.op("Add", "residual", &[&x, &skip], output(3).as_deref(), vec![]);
        let epsilon = node.attribute.iter().find(|a| a.name == "epsilon").map(|a| a.f).unwrap_or(1e-12);
        let beta = input(3);
        let mut ins = vec![sum.as_str(), gamma.as_str()];
        ins.extend(beta.as_deref());
        let eps = pb::AttributeProto { name: "epsilon".into(), r#type: 1, f: epsilon, ..Default::default() };
        self.op("LayerNormalization", "layer_norm", &ins, Some(&node.output[0]), vec![int_attr("axis", -1), eps]);
        Ok(())
    }

    /// onnxruntime's `Attention` without mask, past or rotary embeddings;
    /// `weights` are the dims of its weights when they are an initializer
    /// (for the head size, where no `scale` is given).
    fn attention(&mut self, node: &pb::NodeProto, weights: Option<Vec<i64>>) -> Result<(), PassError> {
        let input = |k: usize| node.input.get(k).filter(|s| !s.is_empty()).cloned();
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
        let refuse = |why: &str| {
            Err(PassError::Unsupported(format!(
                "{} (Attention, {CONTRIB}) {why}; compile the model as exported, then run onnxruntime's optimizer on the compiled model",
                node.name
            )))
        };
        let heads = attr("num_heads").map(|a| a.i).unwrap_or(0);
        let sizes = attr("qkv_hidden_sizes").map(|a| a.ints.clone()).unwrap_or_default();
        if [3, 4, 6].into_iter().any(|k| input(k).is_some()) {
            return refuse("has a mask or past state");
        }
        if attr("unidirectional").is_some_and(|a| a.i != 0) || attr("do_rotary").is_some_and(|a| a.i != 0) {
            return refuse("is causal or rotates its keys");
        }
        if heads <= 0 || sizes.iter().any(|&s| s != sizes[0]) || node.output.len() > 2 || self.opset < 13 {
            return refuse("has unequal q, k and v widths, no num_heads, or an opset before 13");
        }
        let scale = match (attr("scale").map(|a| a.f).filter(|&s| s != 0.0), weights.as_deref()) {
            (Some(s), _) => s,
            (None, Some(&[_, width])) if width > 0 && width % (3 * heads) == 0 => 1.0 / ((width / (3 * heads)) as f32).sqrt(),
            _ => return refuse("has no scale and weights of no known width"),
        };
        let (Some(x), Some(w)) = (input(0), input(1)) else { return refuse("lacks an input") };
        let projected = self.op("MatMul", "qkv", &[&x, &w], None, vec![]);
        let qkv = match input(2) {
            Some(b) => self.op("Add", "qkv_bias", &[&projected, &b], None, vec![]),
            None => projected,
        };
        let split = self.int64("split_shape", &[5], &[0, 0, 3, heads, -1]);
        let split = self.op("Reshape", "split", &[&qkv, &split], None, vec![]);
        let heads_first = self.op("Transpose", "heads", &[&split], None, vec![ints_attr("perm", &[2, 0, 3, 1, 4])]);
        let pick = |e: &mut Self, what: &str, k: i64| {
            let index = e.int64(&format!("{what}_index"), &[], &[k]);
            e.op("Gather", what, &[&heads_first, &index], None, vec![int_attr("axis", 0)])
        };
        let (q, k, v) = (pick(self, "q", 0), pick(self, "k", 1), pick(self, "v", 2));
        let kt = self.op("Transpose", "kt", &[&k], None, vec![ints_attr("perm", &[0, 1, 3, 2])]);
        let logits = self.op("MatMul", "logits", &[&q, &kt], None, vec![]);
        let scale = self.scalar("scale", scale);
        let mut logits = self.op("Mul", "scaled", &[&logits, &scale], None, vec![]);
        if let Some(bias) = input(5) {
            logits = self.op("Add", "biased", &[&logits, &bias], None, vec![]);
        }
        let probs = self.op("Softmax", "probs", &[&logits], None, vec![int_attr("axis", -1)]);
        let mixed = self.op("MatMul", "mixed", &[&probs, &v], None, vec![]);
        let tokens_first = self.op("Transpose", "tokens", &[&mixed], None, vec![ints_attr("perm", &[0, 2, 1, 3])]);
        let merged = self.int64("merged_shape", &[3], &[0, 0, -1]);
        self.op("Reshape", "merged", &[&tokens_first, &merged], Some(&node.output[0]), vec![]);
        if let Some(present) = node.output.get(1).filter(|p| !p.is_empty()) {
            let (starts, ends, axes) = (self.int64("starts", &[1], &[1]), self.int64("ends", &[1], &[3]), self.int64("axes", &[1], &[0]));
            self.op("Slice", "present", &[&heads_first, &starts, &ends, &axes], Some(present), vec![]);
        }
        Ok(())
    }

    fn int64(&mut self, what: &str, dims: &[i64], values: &[i64]) -> String {
        let name = format!("{}.{what}", self.name);
        self.constants.push(crate::graph::int64_tensor(&name, dims, values));
        name
    }

    /// `x·½·(1 + erf(x/√2))`, as torch exports `nn.GELU()`.
    fn gelu_erf(&mut self, x: &str, out: &str) {
        let root2 = self.scalar("sqrt2", std::f32::consts::SQRT_2);
        let (one, half) = (self.scalar("one", 1.0), self.scalar("half", 0.5));
        let scaled = self.op("Div", "scaled", &[x, &root2], None, vec![]);
        let erf = self.op("Erf", "erf", &[&scaled], None, vec![]);
        let shifted = self.op("Add", "shifted", &[&erf, &one], None, vec![]);
        let times = self.op("Mul", "times", &[x, &shifted], None, vec![]);
        self.op("Mul", "gelu", &[&times, &half], Some(out), vec![]);
    }

    /// `½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    fn gelu_tanh(&mut self, x: &str, out: &str) {
        let (c, k) = (self.scalar("c", 0.044715), self.scalar("k", (2.0 / std::f32::consts::PI).sqrt()));
        let (one, half) = (self.scalar("one", 1.0), self.scalar("half", 0.5));
        let x2 = self.op("Mul", "x2", &[x, x], None, vec![]);
        let x3 = self.op("Mul", "x3", &[&x2, x], None, vec![]);
        let cx3 = self.op("Mul", "cx3", &[&x3, &c], None, vec![]);
        let inner = self.op("Add", "inner", &[x, &cx3], None, vec![]);
        let arg = self.op("Mul", "arg", &[&inner, &k], None, vec![]);
        let tanh = self.op("Tanh", "tanh", &[&arg], None, vec![]);
        let shifted = self.op("Add", "shifted", &[&tanh, &one], None, vec![]);
        let times = self.op("Mul", "times", &[x, &shifted], None, vec![]);
        self.op("Mul", "gelu", &[&times, &half], Some(out), vec![]);
    }
}
