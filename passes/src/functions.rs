//! Model-local functions inlined into the graph before anything is
//! inferred: torch 2.4's `dynamo_export` writes the model as one call of
//! nested functions (one per module). Each call becomes the function's
//! nodes, their inner tensors and names prefixed with the call's name. An
//! attribute that refers to one the call does not give is left out (the
//! ONNX types tract reads carry no function defaults).

use std::collections::HashMap;

use crate::pb;
use crate::PassError;

/// Calls nested deeper than this are refused (a function calling itself).
const MAX_DEPTH: usize = 64;

/// Inlines every call of a model-local function; returns how many calls.
pub fn inline(model: &mut pb::ModelProto) -> Result<usize, PassError> {
    if model.functions.is_empty() {
        return Ok(0);
    }
    let functions: HashMap<(String, String), pb::FunctionProto> = model
        .functions
        .iter()
        .map(|f| ((f.domain.clone().unwrap_or_default(), f.name.clone().unwrap_or_default()), f.clone()))
        .collect();
    let graph = model.graph.as_mut().ok_or(PassError::NoGraph)?;
    let mut calls = 0;
    let mut nodes = std::mem::take(&mut graph.node);
    for _ in 0..MAX_DEPTH {
        let mut expanded = Vec::with_capacity(nodes.len());
        let mut any = false;
        for node in nodes {
            match functions.get(&(node.domain.clone(), node.op_type.clone())) {
                Some(f) => {
                    expanded.extend(body(f, &node));
                    calls += 1;
                    any = true;
                }
                None => expanded.push(node),
            }
        }
        nodes = expanded;
        if !any {
            graph.node = nodes;
            model.functions.clear();
            return Ok(calls);
        }
    }
    Err(PassError::Unsupported(format!("model-local functions nest deeper than {MAX_DEPTH} calls (a function calls itself?)")))
}

/// The nodes of `f` as called by `call`.
fn body(f: &pb::FunctionProto, call: &pb::NodeProto) -> Vec<pb::NodeProto> {
    let mut names: HashMap<&str, String> = HashMap::new();
    for (k, formal) in f.input.iter().enumerate() {
        names.insert(formal, call.input.get(k).cloned().unwrap_or_default());
    }
    for (k, formal) in f.output.iter().enumerate() {
        names.insert(formal, call.output.get(k).cloned().unwrap_or_default());
    }
    let rename = |t: &String| match names.get(t.as_str()) {
        Some(actual) => actual.clone(),
        None if t.is_empty() => String::new(),
        None => format!("{}/{t}", call.name),
    };
    let given: HashMap<&str, &pb::AttributeProto> = call.attribute.iter().map(|a| (a.name.as_str(), a)).collect();
    f.node
        .iter()
        .map(|n| {
            let mut n = n.clone();
            n.name = format!("{}/{}", call.name, n.name);
            n.input = n.input.iter().map(rename).collect();
            n.output = n.output.iter().map(rename).collect();
            n.attribute = n
                .attribute
                .iter()
                .filter_map(|a| match a.ref_attr_name.as_str() {
                    "" => Some(a.clone()),
                    r => given.get(r).map(|v| pb::AttributeProto { name: a.name.clone(), ..(*v).clone() }),
                })
                .collect();
            n
        })
        .collect()
}
