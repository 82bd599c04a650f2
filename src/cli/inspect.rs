//! `tome-compile inspect`: what the compiler finds in a model and what a
//! schedule would do to it, without writing anything: blocks, tokens per
//! block, MACs before and after, and the choices made.

use std::path::Path;

use serde_json::json;

use crate::targets::deploy::{validate, Target};
use crate::onnx::macs::{self, Macs};
use crate::{onnx, Error, Ops, Options, PassError, Report};

/// The result of inspecting one model under one schedule.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub report: Report,
    pub options: Options,
    pub target: Target,
    pub before: Macs,
    pub after: Macs,
    /// The flag the head needs when none was given (the plan shown is with `--unmerge`).
    pub needs: Option<String>,
}

impl Inspection {
    /// MACs of the original over MACs of the compiled model, merge cost included.
    pub fn predicted_speedup(&self) -> f64 {
        self.before.total() as f64 / self.after.total().max(1) as f64
    }
}

/// Compiles `path` in memory with `opts`, checks the result for `target`,
/// and counts MACs before and after.
pub fn inspect(path: &Path, opts: &Options, target: Target) -> Result<Inspection, Error> {
    let opts = &target.options(opts, crate::Format::Onnx);
    let mut file = onnx::io::read(path)?;
    let (prepared, types) = crate::prepare(&mut file.proto, &file.dir, opts)?;
    let before = macs::count(&file.proto, &types);
    let mut compiled = file.proto.clone();
    let mut needs = None;
    let report = match crate::compile(&mut compiled, &file.dir, opts) {
        Ok(report) => report,
        // A head that needs a flag is reported, planned as with --unmerge.
        Err(Error::Pass(e @ (PassError::TokenOutput(_) | PassError::TokenConsumer { .. }))) => {
            needs = Some(e.to_string());
            compiled = file.proto.clone();
            crate::compile(&mut compiled, &file.dir, &Options { unmerge: true, ..opts.clone() })?
        }
        Err(e) => {
            print!("{}", render_diagnosis(&file.proto, types));
            return Err(e);
        }
    };
    let report = Report { prepared, ..report };
    validate(&compiled, &file.dir, target)?;
    let after = macs::count(&compiled, &crate::infer_types(&compiled, &file.dir)?);
    Ok(Inspection { report, options: opts.clone(), target, before, after, needs })
}

/// Each attention node with the block it anchors or why it does not, for a
/// model that cannot be compiled.
fn render_diagnosis(proto: &crate::pb::ModelProto, types: std::collections::HashMap<String, tome_passes::TensorType>) -> String {
    let Ok(found) = tome_passes::diagnose(proto, types) else { return String::new() };
    let mut s = format!("attention nodes found: {}\n", found.len());
    for (name, op, result) in found {
        match result {
            Ok(block) => s += &format!("  {name} ({op}): block: {block}\n"),
            Err(why) => s += &format!("  {name} ({op}): not matched: {why}\n"),
        }
    }
    s
}

/// The human-readable report.
pub fn render(i: &Inspection) -> String {
    let r = &i.report;
    let Some(first) = r.blocks.first() else { return "no blocks\n".into() };
    let mut s = String::new();
    s += &format!(
        "{} blocks: {} heads x head dim {} = width {}\n",
        r.blocks.len(),
        first.heads,
        first.head_dim,
        first.width
    );
    s += &format!("family: {}\n", r.family);
    s += &format!(
        "tokens: {} = {} prefix + {} patches; head: {}\n",
        first.step.tokens_in, r.prefix, r.patches, r.head
    );
    if let Some(needs) = &i.needs {
        s += &format!("needs a flag: {needs}\n(the plan below is with --unmerge)\n");
    }
    for line in &r.prepared {
        s += &format!("{line}\n");
    }
    if !r.canonical.is_empty() {
        s += &format!("seen through (compute nothing here): {}\n", r.canonical.join(", "));
    }
    s += &format!(
        "choices: --r {}, proportional attention {}, target {}, {}\n",
        i.options.schedule,
        if i.options.prop_attn { "on" } else { "off" },
        i.target,
        match i.options.ops {
            Ops::Tract => "merge as one BipartiteMerge op and attention as one FusedAttention op per block (tract with tome-compile's ops only)",
            Ops::Merge => "merge as one BipartiteMerge op per block reading k, Q·Kᵀ scaled after its MatMul (OpenVINO with libtome_ov_ops; onnxruntime with libtome_ort_ops)",
            Ops::Standard => "merge as standard ops (gathers, no reducing scatter)",
            Ops::OnnxRuntime => "merge as standard ops, attention as onnxruntime's com.microsoft Attention op per block (onnxruntime only)",
            Ops::OnnxRuntimeMerge => "merge as one BipartiteMerge op, attention as onnxruntime's com.microsoft Attention op per block (onnxruntime with libtome_ort_ops)",
        }
    );
    s += &format!("{:<10} {:>5} {:>4} {:>10} {:>10}\n", "block", "asked", "r", "tokens in", "tokens out");
    for b in &r.blocks {
        s += &format!("{:<10} {:>5} {:>4} {:>10} {:>10}\n", b.name, b.step.requested, b.step.r, b.step.tokens_in, b.step.tokens_out);
    }
    s += &format!("tokens leaving the last block: {}\n", r.tokens_out);
    s += &format!("MACs per image (MatMul, Gemm, Conv): before {}\n", macs::human(i.before.total()));
    s += &format!(
        "                                     after  {} (model {} + merging {})\n",
        macs::human(i.after.total()),
        macs::human(i.after.model),
        macs::human(i.after.tome)
    );
    s += &format!(
        "predicted speedup from MACs: {:.2}x (model layers alone: {:.2}x)\n",
        i.predicted_speedup(),
        i.before.total() as f64 / i.after.model.max(1) as f64
    );
    s
}

/// The inspection as JSON, for pipelines: the compile report's fields
/// (`report_json`) and the MAC counts.
pub fn to_json(i: &Inspection) -> serde_json::Value {
    let mut value = report_json(&i.report, &i.options, i.target);
    let extra = json!({
        "macs_before": i.before.total(),
        "macs_after": i.after.total(),
        "macs_after_merging": i.after.tome,
        "predicted_speedup": i.predicted_speedup(),
        "needs": i.needs,
    });
    if let (Some(map), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
        map.extend(extra);
    }
    value
}

/// What the compiler did to a model, as JSON: blocks with their r and
/// tokens, prefix, head, and the choices made (`compile --json` prints it).
pub fn report_json(r: &Report, options: &Options, target: Target) -> serde_json::Value {
    json!({
        "blocks": r.blocks.iter().map(|b| json!({
            "name": b.name,
            "heads": b.heads,
            "head_dim": b.head_dim,
            "width": b.width,
            "r_requested": b.step.requested,
            "r": b.step.r,
            "tokens_in": b.step.tokens_in,
            "tokens_out": b.step.tokens_out,
        })).collect::<Vec<_>>(),
        "family": r.family,
        "prefix": r.prefix,
        "patches": r.patches,
        "head": r.head,
        "tokens_out": r.tokens_out,
        "schedule": options.schedule.to_string(),
        "prop_attn": options.prop_attn,
        "target": target.to_string(),
        "merged_outputs": r.merged_outputs,
        "seen_through": r.canonical,
        "prepared": r.prepared,
    })
}
