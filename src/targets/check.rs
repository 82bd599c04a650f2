//! `tome-compile check`: does TensorRT's ONNX parser accept a model? Applies
//! the table and restrictions of `tensorrt_rules` to every node and names
//! each node that breaks one, with the rule's source.

use std::collections::{HashMap, HashSet};
use std::fmt;

use tome_passes::{pb, TensorType};

use crate::targets::tensorrt_rules::{self, Constraint, OpSupport, Severity, TrtVersion, Value};

/// One broken rule at one node.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// The node's name, or its first output when it has none; `(model)` for model-wide findings.
    pub node: String,
    pub op: String,
    pub versions: Vec<TrtVersion>,
    pub severity: Severity,
    pub why: String,
    pub source: &'static str,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let versions: Vec<String> = self.versions.iter().map(|v| v.to_string()).collect();
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{level}: node {} ({}), TensorRT {}: {} [source: {}]",
            self.node,
            self.op,
            versions.join(", "),
            self.why,
            self.source
        )
    }
}

/// Findings of a check, errors first.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub findings: Vec<Finding>,
    pub nodes: usize,
}

impl CheckReport {
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity == Severity::Error)
    }
    pub fn passed(&self) -> bool {
        self.errors().next().is_none()
    }
}

/// Checks `model` against the TensorRT parser rules of `versions`. `types`
/// (from tract's inference) enables the input data-type checks; without it
/// only initializer and Constant types are known.
pub fn check_tensorrt(
    model: &pb::ModelProto,
    types: Option<&HashMap<String, TensorType>>,
    versions: &[TrtVersion],
) -> CheckReport {
    let Some(graph) = model.graph.as_ref() else { return CheckReport::default() };
    let table: HashMap<String, OpSupport> = tensorrt_rules::op_table().into_iter().map(|r| (r.op.clone(), r)).collect();
    let consts = Constants::new(graph);
    let opset = tome_passes::graph::default_opset(model);
    let mut raw: Vec<(Finding, TrtVersion)> = vec![];
    for &v in versions {
        if opset > v.max_opset() {
            let f = finding(
                "(model)",
                "opset",
                Severity::Warning,
                format!(
                    "the default domain is at opset {opset}; TensorRT {v}'s parser documents opsets up to {} \
                     (ops whose newer versions it does not know may be refused)",
                    v.max_opset()
                ),
                tensorrt_rules::OPSET_SOURCE,
            );
            raw.push((f, v));
        }
        for node in &graph.node {
            for f in check_node(node, v, &table, &consts, types) {
                raw.push((f, v));
            }
        }
    }
    // One line per (node, finding) with the versions it applies to.
    let mut findings: Vec<Finding> = vec![];
    for (f, v) in raw {
        match findings.iter_mut().find(|g| g.node == f.node && g.why == f.why && g.severity == f.severity) {
            Some(g) => g.versions.push(v),
            None => findings.push(Finding { versions: vec![v], ..f }),
        }
    }
    findings.sort_by_key(|f| f.severity);
    CheckReport { findings, nodes: graph.node.len() }
}

fn finding(node: &str, op: &str, severity: Severity, why: String, source: &'static str) -> Finding {
    Finding { node: node.to_string(), op: op.to_string(), versions: vec![], severity, why, source }
}

fn node_label(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        format!("<unnamed, output {}>", node.output.first().map(String::as_str).unwrap_or("?"))
    } else {
        node.name.clone()
    }
}

fn check_node(
    node: &pb::NodeProto,
    v: TrtVersion,
    table: &HashMap<String, OpSupport>,
    consts: &Constants,
    types: Option<&HashMap<String, TensorType>>,
) -> Vec<Finding> {
    let name = node_label(node);
    let op = node.op_type.as_str();
    let mut out = vec![];
    let mut push = |severity, why: String, source| out.push(finding(&name, op, severity, why, source));
    if !(node.domain.is_empty() || node.domain == "ai.onnx") {
        push(
            Severity::Error,
            format!("op {op} of domain {} is not an ONNX operator; TensorRT would need a plugin named {op}", node.domain),
            tensorrt_rules::TABLE_SOURCE,
        );
        return out;
    }
    let Some(row) = table.get(op).filter(|r| r.listed(v)) else {
        push(Severity::Error, format!("{op} is not in TensorRT {v}'s operator table"), tensorrt_rules::TABLE_SOURCE);
        return out;
    };
    let Some(supported) = row.types(v) else {
        push(Severity::Error, format!("{op} is listed as unsupported in TensorRT {v}"), tensorrt_rules::TABLE_SOURCE);
        return out;
    };
    for (tensor, elem) in typed_operands(node, consts, types) {
        let name = trt_type_name(elem, v);
        if !supported.iter().any(|s| s == name) {
            push(
                Severity::Warning,
                format!(
                    "{tensor} is {}; TensorRT {v} documents {op} for {} only",
                    onnx_type_name(elem),
                    supported.join(", ")
                ),
                tensorrt_rules::TABLE_SOURCE,
            );
        }
    }
    for rule in tensorrt_rules::RULES.iter().filter(|r| r.op == op && r.versions.contains(&v)) {
        if let Some(why) = broken(node, &rule.constraint, consts) {
            push(rule.severity, format!("{why}: {}", rule.effect), rule.source);
        }
    }
    if v == TrtVersion::V8_6 {
        for (slot, input) in node.input.iter().enumerate() {
            let benign = op == "Slice" && (slot == 1 || slot == 2);
            if let (false, Some(values)) = (benign, consts.i64_values(input)) {
                if values.iter().any(|x| i32::try_from(*x).is_err()) {
                    push(
                        Severity::Warning,
                        format!("int64 constant {input} holds values outside int32; TensorRT 8.6 clamps them to +-INT_MAX"),
                        tensorrt_rules::INT64_SOURCE,
                    );
                }
            }
        }
    }
    out
}

/// The tensors whose element type decides support: input 0 for most ops,
/// the selected values for `Where`, the value for `Constant`/`ConstantOfShape`,
/// both sides of a `Cast`.
fn typed_operands(
    node: &pb::NodeProto,
    consts: &Constants,
    types: Option<&HashMap<String, TensorType>>,
) -> Vec<(String, i32)> {
    let elem = |t: &str| -> Option<i32> {
        types.and_then(|m| m.get(t)).map(|t| t.elem).filter(|e| *e != 0).or_else(|| consts.elem(t))
    };
    let value_attr = || node.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()).map(|t| t.data_type);
    let tensors: Vec<&str> = match node.op_type.as_str() {
        "Where" => node.input.get(1).into_iter().map(String::as_str).collect(),
        "Constant" | "ConstantOfShape" => {
            let out = node.output.first().cloned().unwrap_or_default();
            // ConstantOfShape fills float32 zeros when it has no value.
            let elem = value_attr().or((node.op_type == "ConstantOfShape").then_some(1));
            return elem.map(|e| vec![(out, e)]).unwrap_or_default();
        }
        "Cast" => node.input.iter().take(1).chain(node.output.iter().take(1)).map(String::as_str).collect(),
        _ => node.input.iter().take(1).map(String::as_str).collect(),
    };
    tensors.into_iter().filter(|t| !t.is_empty()).filter_map(|t| Some((t.to_string(), elem(t)?))).collect()
}

/// The name TensorRT's table uses for an ONNX element type, after the
/// parser's own conversions (DOUBLE to FLOAT; INT64 to INT32 before 10).
fn trt_type_name(elem: i32, v: TrtVersion) -> &'static str {
    match (elem, v) {
        (7, TrtVersion::V8_6) => "INT32",
        (11, _) => "FP32",
        _ => onnx_type_name(elem),
    }
}

fn onnx_type_name(elem: i32) -> &'static str {
    match elem {
        1 => "FP32",
        2 => "UINT8",
        3 => "INT8",
        6 => "INT32",
        7 => "INT64",
        9 => "BOOL",
        10 => "FP16",
        11 => "DOUBLE",
        16 => "BF16",
        _ => "an unsupported type",
    }
}

/// Why `node` breaks `constraint`, if it does.
fn broken(node: &pb::NodeProto, constraint: &Constraint, consts: &Constants) -> Option<String> {
    let input = |slot: usize| node.input.get(slot).filter(|s| !s.is_empty());
    match *constraint {
        Constraint::ConstantInput { slot, what } => {
            let t = input(slot)?;
            (!consts.contains(t)).then(|| format!("input {slot} ({what}) {t} is computed at run time"))
        }
        Constraint::ConstantAtMost { slot, what, max } => {
            let t = input(slot)?;
            let big = consts.i64_values(t)?.into_iter().find(|x| *x > max)?;
            Some(format!("input {slot} ({what}) is {big}"))
        }
        Constraint::Attribute { name, default, allowed } => {
            let (actual, ok) = match (node.attribute.iter().find(|a| a.name == name), allowed) {
                (None, _) => (default.to_string(), default == allowed),
                (Some(a), Value::Str(s)) => {
                    let v = String::from_utf8_lossy(&a.s).to_string();
                    (format!("\"{v}\""), v == s)
                }
                (Some(a), Value::Int(i)) => (a.i.to_string(), a.i == i),
            };
            (!ok).then(|| format!("attribute {name}={actual} (TensorRT accepts only {allowed})"))
        }
        Constraint::OutputsAtMost { count } => {
            let extra = node.output.iter().skip(count).find(|o| !o.is_empty())?;
            Some(format!("output {extra} beyond the first {count} is used"))
        }
    }
}

/// Initializers and `Constant` outputs of a graph.
struct Constants<'g> {
    values: HashMap<&'g str, &'g pb::TensorProto>,
    names: HashSet<&'g str>,
    ints: HashMap<&'g str, Vec<i64>>,
}

impl<'g> Constants<'g> {
    fn new(graph: &'g pb::GraphProto) -> Self {
        let mut values: HashMap<&str, &pb::TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut names: HashSet<&str> = values.keys().copied().collect();
        let mut ints = HashMap::new();
        for node in graph.node.iter().filter(|n| n.op_type == "Constant" && n.domain.is_empty()) {
            let Some(out) = node.output.first() else { continue };
            names.insert(out.as_str());
            for a in &node.attribute {
                match a.name.as_str() {
                    "value" => {
                        if let Some(t) = a.t.as_ref() {
                            values.insert(out.as_str(), t);
                        }
                    }
                    "value_ints" => {
                        ints.insert(out.as_str(), a.ints.clone());
                    }
                    "value_int" => {
                        ints.insert(out.as_str(), vec![a.i]);
                    }
                    _ => {}
                }
            }
        }
        Constants { values, names, ints }
    }

    fn contains(&self, t: &str) -> bool {
        self.names.contains(t)
    }

    fn elem(&self, t: &str) -> Option<i32> {
        self.values.get(t).map(|v| v.data_type).or_else(|| self.ints.get(t).map(|_| 7))
    }

    fn i64_values(&self, t: &str) -> Option<Vec<i64>> {
        if let Some(v) = self.ints.get(t) {
            return Some(v.clone());
        }
        self.values.get(t).and_then(|v| if v.data_type == 7 { tome_passes::graph::tensor_i64(v) } else { None })
    }
}
