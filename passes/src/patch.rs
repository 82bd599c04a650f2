//! Patches: what a pass wants changed, as data. Passes build them while
//! reading the graph; `apply` validates every rewired edge, then writes.

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use crate::graph::{self, Dim, Graph, TensorType};
use crate::pb;
use crate::PassError;

/// Input `slot` of `node` now reads `tensor`.
#[derive(Clone, Debug)]
pub struct Rewire {
    pub node: NodeIndex,
    pub slot: usize,
    pub tensor: String,
}

/// New nodes and constants, rewired inputs and removed nodes, under a label.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub label: String,
    /// New nodes sort right after this original node in the output file.
    pub anchor: Option<NodeIndex>,
    pub nodes: Vec<pb::NodeProto>,
    pub initializers: Vec<pb::TensorProto>,
    /// Types of the new tensors that existing nodes are rewired to read.
    pub types: HashMap<String, TensorType>,
    pub rewires: Vec<Rewire>,
    pub removals: Vec<NodeIndex>,
    /// Which token axis may change size on a rewire (the merge shrinks it).
    pub resized_axis: Option<usize>,
    /// (node, old, new): the node's output `old` is renamed `new`, so that a
    /// new node can take over `old` for all its readers and graph outputs.
    pub renames: Vec<(NodeIndex, String, String)>,
}

impl Patch {
    pub fn new(label: impl Into<String>, anchor: NodeIndex) -> Patch {
        Patch { label: label.into(), anchor: Some(anchor), ..Default::default() }
    }
}

/// Validates and applies `patch` to `g`.
pub fn apply(g: &mut Graph, patch: Patch) -> Result<(), PassError> {
    for rw in &patch.rewires {
        let old = g.node(rw.node).input(rw.slot).unwrap_or_default().to_string();
        if old.is_empty() {
            continue; // a new optional input: nothing to stay compatible with
        }
        let new_ty = patch.types.get(&rw.tensor).or_else(|| g.ty(&rw.tensor));
        if let (Some(old_ty), Some(new_ty)) = (g.ty(&old), new_ty) {
            check_compatible(old_ty, new_ty, patch.resized_axis).map_err(|why| PassError::BadPatch {
                label: patch.label.clone(),
                detail: format!(
                    "{} input {} would change from {old} {old_ty} to {} {new_ty}: {why}",
                    g.node(rw.node).name(),
                    rw.slot,
                    rw.tensor
                ),
            })?;
        }
    }
    let base = patch.anchor.map(|a| g.node(a).order).unwrap_or((usize::MAX, 0));
    let mut read_by_removed = vec![];
    for id in &patch.removals {
        read_by_removed.extend(g.node(*id).proto.input.clone());
        g.remove(*id);
    }
    for (id, old, new) in &patch.renames {
        g.rename_output(*id, old, new)?;
    }
    for t in patch.initializers {
        g.add_initializer(t)?;
    }
    for (k, proto) in patch.nodes.into_iter().enumerate() {
        g.insert(proto, (base.0, base.1 * 1000 + k + 1))?;
    }
    g.types.extend(patch.types);
    for rw in patch.rewires {
        let old = g.node(rw.node).input(rw.slot).unwrap_or_default().to_string();
        g.set_input(rw.node, rw.slot, &rw.tensor);
        g.drop_if_orphaned(&old);
    }
    for tensor in read_by_removed {
        g.drop_if_orphaned(&tensor);
    }
    Ok(())
}

/// Same element type and rank, equal dims except `resized_axis`.
fn check_compatible(old: &TensorType, new: &TensorType, resized_axis: Option<usize>) -> Result<(), String> {
    if old.elem != new.elem {
        return Err(format!("element type {} vs {}", graph::elem_name(old.elem), graph::elem_name(new.elem)));
    }
    if old.rank() != new.rank() {
        return Err("rank differs".into());
    }
    for (axis, (a, b)) in old.shape.iter().zip(&new.shape).enumerate() {
        if a != b && Some(axis) != resized_axis {
            return Err(format!("axis {axis} differs"));
        }
    }
    Ok(())
}

/// Builds the nodes of one patch, naming each `{prefix}.{what}` and emitting
/// the operator form the model's opset expects.
pub struct Emitter<'p> {
    pub patch: &'p mut Patch,
    prefix: String,
    opset: i64,
}

pub fn int_attr(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: 2, i, ..Default::default() }
}

pub fn ints_attr(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: 7, ints: ints.to_vec(), ..Default::default() }
}

impl<'p> Emitter<'p> {
    pub fn new(patch: &'p mut Patch, prefix: impl Into<String>, opset: i64) -> Self {
        Emitter { patch, prefix: prefix.into(), opset }
    }

    pub fn name(&self, what: &str) -> String {
        format!("{}.{what}", self.prefix)
    }

    /// Adds a node with one output named after it; returns that output.
    pub fn op(&mut self, op: &str, what: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>) -> String {
        let name = self.name(what);
        self.patch.nodes.push(pb::NodeProto {
            name: name.clone(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            attribute,
            ..Default::default()
        });
        name
    }

    /// Adds a node with several outputs, `{name}.{out}` each.
    pub fn op_multi(&mut self, op: &str, what: &str, inputs: &[&str], outs: &[&str], attribute: Vec<pb::AttributeProto>) -> Vec<String> {
        let name = self.name(what);
        let output: Vec<String> = outs.iter().map(|o| format!("{name}.{o}")).collect();
        self.patch.nodes.push(pb::NodeProto {
            name,
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: output.clone(),
            attribute,
            ..Default::default()
        });
        output
    }

    /// Puts the node added last in `domain` (an op outside the ONNX standard).
    pub fn in_domain(&mut self, domain: &str) {
        if let Some(node) = self.patch.nodes.last_mut() {
            node.domain = domain.into();
        }
    }

    pub fn const_i64(&mut self, what: &str, dims: &[i64], values: &[i64]) -> String {
        let name = self.name(what);
        self.patch.initializers.push(graph::int64_tensor(&name, dims, values));
        name
    }

    pub fn const_f32(&mut self, what: &str, dims: &[i64], values: &[f32]) -> String {
        let name = self.name(what);
        self.patch.initializers.push(graph::float_tensor(&name, dims, values));
        name
    }

    /// `input[start:end:step]` along `axis`, with constant bounds.
    pub fn slice(&mut self, what: &str, input: &str, axis: i64, start: i64, end: i64, step: i64) -> String {
        let s = self.const_i64(&format!("{what}.starts"), &[1], &[start]);
        let e = self.const_i64(&format!("{what}.ends"), &[1], &[end]);
        let a = self.const_i64(&format!("{what}.axes"), &[1], &[axis]);
        let st = self.const_i64(&format!("{what}.steps"), &[1], &[step]);
        self.op("Slice", what, &[input, &s, &e, &a, &st], vec![])
    }

    /// ReduceMean/Max/Sum/L2 over constant axes: attribute before opset 18
    /// (13 for ReduceSum), input after.
    pub fn reduce(&mut self, op: &str, what: &str, input: &str, axes: &[i64], keepdims: bool) -> String {
        let axes_as_input = self.opset >= 18 || (op == "ReduceSum" && self.opset >= 13);
        let keep = int_attr("keepdims", keepdims as i64);
        if axes_as_input {
            let a = self.const_i64(&format!("{what}.axes"), &[axes.len() as i64], axes);
            self.op(op, what, &[input, &a], vec![keep])
        } else {
            self.op(op, what, &[input], vec![ints_attr("axes", axes), keep])
        }
    }

    pub fn unsqueeze(&mut self, what: &str, input: &str, axes: &[i64]) -> String {
        let a = self.const_i64(&format!("{what}.axes"), &[axes.len() as i64], axes);
        self.op("Unsqueeze", what, &[input, &a], vec![])
    }

    pub fn transpose(&mut self, what: &str, input: &str, perm: &[i64]) -> String {
        self.op("Transpose", what, &[input], vec![ints_attr("perm", perm)])
    }

    /// Rows of `data` [B, N, width] at `index` [B, k, 1] int64, as [B, k, width]:
    /// GatherElements over the index broadcast along the last axis.
    /// (GatherND with batch_dims = 1 says the same, but onnxruntime's symbolic
    /// shape inference gets its shape wrong, and then its transformers
    /// optimizer fuses nothing that needs shapes, SkipLayerNormalization included.)
    pub fn gather_rows(&mut self, what: &str, data: &str, index: &str, width: i64) -> String {
        let index = if width == 1 {
            index.to_string()
        } else {
            let shape = self.const_i64(&format!("{what}.index_shape"), &[3], &[1, 1, width]);
            self.op("Expand", &format!("{what}.index"), &[index, &shape], vec![])
        };
        self.op("GatherElements", what, &[data, &index], vec![int_attr("axis", 1)])
    }

    pub fn cast(&mut self, what: &str, input: &str, to: i32) -> String {
        self.op("Cast", what, &[input], vec![int_attr("to", to as i64)])
    }
}

/// `[batch, n, c]` with the batch axis as declared in `like`.
pub fn tokens_type(like: &TensorType, n: usize, c: usize) -> TensorType {
    let batch = like.shape.first().cloned().unwrap_or(Dim::Symbol("batch".into()));
    TensorType::new(like.elem, vec![batch, Dim::Fixed(n as i64), Dim::Fixed(c as i64)])
}
