//! What TensorRT's ONNX parser (onnx-tensorrt) accepts, as data: the
//! operator table of 8.6 and 10.x (`tensorrt_ops.tsv`) and the restrictions
//! below, each with the source it was read from. `check` applies them.
//!
//! Sources (onnx/onnx-tensorrt):
//! - `docs/operators.md` at `release/8.6-GA` (6ba67d3) and `release/10.1-GA` (96e7811);
//! - the importers themselves: `builtin_op_importers.cpp` / `onnx2trt_utils.cpp`
//!   at `release/8.6-GA`, `onnxOpImporters.cpp` / `importerUtils.cpp` at `release/10.1-GA`;
//! - issues #953 and #957 (scatter reductions not honoured).

use std::fmt;

/// A TensorRT release line whose parser the rules describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrtVersion {
    V8_6,
    V10,
}

impl TrtVersion {
    pub const ALL: [TrtVersion; 2] = [TrtVersion::V8_6, TrtVersion::V10];

    /// The newest default-domain opset the version's parser documents.
    pub fn max_opset(self) -> i64 {
        match self {
            TrtVersion::V8_6 => 17,
            TrtVersion::V10 => 20,
        }
    }
}

impl fmt::Display for TrtVersion {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            TrtVersion::V8_6 => "8.6",
            TrtVersion::V10 => "10.x",
        })
    }
}

/// How bad breaking a rule is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The parser refuses the node, needs a plugin, or computes something else.
    Error,
    /// The parser accepts it with a caveat (a down-cast, an undocumented opset).
    Warning,
}

/// An attribute value as the rules compare it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Str(&'static str),
    Int(i64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "\"{s}\""),
            Value::Int(i) => write!(f, "{i}"),
        }
    }
}

/// One restriction on a node of a given op.
#[derive(Clone, Copy, Debug)]
pub enum Constraint {
    /// Input `slot`, when present, must be an initializer or a `Constant` output.
    ConstantInput { slot: usize, what: &'static str },
    /// Attribute `name` (default `default` when absent) must equal `allowed`.
    Attribute { name: &'static str, default: Value, allowed: Value },
    /// Input `slot` must be a constant no larger than `max` (checked when constant).
    ConstantAtMost { slot: usize, what: &'static str, max: i64 },
    /// The node may only use its first `count` outputs.
    OutputsAtMost { count: usize },
}

/// A restriction, the versions it applies to, what happens when it is broken
/// and where it comes from.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub op: &'static str,
    pub versions: &'static [TrtVersion],
    pub constraint: Constraint,
    pub severity: Severity,
    /// What the parser does when the rule is broken.
    pub effect: &'static str,
    pub source: &'static str,
}

use Constraint::*;
use TrtVersion::{V10, V8_6};

const BOTH: &[TrtVersion] = &[V8_6, V10];
const OPS_101: &str = "onnx-tensorrt release/10.1-GA docs/operators.md";
const OPS_BOTH: &str = "onnx-tensorrt docs/operators.md, release/8.6-GA and release/10.1-GA";

/// The restrictions beyond "the op is in the table with this input type".
pub static RULES: &[Rule] = &[
    Rule {
        op: "ScatterElements",
        versions: &[V8_6],
        constraint: Attribute { name: "reduction", default: Value::Str("none"), allowed: Value::Str("none") },
        severity: Severity::Error,
        effect: "the parser ignores `reduction` and builds a plain scatter: duplicate indices overwrite instead of \
                 accumulating (silently wrong results); sum with a one-hot MatMul instead",
        source: "onnx-tensorrt release/8.6-GA builtin_op_importers.cpp ScatterElements importer reads only `axis`; \
                 onnx/onnx-tensorrt#953",
    },
    Rule {
        op: "ScatterElements",
        versions: &[V10],
        constraint: Attribute { name: "reduction", default: Value::Str("none"), allowed: Value::Str("none") },
        severity: Severity::Error,
        effect: "the parser routes a reducing ScatterElements to the ScatterElements plugin (not a built-in layer); \
                 sum with a one-hot MatMul instead",
        source: "onnx-tensorrt release/10.1-GA onnxOpImporters.cpp ScatterElements -> scatterPluginHelper; \
                 TensorRT plugin/scatterElementsPlugin README",
    },
    Rule {
        op: "ScatterND",
        versions: &[V8_6],
        constraint: Attribute { name: "reduction", default: Value::Str("none"), allowed: Value::Str("none") },
        severity: Severity::Error,
        effect: "the parser lowers ScatterND to IScatterLayer, which has no reduction: the reduction is ignored \
                 (silently wrong results)",
        source: "onnx/onnx-tensorrt#957 (TensorRT 8.6.1); release/8.6-GA builtin_op_importers.cpp ScatterND importer",
    },
    Rule {
        op: "ScatterND",
        versions: &[V10],
        constraint: Attribute { name: "reduction", default: Value::Str("none"), allowed: Value::Str("none") },
        severity: Severity::Error,
        effect: "the parser refuses the node (\"Attribute reduction is not supported\")",
        source: OPS_101,
    },
    Rule {
        op: "TopK",
        versions: BOTH,
        constraint: ConstantInput { slot: 1, what: "K" },
        severity: Severity::Error,
        effect: "K must be known when the engine is built",
        source: "onnx-tensorrt release/8.4-GA docs/operators.md (`K` input must be an initializer); TOME_SPEC.md",
    },
    Rule {
        op: "TopK",
        versions: &[V10],
        constraint: ConstantAtMost { slot: 1, what: "K", max: 3839 },
        severity: Severity::Error,
        effect: "`K` input must be less than 3840",
        source: OPS_101,
    },
    Rule {
        op: "TopK",
        versions: &[V10],
        constraint: Attribute { name: "sorted", default: Value::Int(1), allowed: Value::Int(1) },
        severity: Severity::Error,
        effect: "`sorted` must be 1",
        source: OPS_101,
    },
    Rule {
        op: "Slice",
        versions: BOTH,
        constraint: ConstantInput { slot: 3, what: "axes" },
        severity: Severity::Error,
        effect: "`axes` must be an initializer (\"does not support dynamic axes\")",
        source: OPS_BOTH,
    },
    Rule {
        op: "Squeeze",
        versions: BOTH,
        constraint: ConstantInput { slot: 1, what: "axes" },
        severity: Severity::Error,
        effect: "`axes` must be an initializer",
        source: OPS_BOTH,
    },
    Rule {
        op: "Unsqueeze",
        versions: BOTH,
        constraint: ConstantInput { slot: 1, what: "axes" },
        severity: Severity::Error,
        effect: "`axes` must be a constant tensor",
        source: OPS_BOTH,
    },
    reduce_axes_rule("ReduceL1"),
    reduce_axes_rule("ReduceL2"),
    reduce_axes_rule("ReduceLogSum"),
    reduce_axes_rule("ReduceLogSumExp"),
    reduce_axes_rule("ReduceMax"),
    reduce_axes_rule("ReduceMean"),
    reduce_axes_rule("ReduceMin"),
    reduce_axes_rule("ReduceProd"),
    reduce_axes_rule("ReduceSum"),
    reduce_axes_rule("ReduceSumSquare"),
    Rule {
        op: "CumSum",
        versions: BOTH,
        constraint: ConstantInput { slot: 1, what: "axis" },
        severity: Severity::Error,
        effect: "`axis` must be an initializer",
        source: OPS_BOTH,
    },
    Rule {
        op: "Pad",
        versions: &[V10],
        constraint: ConstantInput { slot: 3, what: "axes" },
        severity: Severity::Error,
        effect: "`axes` must be an initializer",
        source: OPS_101,
    },
    Rule {
        op: "OneHot",
        versions: &[V10],
        constraint: ConstantInput { slot: 1, what: "depth" },
        severity: Severity::Error,
        effect: "`depth` must be a build-time constant",
        source: OPS_101,
    },
    Rule {
        op: "Dropout",
        versions: &[V10],
        constraint: ConstantInput { slot: 2, what: "training_mode" },
        severity: Severity::Error,
        effect: "`training_mode` must be an initializer and evaluate to False",
        source: OPS_101,
    },
    Rule {
        op: "MaxPool",
        versions: BOTH,
        constraint: OutputsAtMost { count: 1 },
        severity: Severity::Error,
        effect: "the `Indices` output tensor is unsupported",
        source: OPS_BOTH,
    },
    Rule {
        op: "LayerNormalization",
        versions: &[V10],
        constraint: OutputsAtMost { count: 1 },
        severity: Severity::Error,
        effect: "only the first output `Y` is supported",
        source: OPS_101,
    },
    Rule {
        op: "Resize",
        versions: &[V10],
        constraint: Attribute { name: "antialias", default: Value::Int(0), allowed: Value::Int(0) },
        severity: Severity::Error,
        effect: "antialiasing is not supported",
        source: OPS_101,
    },
    Rule {
        op: "LSTM",
        versions: &[V10],
        constraint: Attribute { name: "layout", default: Value::Int(0), allowed: Value::Int(0) },
        severity: Severity::Error,
        effect: "`layout` attribute must be 0",
        source: OPS_101,
    },
];

/// Reduce* axes: 8.6 asserts "Axis input must be an initializer!"; 10.x documents it.
/// Every Reduce* op takes its axes as input 1 (opset 18; ReduceSum from 13),
/// which TensorRT's `reduceTensor` requires to be an initializer.
const fn reduce_axes_rule(op: &'static str) -> Rule {
    Rule {
        op,
        versions: BOTH,
        constraint: ConstantInput { slot: 1, what: "axes" },
        severity: Severity::Error,
        effect: "`axes` must be an initializer",
        source: REDUCE_SOURCE,
    }
}

const REDUCE_SOURCE: &str =
    "onnx-tensorrt release/8.6-GA onnx2trt_utils.cpp reduceTensor (\"Axis input must be an initializer!\"); \
     release/10.1-GA docs/operators.md";

/// Where the opset limits and the data-type notes come from.
pub const OPSET_SOURCE: &str = "onnx-tensorrt docs/operators.md headers: 8.6 \"supports operators up to Opset 17\"; \
     10.0/10.1 \"inclusive range of opset 9 to opset 20\"";
pub const INT64_SOURCE: &str = "onnx-tensorrt release/8.6-GA docs/operators.md: INT64 is cast down to INT32, \
     clamping values to +-INT_MAX; onnx2trt_utils.cpp convertDtype maps INT64 to kINT32";
pub const TABLE_SOURCE: &str = "src/targets/tensorrt_ops.tsv, from onnx-tensorrt docs/operators.md (release/8.6-GA, release/10.1-GA)";

/// One operator's row: supported and input types per version.
#[derive(Clone, Debug, PartialEq)]
pub struct OpSupport {
    pub op: String,
    /// `Some(types)` when supported, `None` when listed as unsupported or not listed.
    pub v8_6: Option<Vec<String>>,
    pub v10: Option<Vec<String>>,
    /// Whether each version's table lists the op at all.
    pub listed: (bool, bool),
}

impl OpSupport {
    pub fn types(&self, v: TrtVersion) -> Option<&[String]> {
        match v {
            TrtVersion::V8_6 => self.v8_6.as_deref(),
            TrtVersion::V10 => self.v10.as_deref(),
        }
    }
    pub fn listed(&self, v: TrtVersion) -> bool {
        match v {
            TrtVersion::V8_6 => self.listed.0,
            TrtVersion::V10 => self.listed.1,
        }
    }
}

/// The operator table, parsed from `tensorrt_ops.tsv`.
pub fn op_table() -> Vec<OpSupport> {
    include_str!("tensorrt_ops.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('\t').collect();
            let [op, s86, t86, s10, t10] = cells.as_slice() else { return None };
            let types = |s: &str, t: &str| {
                (s == "Y").then(|| t.split(',').filter(|x| *x != "-").map(str::to_string).collect())
            };
            Some(OpSupport {
                op: op.to_string(),
                v8_6: types(s86, t86),
                v10: types(s10, t10),
                listed: (*s86 != "-", *s10 != "-"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_parses_every_row_and_knows_the_merge_ops() {
        let table = op_table();
        assert!(table.len() > 180, "{} rows", table.len());
        for op in ["MatMul", "GatherND", "GatherElements", "TopK", "ArgMax", "Equal", "ReduceL2", "Expand"] {
            let row = table.iter().find(|r| r.op == op).expect(op);
            assert!(row.v8_6.is_some() && row.v10.is_some(), "{op}");
        }
        let gelu = table.iter().find(|r| r.op == "Gelu").unwrap();
        assert!(!gelu.listed(TrtVersion::V8_6) && gelu.types(TrtVersion::V10).is_some());
    }
}
