//! The canonical view: before matching, nodes that compute nothing in this
//! model are seen through, so that one matcher serves every exporter. Each
//! rule is an identity that holds for the model's static token count
//! (values come from `values`, which knows shapes and constants):
//!
//! ```text
//!   x + z, x − z      where z is all zero                   ⇒  x
//!   x · o, x / o      where o is all one                    ⇒  x
//!   Where(m, x, y)    where m is all true (all false: y)    ⇒  x
//!   Attention(q, k, v, m)  where m is all true (bool) or all zero  ⇒  Attention(q, k, v)
//! ```
//! (when the result has x's type, so z, o and m only broadcast; a weight
//! vector that happens to be zero or one is left alone). The
//! attention masks transformers materialises from the sequence length
//! (`Range(N) >= 0` → `Expand` → `Where(mask, 0, -inf)` → `Add` to the
//! logits; dynamo exports fold the same mask into a bool constant) vanish
//! by the first and third rules. Whatever is then read by nothing is
//! removed; every other node keeps its name. Nodes that compute nothing
//! anywhere (Identity, Dropout, a Cast to the same type) stay in the file:
//! the matcher walks through them, and `--r 0` writes the graph it read.

use std::collections::{BTreeMap, HashMap};

use petgraph::stable_graph::NodeIndex;

use crate::graph::Graph;
use crate::patch::{self, Patch, Rewire};
use crate::values::{self, Value};
use crate::PassError;

/// Applies the canonical view to `g`; returns one line per kind of node
/// seen through (`"6 Add (all-zero mask or bias)"`), for the report.
pub fn canonicalize(g: &mut Graph) -> Result<Vec<String>, PassError> {
    let known = values::evaluate(g);
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut through = vec![];
    for id in g.topological_order()? {
        let Some((kept, why)) = passes_through(g, id, &known) else { continue };
        let kept = alias.get(&kept).cloned().unwrap_or(kept);
        alias.insert(g.node(id).output().to_string(), kept);
        *seen.entry(why).or_default() += 1;
        through.push(id);
    }
    let mut p = Patch { label: "canonical view".into(), ..Default::default() };
    for id in g.nodes().filter(|&id| g.node(id).op() == "Attention") {
        let mask = g.node(id).input(3).and_then(|m| known.get(m).cloned().or_else(|| g.initializer(m).and_then(values::from_tensor)));
        let neutral = mask.is_some_and(|m| if m.elem == 9 { m.all(1.0) } else { m.all(0.0) });
        if neutral {
            p.rewires.push(Rewire { node: id, slot: 3, tensor: String::new() });
            *seen.entry("Attention mask (all true or all zero)".into()).or_default() += 1;
        }
    }
    if through.is_empty() && p.rewires.is_empty() {
        return Ok(vec![]);
    }
    p.removals = through.into_iter().filter(|id| !g.is_output(g.node(*id).output())).collect();
    for id in g.nodes().filter(|id| !p.removals.contains(id)) {
        for (slot, input) in g.node(id).proto.input.iter().enumerate() {
            if let Some(kept) = alias.get(input) {
                p.rewires.push(Rewire { node: id, slot, tensor: kept.clone() });
            }
        }
    }
    patch::apply(g, p)?;
    remove_dead(g)?;
    Ok(seen.into_iter().map(|(why, n)| format!("{n} {why}")).collect())
}

/// The input `id` passes through unchanged, and why, if it computes nothing.
fn passes_through(g: &Graph, id: NodeIndex, known: &HashMap<String, Value>) -> Option<(String, String)> {
    let node = g.node(id);
    let out = g.ty(node.output())?;
    let same = |slot: usize| node.input(slot).filter(|t| g.ty(t) == Some(out)).map(str::to_string);
    let value = |slot: usize| node.input(slot).and_then(|t| known.get(t).cloned().or_else(|| g.initializer(t).and_then(values::from_tensor)));
    // A weight vector that happens to be zero or one (an untrained bias or
    // LayerScale) is the model's, not the exporter's: only computed values
    // and constants spanning more than one axis (masks) are seen through.
    let weight = |slot: usize| node.input(slot).is_some_and(|t| is_weight_vector(g, t));
    let is = |slot: usize, v: f64| !weight(slot) && value(slot).is_some_and(|x| x.all(v));
    let kept = match node.op() {
        "Add" if is(1, 0.0) => same(0).map(|x| (x, "Add (all-zero mask or bias)")),
        "Add" if is(0, 0.0) => same(1).map(|x| (x, "Add (all-zero mask or bias)")),
        "Sub" if is(1, 0.0) => same(0).map(|x| (x, "Sub (all zero)")),
        "Mul" if is(1, 1.0) => same(0).map(|x| (x, "Mul (all one)")),
        "Mul" if is(0, 1.0) => same(1).map(|x| (x, "Mul (all one)")),
        "Div" if is(1, 1.0) => same(0).map(|x| (x, "Div (all one)")),
        "Where" if is(0, 1.0) => same(1).map(|x| (x, "Where (all-true mask)")),
        "Where" if is(0, 0.0) => same(2).map(|x| (x, "Where (all-false mask)")),
        _ => None,
    }?;
    Some((kept.0, kept.1.to_string()))
}

/// Shape vectors a runtime's shape inference may not follow (torch 2.4's
/// exporter spells `expand(B, -1, -1)` as `Abs(Cast(Concat(B, -1, -1)))`),
/// rewritten from what they evaluate to (`values::linear_shapes`):
/// constants, and the batch axis read off the graph input with `Shape`.
/// Only the shape inputs of nodes whose output has no inferred type
/// (`untyped`) are touched; returns how many were rewritten.
pub fn fold_shape_inputs(g: &mut Graph, untyped: &dyn Fn(&str) -> bool) -> Result<usize, PassError> {
    let (shapes, Some(batch)) = values::linear_shapes(g) else { return Ok(0) };
    let mut folded = 0;
    let targets: Vec<(NodeIndex, usize)> = g
        .nodes()
        .filter(|&id| untyped(g.node(id).output()))
        .filter_map(|id| shape_slot(g.node(id).op()).map(|slot| (id, slot)))
        .collect();
    for (id, slot) in targets {
        let Some(tensor) = g.node(id).input(slot).map(str::to_string) else { continue };
        let Some(elems) = shapes.get(&tensor).filter(|_| !g.is_constant(&tensor)) else { continue };
        let name = format!("{}.tome.shape", g.node(id).name());
        let mut p = Patch::new(format!("{}: shape folded", g.node(id).name()), id);
        let shape = spell_shape(&mut crate::patch::Emitter::new(&mut p, &name, g.opset), elems, &batch);
        if let Some(t) = g.ty(&tensor).cloned() {
            p.types.insert(shape.clone(), t);
        }
        p.rewires.push(Rewire { node: id, slot, tensor: shape });
        patch::apply(g, p)?;
        folded += 1;
    }
    if folded > 0 {
        remove_dead(g)?;
    }
    Ok(folded)
}

/// The input slot holding the shape of an op that takes one as data.
pub fn shape_slot(op: &str) -> Option<usize> {
    match op {
        "Expand" | "Reshape" | "Tile" => Some(1),
        "ConstantOfShape" => Some(0),
        _ => None,
    }
}

/// A shape vector `[a·batch + c, ...]` as nodes: constants, and the batch
/// axis read with `Shape` off `batch` (graph input, axis). Returns its name.
pub fn spell_shape(e: &mut crate::patch::Emitter, elems: &[(i64, i64)], batch: &(String, usize)) -> String {
    use crate::patch::int_attr;
    let mut parts = vec![];
    for (k, &(a, c)) in elems.iter().enumerate() {
        parts.push(match a {
            0 => e.const_i64(&format!("c{k}"), &[1], &[c]),
            _ => {
                let (input, axis) = batch;
                let attrs = vec![int_attr("start", *axis as i64), int_attr("end", *axis as i64 + 1)];
                let mut dim = e.op("Shape", &format!("batch{k}"), &[input], attrs);
                if a != 1 {
                    let factor = e.const_i64(&format!("factor{k}"), &[1], &[a]);
                    dim = e.op("Mul", &format!("scaled{k}"), &[&dim, &factor], vec![]);
                }
                if c != 0 {
                    let offset = e.const_i64(&format!("offset{k}"), &[1], &[c]);
                    dim = e.op("Add", &format!("shifted{k}"), &[&dim, &offset], vec![]);
                }
                dim
            }
        });
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    e.op("Concat", "shape", &refs, vec![int_attr("axis", 0)])
}

/// A constant vector (through Identity aliases, as TorchScript exports
/// share equal weights): a bias or a scale of the model.
fn is_weight_vector(g: &Graph, tensor: &str) -> bool {
    let mut t = tensor;
    while let Some(alias) = g.producer_node(t).filter(|n| n.op() == "Identity").and_then(|n| n.input(0)) {
        t = alias;
    }
    g.constant(t).is_some_and(|c| c.dims.len() <= 1 && c.dims.iter().product::<i64>() > 1)
}

/// Removes nodes nothing reads (and the constants only they read), repeatedly.
pub fn remove_dead(g: &mut Graph) -> Result<(), PassError> {
    loop {
        let dead: Vec<NodeIndex> = g
            .nodes()
            .filter(|&id| {
                g.node(id).proto.output.iter().all(|o| o.is_empty() || (!g.is_output(o) && g.consumers(o).is_empty()))
            })
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        patch::apply(g, Patch { label: "unused nodes".into(), removals: dead, ..Default::default() })?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{float_tensor, int64_tensor, Dim, TensorType, FLOAT, INT64};
    use crate::pb;

    fn node(op: &str, name: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>) -> pb::NodeProto {
        pb::NodeProto {
            name: name.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.into()],
            attribute,
            ..Default::default()
        }
    }

    /// The mask transformers 5.9-5.17 materialise: `Where(Range(N) >= start, 0, -inf)`
    /// expanded to [B, 1, N, N] and added to the logits, then a Softmax.
    fn masked_attention(start: i64) -> Graph {
        let batch = Dim::Symbol("batch".into());
        let n = 5;
        let nodes = vec![
            node("Shape", "shape", &["x"], vec![]),
            node("Gather", "n", &["shape", "one"], vec![crate::patch::int_attr("axis", 0)]),
            node("Range", "range", &["zero", "n", "one"], vec![]),
            node("GreaterOrEqual", "keep", &["range", "start"], vec![]),
            node("Unsqueeze", "keep4", &["keep", "axes"], vec![]),
            node("Concat", "target", &["batch_dim", "ones2", "n1", "n1"], vec![crate::patch::int_attr("axis", 0)]),
            node("Expand", "mask", &["keep4", "target"], vec![]),
            node("Where", "bias", &["mask", "fzero", "fneg"], vec![]),
            node("Add", "masked", &["x", "bias"], vec![]),
            node("Softmax", "probs", &["masked"], vec![]),
        ];
        let inits = vec![
            int64_tensor("one", &[], &[1]),
            int64_tensor("zero", &[], &[0]),
            int64_tensor("start", &[], &[start]),
            int64_tensor("axes", &[3], &[0, 1, 2]),
            int64_tensor("ones2", &[1], &[1]),
            float_tensor("fzero", &[], &[0.0]),
            float_tensor("fneg", &[], &[f32::NEG_INFINITY]),
        ];
        let mut model = pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: nodes,
                initializer: inits,
                output: vec![pb::ValueInfoProto { name: "probs".into(), ..Default::default() }],
                ..Default::default()
            }),
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
            ..Default::default()
        };
        let f = |shape: Vec<Dim>| TensorType::new(FLOAT, shape);
        let i = |len: i64| TensorType::new(INT64, vec![Dim::Fixed(len)]);
        let logits = vec![batch.clone(), Dim::Fixed(1), Dim::Fixed(n), Dim::Fixed(n)];
        let types = [
            ("x", f(logits.clone())),
            ("shape", i(4)),
            ("n", TensorType::new(INT64, vec![])),
            ("range", i(n)),
            ("keep", TensorType::new(9, vec![Dim::Fixed(n)])),
            ("keep4", TensorType::new(9, vec![Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(n)])),
            ("target", i(4)),
            ("mask", TensorType::new(9, logits.clone())),
            ("bias", f(logits.clone())),
            ("masked", f(logits.clone())),
            ("probs", f(logits)),
        ];
        let mut types: std::collections::HashMap<String, TensorType> = types.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        types.insert("batch_dim".into(), i(1));
        types.insert("n1".into(), i(1));
        // The expanded shape's pieces, as constants here (exports slice them off Shape).
        let graph = model.graph.as_mut().unwrap();
        graph.initializer.push(int64_tensor("batch_dim", &[1], &[1]));
        graph.initializer.push(int64_tensor("n1", &[1], &[n]));
        Graph::take_from(&mut model, types).unwrap()
    }

    #[test]
    fn an_all_true_materialised_mask_is_seen_through() {
        let mut g = masked_attention(0);
        let seen = canonicalize(&mut g).unwrap();
        assert_eq!(seen, vec!["1 Add (all-zero mask or bias)".to_string()]);
        let softmax = g.nodes().find(|id| g.node(*id).op() == "Softmax").unwrap();
        assert_eq!(g.node(softmax).input(0), Some("x"));
        let ops: Vec<&str> = g.nodes().map(|id| g.node(id).op()).collect();
        assert_eq!(ops, vec!["Softmax"], "the mask subgraph is read by nothing and removed");
    }

    #[test]
    fn a_mask_that_hides_tokens_is_kept() {
        let mut g = masked_attention(2);
        assert!(canonicalize(&mut g).unwrap().is_empty());
        assert_eq!(g.nodes().count(), 10);
    }
}
