//! Size bounds checked before anything is allocated from a model's declared
//! numbers. tract folds constant subgraphs while it analyses a model (so a
//! `Range(0, 2^40, 1)` would be materialised), and the passes build
//! per-token constants from inferred shapes, so a crafted size must be
//! refused before either runs.

use std::collections::HashMap;

use tome_passes::graph::{tensor_f32, tensor_i64};
use tome_passes::{pb, Dim, TensorType};

use crate::Error;

/// Most elements any tensor may have at batch 1: 2^30, 4 GiB of float32.
/// The largest tensor of a ViT-H/14 at 518 px is about 2^25.
pub const MAX_ELEMENTS: u64 = 1 << 30;
/// Longest any single axis may be: 2^24. Token counts, widths and vocabularies
/// are far below; the passes allocate constants of one token axis.
pub const MAX_AXIS: u64 = 1 << 24;

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
/// tensor dims, shape vectors of the operators
/// that allocate by value (ConstantOfShape, Expand, Tile, Range, OneHot,
/// Pad, Resize), and the output of every node whose inputs are all
/// constants (which tract folds eagerly).
pub fn check_declared(proto: &pb::ModelProto) -> Result<(), Error> {
    let Some(graph) = proto.graph.as_ref() else { return Ok(()) };
    for t in graph.initializer.iter().chain(graph.node.iter().flat_map(|n| n.attribute.iter().filter_map(|a| a.t.as_ref()))) {
        check_tensor(t)?;
    }
    let consts = constants(graph);
    for node in &graph.node {
        let what = || format!("node {} ({})", node.name, node.op_type);
        let input = |slot: usize| node.input.get(slot).and_then(|i| consts.get(i.as_str()));
        let bound = |n: u64, why: &str| if n > MAX_ELEMENTS { Err(too_large(what(), format!("{why} of {n} elements"))) } else { Ok(()) };
        let shape_in = |slot: usize| input(slot).and_then(Constant::i64s);
        match node.op_type.as_str() {
            "ConstantOfShape" | "Expand" => {
                if let Some(shape) = shape_in(if node.op_type == "Expand" { 1 } else { 0 }) {
                    let n = elements(shape.iter().map(|&d| d.max(1)));
                    bound(n.unwrap_or(u64::MAX), "a shape")?;
                }
            }
            "Tile" => {
                if let Some(repeats) = shape_in(1) {
                    let base = input(0).and_then(|c| elements(c.dims.iter().copied())).unwrap_or(1);
                    let n = elements(repeats.iter().map(|&d| d.max(0))).unwrap_or(u64::MAX).saturating_mul(base);
                    bound(n, "repeats making a tensor")?;
                }
            }
            "Range" => {
                if let (Some(start), Some(limit), Some(delta)) =
                    (input(0).and_then(Constant::scalar), input(1).and_then(Constant::scalar), input(2).and_then(Constant::scalar))
                {
                    let n = ((limit - start) / delta).ceil().max(0.0);
                    if !(n <= MAX_ELEMENTS as f64) {
                        return Err(too_large(what(), format!("Range({start}, {limit}, {delta}) of {n} elements")));
                    }
                }
            }
            "OneHot" | "Pad" => {
                if let Some(v) = shape_in(1).filter(|v| v.iter().any(|d| d.unsigned_abs() > MAX_AXIS)) {
                    return Err(too_large(what(), format!("sizes {v:?} exceed {MAX_AXIS} per axis")));
                }
            }
            "Resize" => {
                if let Some(sizes) = shape_in(3) {
                    bound(elements(sizes).unwrap_or(u64::MAX), "output sizes")?;
                }
            }
            _ => {}
        }
        let all_constant = !node.input.is_empty() && node.input.iter().all(|i| i.is_empty() || consts.contains_key(i.as_str()));
        if all_constant {
            let shapes: Vec<&[i64]> = node.input.iter().filter_map(|i| consts.get(i.as_str())).map(|c| c.dims.as_slice()).collect();
            bound(broadcast_elements(&shapes), "constant inputs that tract would fold into a tensor")?;
        }
    }
    Ok(())
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
/// model is read, `onnx_io::read`.)
fn check_tensor(t: &pb::TensorProto) -> Result<(), Error> {
    match elements(t.dims.iter().copied()) {
        None => Err(too_large(format!("tensor {}", t.name), format!("dims {:?} include a negative axis", t.dims))),
        Some(n) if n > MAX_ELEMENTS => Err(too_large(format!("tensor {}", t.name), format!("dims {:?} declare {n} elements", t.dims))),
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
