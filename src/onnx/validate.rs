//! Checks on a model before anything trusts it. Names: every node input is
//! defined, every tensor defined once, every graph output produced. Sizes:
//! tract folds constant subgraphs while it analyses a model (so a
//! `Range(0, 2^40, 1)` would be materialised), and the passes build
//! per-token constants from inferred shapes, so a crafted size must be
//! refused before either allocates from it.

use std::collections::{HashMap, HashSet};

use tome_passes::graph::{tensor_f32, tensor_i64};
use tome_passes::{pb, Dim, TensorType};

use crate::Error;

/// Most elements any tensor may have at batch 1: 2^30, 4 GiB of float32.
/// The largest tensor of a ViT-H/14 at 518 px is about 2^25.
pub const MAX_ELEMENTS: u64 = 1 << 30;
/// Largest tensor tract may fold from constants while reading a model,
/// unless an input is larger already: 2^24 elements, 64 MiB of float32.
pub const MAX_FOLDED: u64 = 1 << 24;
/// Longest any single axis may be: 2^24. Token counts, widths and vocabularies
/// are far below; the passes allocate constants of one token axis.
pub const MAX_AXIS: u64 = 1 << 24;

/// `n` for a message; a saturated count reads "over 2^64".
fn count(n: u64) -> String {
    if n == u64::MAX { "over 2^64".into() } else { n.to_string() }
}

fn too_large(what: impl Into<String>, why: impl Into<String>) -> Error {
    Error::TooLarge { what: what.into(), why: why.into() }
}

/// A constant of the graph: an initializer or a `Constant` node's value.
struct Constant<'a> {
    dims: Vec<i64>,
    tensor: Option<&'a pb::TensorProto>,
    ints: Option<Vec<i64>>,
}

impl Constant<'_> {
    fn i64s(&self) -> Option<Vec<i64>> {
        self.ints.clone().or_else(|| self.tensor.and_then(tensor_i64))
    }

    /// The value of a scalar (or one-element) constant, integer or float.
    fn scalar(&self) -> Option<f64> {
        let t = self.tensor?;
        let v: Vec<f64> = match tensor_i64(t) {
            Some(v) => v.into_iter().map(|x| x as f64).collect(),
            None => tensor_f32(t)?.into_iter().map(f64::from).collect(),
        };
        (v.len() == 1).then(|| v[0])
    }
}

fn constants(graph: &pb::GraphProto) -> HashMap<&str, Constant<'_>> {
    let mut out: HashMap<&str, Constant> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), Constant { dims: t.dims.clone(), tensor: Some(t), ints: None }))
        .collect();
    for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let (Some(out_name), Some(attr)) = (node.output.first(), node.attribute.first()) else { continue };
        let constant = match attr.name.as_str() {
            "value" => attr.t.as_ref().map(|t| Constant { dims: t.dims.clone(), tensor: Some(t), ints: None }),
            "value_ints" => Some(Constant { dims: vec![attr.ints.len() as i64], tensor: None, ints: Some(attr.ints.clone()) }),
            "value_floats" => Some(Constant { dims: vec![attr.floats.len() as i64], tensor: None, ints: None }),
            "value_int" => Some(Constant { dims: vec![], tensor: None, ints: Some(vec![attr.i]) }),
            "value_float" => Some(Constant { dims: vec![], tensor: None, ints: None }),
            _ => None,
        };
        if let Some(c) = constant {
            out.insert(out_name.as_str(), c);
        }
    }
    out
}

/// Elements of a shape; `None` for a negative axis, saturating on overflow.
fn elements(dims: impl IntoIterator<Item = i64>) -> Option<u64> {
    dims.into_iter().try_fold(1u64, |acc, d| u64::try_from(d).ok().map(|d| acc.saturating_mul(d)))
}

/// Checks the sizes a model spells in its file, before tract reads it:
/// tensor dims; the sizes that ConstantOfShape, Expand, Tile, Range and
/// Resize take from constant inputs (at most `MAX_ELEMENTS`); the lengths
/// Pad and OneHot take (at most `MAX_AXIS`); and, for a node whose inputs
/// are all constants (which tract folds eagerly), an output no larger than
/// its largest input or `MAX_FOLDED`.
pub fn check_declared(proto: &pb::ModelProto) -> Result<(), Error> {
    let Some(graph) = proto.graph.as_ref() else { return Ok(()) };
    check_names(graph)?;
    let attribute_tensors = graph.node.iter().flat_map(|n| n.attribute.iter().filter_map(|a| a.t.as_ref()));
    for t in graph.initializer.iter().chain(attribute_tensors) {
        check_tensor(t)?;
    }
    for v in graph.input.iter().chain(&graph.output).chain(&graph.value_info) {
        check_value(v)?;
    }
    let consts = constants(graph);
    for node in &graph.node {
        let what = || format!("node {} ({})", node.name, node.op_type);
        let input = |slot: usize| node.input.get(slot).and_then(|i| consts.get(i.as_str()));
        // tract 0.23 does not check a Transpose's perm, and runs out of memory on one that repeats an axis.
        if let Some(perm) = node.attribute.iter().find(|a| node.op_type == "Transpose" && a.name == "perm") {
            let mut sorted = perm.ints.clone();
            sorted.sort_unstable();
            if sorted.iter().enumerate().any(|(k, &a)| a != k as i64) {
                return Err(Error::Graph(format!("{} has perm {:?}, which is not a permutation of its axes", what(), perm.ints)));
            }
        }
        if matches!(node.op_type.as_str(), "Pad" | "OneHot") {
            if let Some(v) = input(1).and_then(Constant::i64s).filter(|v| v.iter().any(|d| d.unsigned_abs() > MAX_AXIS)) {
                return Err(too_large(what(), format!("lengths {v:?} exceed {MAX_AXIS}")));
            }
        }
        let spelled = spelled_elements(node, &consts);
        let inputs: Vec<&Constant> = node.input.iter().filter(|i| !i.is_empty()).filter_map(|i| consts.get(i.as_str())).collect();
        let all_constant = !inputs.is_empty() && inputs.len() == node.input.iter().filter(|i| !i.is_empty()).count();
        if all_constant {
            let largest = inputs.iter().filter_map(|c| elements(c.dims.iter().copied())).max().unwrap_or(0);
            let shapes: Vec<&[i64]> = inputs.iter().map(|c| c.dims.as_slice()).collect();
            let n = spelled.unwrap_or_else(|| broadcast_elements(&shapes));
            if n > largest.max(MAX_FOLDED) {
                return Err(too_large(what(), format!("its constant inputs, which tract folds while reading the model, make a tensor of {} elements", count(n))));
            }
        } else if let Some(n) = spelled.filter(|&n| n > MAX_ELEMENTS) {
            return Err(too_large(what(), format!("its constant sizes make a tensor of {} elements", count(n))));
        }
    }
    Ok(())
}

/// Every node input is a graph input, an initializer or a node output; no
/// tensor is defined twice; there are graph outputs and each is defined. (Inputs of
/// subgraphs may name outer tensors and are not checked.)
fn check_names(graph: &pb::GraphProto) -> Result<(), Error> {
    let bad = |why: String| Err(Error::Graph(why));
    let mut defined: HashSet<&str> = graph.input.iter().map(|v| v.name.as_str()).collect();
    let mut initializers = HashSet::new();
    for t in &graph.initializer {
        if !initializers.insert(t.name.as_str()) {
            return bad(format!("initializer {} is defined twice", t.name));
        }
        defined.insert(&t.name);
    }
    for node in &graph.node {
        for out in node.output.iter().filter(|o| !o.is_empty()) {
            if !defined.insert(out) {
                return bad(format!("node {} ({}) writes {out}, which is already defined", node.name, node.op_type));
            }
        }
    }
    for node in &graph.node {
        if let Some(missing) = node.input.iter().find(|i| !i.is_empty() && !defined.contains(i.as_str())) {
            return bad(format!("node {} ({}) reads {missing}, which no node, initializer or graph input defines", node.name, node.op_type));
        }
    }
    if graph.output.is_empty() {
        return bad("the graph declares no outputs".into());
    }
    if let Some(out) = graph.output.iter().find(|o| !defined.contains(o.name.as_str())) {
        return bad(format!("graph output {:?} is not produced by any node", out.name));
    }
    Ok(())
}

/// Declared dims of a graph input, output or value_info: non-negative, at
/// most `MAX_AXIS` each and `MAX_ELEMENTS` in all (symbolic axes count 1).
fn check_value(v: &pb::ValueInfoProto) -> Result<(), Error> {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else { return Ok(()) };
    let Some(shape) = t.shape.as_ref() else { return Ok(()) };
    let dims: Vec<i64> = shape.dim.iter().map(|d| if let Some(Value::DimValue(v)) = d.value { v } else { 1 }).collect();
    let fits = dims.iter().all(|&d| (0..=MAX_AXIS as i64).contains(&d)) && elements(dims.iter().copied()).is_some_and(|n| n <= MAX_ELEMENTS);
    if !fits {
        return Err(too_large(format!("tensor {}", v.name), format!("declared dims {dims:?} exceed {MAX_AXIS} per axis or {MAX_ELEMENTS} elements")));
    }
    Ok(())
}

/// Elements of the output of an operator whose size a constant input spells
/// (`u64::MAX` when it does not fit), or `None` when it is not one of those
/// or the input is not constant.
fn spelled_elements(node: &pb::NodeProto, consts: &HashMap<&str, Constant>) -> Option<u64> {
    let input = |slot: usize| node.input.get(slot).and_then(|i| consts.get(i.as_str()));
    let product = |v: Vec<i64>| elements(v.into_iter().map(|d| d.max(0))).unwrap_or(u64::MAX);
    match node.op_type.as_str() {
        "ConstantOfShape" => input(0)?.i64s().map(product),
        "Expand" => input(1)?.i64s().map(product),
        "Resize" => input(3)?.i64s().map(product),
        "Tile" => {
            let base = input(0).and_then(|c| elements(c.dims.iter().copied())).unwrap_or(1);
            input(1)?.i64s().map(|r| product(r).saturating_mul(base))
        }
        "Range" => {
            let (start, limit, delta) = (input(0)?.scalar()?, input(1)?.scalar()?, input(2)?.scalar()?);
            let n = ((limit - start) / delta).ceil().max(0.0);
            Some(if n <= MAX_ELEMENTS as f64 { n as u64 } else { u64::MAX })
        }
        _ => None,
    }
}

/// Element count of the right-aligned, axis-wise largest of `shapes`: an
/// upper bound on what an operator of constant inputs produces by
/// broadcasting, including a MatMul's outer product.
fn broadcast_elements(shapes: &[&[i64]]) -> u64 {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|k| shapes.iter().filter_map(|s| s.len().checked_sub(k + 1).map(|i| s[i].max(0) as u64)).max().unwrap_or(1))
        .fold(1u64, u64::saturating_mul)
}

/// One tensor held in the file: non-negative dims and at most `MAX_ELEMENTS`
/// elements. (External data ranges are checked against their files when the
/// model is read, `onnx::io::read`.)
fn check_tensor(t: &pb::TensorProto) -> Result<(), Error> {
    // float, (u)int8/16/32/64, bool, float16, double; strings only as text.
    let readable = matches!(t.data_type, 1..=7 | 9..=13) || (t.data_type == 8 && t.raw_data.is_empty());
    if !readable {
        return Err(Error::Graph(format!("tensor {} has element type {}, which tract cannot read", t.name, t.data_type)));
    }
    match elements(t.dims.iter().copied()) {
        None => Err(too_large(format!("tensor {}", t.name), format!("dims {:?} include a negative axis", t.dims))),
        Some(n) if n > MAX_ELEMENTS => Err(too_large(format!("tensor {}", t.name), format!("dims {:?} declare {} elements", t.dims, count(n)))),
        _ => Ok(()),
    }
}

/// Checks tract's inferred types (batch counted as 1): every axis at most
/// `MAX_AXIS`, every tensor at most `MAX_ELEMENTS`. Reports the first
/// offending tensor by name, so the message is the same on every run.
pub fn check_inferred(types: &HashMap<String, TensorType>) -> Result<(), Error> {
    let mut names: Vec<&String> = types.keys().collect();
    names.sort();
    for name in names {
        let ty = &types[name];
        let dims = ty.shape.iter().map(|d| match d {
            Dim::Fixed(v) => *v,
            Dim::Symbol(_) => 1,
        });
        let fits = dims.clone().all(|d| (0..=MAX_AXIS as i64).contains(&d))
            && elements(dims).is_some_and(|n| n <= MAX_ELEMENTS);
        if !fits {
            return Err(too_large(
                format!("tensor {name}"),
                format!("inferred as {ty}, over the limits of {MAX_AXIS} per axis and {MAX_ELEMENTS} elements"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_bound_covers_outer_products() {
        assert_eq!(broadcast_elements(&[&[1 << 20, 1], &[1, 1 << 20]]), 1 << 40);
        assert_eq!(broadcast_elements(&[&[3, 4], &[4]]), 12);
        assert_eq!(broadcast_elements(&[]), 1);
    }

    #[test]
    fn element_counts_saturate_and_refuse_negative_axes() {
        assert_eq!(elements([1 << 40, 1 << 40]), Some(u64::MAX));
        assert_eq!(elements([2, -1]), None);
    }
}
