//! Where a compiled model goes: the deployment target it must satisfy, the
//! file format it is written in, and the in-memory entry point for pipelines.
//!
//! One standard-op graph form serves TensorRT and `portable`.
//! The ToMe rewrite already avoids what TensorRT's ONNX parser mishandles (no
//! reducing scatter, constant TopK K, constant axes, static token dims; see
//! `tensorrt_rules`), so for those `--target` selects what the result is
//! checked against before anything is written. `--target tract` (ONNX
//! format) fuses each block's matching and merge into one `ai.tome`
//! `BipartiteMerge` node and adds the proportional-attention bias with a
//! `ProportionalBias` node, which tract runs with tome-compile's ops
//! (`tract_ops`) and no other runtime knows. `--target onnxruntime` writes
//! each attention as onnxruntime's own `Attention` op. `--target
//! openvino-ops` fuses the merge for OpenVINO with tome-compile's plugin
//! (`plugins/`), and `--target onnxruntime-ops` both, for onnxruntime with it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use prost::Message;
use tome_passes::pb;
use tract_onnx::prelude::*;

use crate::targets::check::{check_tensorrt, CheckReport};
use crate::targets::tensorrt_rules::TrtVersion;
use crate::{onnx, runtime::verify, Error, Ops, Options, Report};

/// The runtime a compiled model is meant for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// The form every supported runtime accepts; checked by tract only.
    #[default]
    Portable,
    /// TensorRT 8.6 and 10.x: the result must pass `check --target tensorrt`.
    TensorRt,
    /// onnxruntime: each attention as its `com.microsoft` `Attention` op.
    OnnxRuntime,
    /// onnxruntime with tome-compile's custom-op library
    /// (`libtome_ort_ops`): each block's matching and merge in one node,
    /// and each attention as onnxruntime's `Attention` op.
    OnnxRuntimeOps,
    /// OpenVINO with tome-compile's extension (`libtome_ov_ops`): each
    /// block's matching and merge in one node.
    OpenVinoOps,
    /// tract with tome-compile's ops (`tract_ops::onnx`): the matching and
    /// merge of each block in one node, the proportional bias in another.
    Tract,
}

impl Target {
    /// `opts` as this target and format compile them: only ONNX for tract
    /// fuses the merge (tract's NNEF writer has no serialiser for the op).
    pub fn options(self, opts: &Options, format: Format) -> Options {
        let ops = match (self, format) {
            (Target::Tract, Format::Onnx) => Ops::Tract,
            (Target::OnnxRuntime, _) => Ops::OnnxRuntime,
            (Target::OnnxRuntimeOps, _) => Ops::OnnxRuntimeMerge,
            (Target::OpenVinoOps, _) => Ops::Merge,
            _ => Ops::Standard,
        };
        Options { ops, ..opts.clone() }
    }
}

impl FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "portable" => Ok(Target::Portable),
            "tensorrt" | "trt" => Ok(Target::TensorRt),
            "onnxruntime" | "ort" => Ok(Target::OnnxRuntime),
            "onnxruntime-ops" => Ok(Target::OnnxRuntimeOps),
            "openvino-ops" => Ok(Target::OpenVinoOps),
            "tract" => Ok(Target::Tract),
            _ => Err(Error::Input(format!("unknown target '{s}': expected tensorrt, onnxruntime, onnxruntime-ops, openvino-ops, tract or portable"))),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Target::Portable => "portable",
            Target::TensorRt => "tensorrt",
            Target::OnnxRuntime => "onnxruntime",
            Target::OnnxRuntimeOps => "onnxruntime-ops",
            Target::OpenVinoOps => "openvino-ops",
            Target::Tract => "tract",
        })
    }
}

/// The file format of the compiled model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Onnx,
    /// tract's NNEF archive (a tar of `graph.nnef` and `.dat` tensors).
    Nnef,
}

/// Checks a compiled model against what `target` demands.
pub fn validate(proto: &pb::ModelProto, dir: &Path, target: Target) -> Result<(), Error> {
    if target != Target::TensorRt {
        return Ok(());
    }
    let types = crate::infer_types(proto, dir)?;
    let report = check_tensorrt(proto, Some(&types), &TrtVersion::ALL);
    if report.passed() {
        return Ok(());
    }
    Err(Error::Target { target: target.to_string(), findings: describe_errors(&report) })
}

fn describe_errors(report: &CheckReport) -> String {
    let errors: Vec<String> = report.errors().map(|f| f.to_string()).collect();
    errors.join("; ")
}

/// Reads `input`, compiles it, checks it for `target` and writes `output`
/// in `format`, verifying the result when it is cheap (`verify::Mode::Auto`).
/// Nothing is written on error.
pub fn compile_file_with(
    input: &Path,
    output: &Path,
    opts: &Options,
    target: Target,
    format: Format,
) -> Result<Report, Error> {
    let file = FileOptions { target, format, verify: verify::Mode::Auto };
    compile_file_checked(input, output, opts, &file).map(|c| c.report)
}

/// How `compile_file_checked` checks and writes its result.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    pub target: Target,
    pub format: Format,
    pub verify: verify::Mode,
}

/// What `compile_file_checked` did: the compiler's report and the verification.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub report: Report,
    pub verification: verify::Outcome,
}

/// `compile_file_with` with every choice explicit, `file.verify` included:
/// `On` always runs the original and compiled models once in tract (see
/// `verify`), `Off` never does. A panic inside comes back as `Error::Panic`.
pub fn compile_file_checked(input: &Path, output: &Path, opts: &Options, file: &FileOptions) -> Result<Compiled, Error> {
    let (target, format) = (file.target, file.format);
    onnx::io::check_output_path(input, output)?;
    if format == Format::Nnef && !matches!(target, Target::Tract | Target::Portable) {
        return Err(Error::Input(format!(
            "--format nnef writes tract's NNEF archive, which {target} does not read; use --format onnx, or --target tract"
        )));
    }
    let opts = &target.options(opts, format);
    crate::runtime::guard::catch_panics("compiling the model", || {
        let mut model = onnx::io::read(input)?;
        let (prepared, types) = crate::prepare(&mut model.proto, &model.dir, opts)?;
        let skip = verify::skip_reason(file.verify, &model.proto, &types);
        let original = skip.is_none().then(|| model.proto.clone());
        let (mut report, _) = crate::rewrite(&mut model.proto, &model.dir, types, opts)?;
        report.prepared = prepared;
        validate(&model.proto, &model.dir, target)?;
        let verification = match original {
            Some(original) => verify::verify(&original, &model.proto, &model.dir, opts, &report, file.verify == verify::Mode::On)?,
            None => verify::Outcome::Skipped(skip.unwrap_or_default()),
        };
        match format {
            Format::Onnx => onnx::io::write(&mut model.proto, &model.dir, output)?,
            Format::Nnef => {
                let bytes = nnef_archive(&model.proto, &model.dir)?;
                onnx::io::write_atomic(output, &bytes)?;
            }
        }
        Ok(Compiled { report, verification })
    })
}

/// Compiles a self-contained ONNX model held in memory; returns the compiled
/// model's bytes and what was done. For pipelines that keep models in memory.
///
/// Weights must be inline: a model whose tensors live in external data files
/// is refused, naming the first such tensor; compile those with
/// [`crate::compile_file`] (which writes `OUT.data`) or with [`crate::compile`]
/// and the folder the data files are in.
///
/// ```
/// let bytes = std::fs::read("fixtures/timm_vit/model.onnx")?;
/// let opts = tome_compile::Options { schedule: "16".parse()?, prop_attn: true, unmerge: false, merged_tokens: false, image_size: None, bound: false, ops: tome_compile::Ops::Standard };
/// let (compiled, report) = tome_compile::compile_bytes(&bytes, &opts)?;
/// assert_eq!(report.tokens_out, 101); // 197 tokens, 16 merged in each of 6 blocks
/// assert!(!compiled.is_empty()); // ONNX bytes, ready to write or hand to a runtime
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn compile_bytes(bytes: &[u8], opts: &Options) -> Result<(Vec<u8>, Report), Error> {
    compile_bytes_for(bytes, opts, Target::Portable)
}

/// [`compile_bytes`], checking the result for `target` (see [`Target`]).
pub fn compile_bytes_for(bytes: &[u8], opts: &Options, target: Target) -> Result<(Vec<u8>, Report), Error> {
    let mut proto =
        onnx::io::decode(bytes).map_err(|why| Error::NotOnnx { path: "<bytes given to compile_bytes>".into(), why })?;
    let external = proto.graph.iter().flat_map(|g| &g.initializer).find(|t| t.data_location == Some(1));
    if let Some(t) = external {
        return Err(Error::ExternalData {
            tensor: t.name.clone(),
            why: "compile_bytes takes self-contained models; this one keeps weights in external files: \
                  use compile_file, or compile with the folder of its data files"
                .into(),
        });
    }
    let here = Path::new(".");
    let report = crate::compile(&mut proto, here, &target.options(opts, Format::Onnx))?;
    validate(&proto, here, target)?;
    Ok((proto.encode_to_vec(), report))
}

/// tract's NNEF archive of a model: typed, decluttered, then serialised with
/// the tract_onnx and tract_transformers extensions (tract_core is on by default), so
/// `tract_nnef::nnef().with_onnx()` (or the `tract` CLI) loads it back.
pub fn nnef_archive(proto: &pb::ModelProto, dir: &Path) -> Result<Vec<u8>, Error> {
    let nnef_err = |e: TractError| Error::Nnef(format!("{e:#}"));
    let parsed = crate::runtime::tract_ops::onnx().parse(proto, dir.to_str()).map_err(nnef_err)?;
    let mut typed = parsed.model.into_typed().and_then(|m| m.into_decluttered()).map_err(nnef_err)?;
    expand_gelu_exact(&mut typed).map_err(nnef_err)?;
    let typed = typed.into_compact().map_err(nnef_err)?;
    nnef_framework().write_to_tar(&typed, Vec::new()).map_err(nnef_err)
}

/// tract's declutter fuses exact GELU into one `GeluExact` op, which its own
/// NNEF writer cannot serialise (tract 0.23.9: "No serializer found"); this
/// spells each one out again as `x·0.5·(1 + erf(x·(1/√2)))`, ops NNEF has.
fn expand_gelu_exact(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::{math, nn::GeluExact};
    let fused: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<GeluExact>()))
        .map(|n| n.id)
        .collect();
    for id in fused {
        let name = model.node(id).name.clone();
        let input = model.node(id).inputs[0];
        let dt = model.outlet_fact(input)?.datum_type;
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let konst = |patch: &mut TypedModelPatch, what: &str, v: f32| -> TractResult<OutletId> {
            patch.add_const(format!("{name}.{what}"), tensor0(v).cast_to_dt(dt)?.into_owned())
        };
        let inv_sqrt2 = konst(&mut patch, "inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2)?;
        let one = konst(&mut patch, "one", 1.0)?;
        let half = konst(&mut patch, "half", 0.5)?;
        let scaled = wire_with_rank_broadcast(format!("{name}.scaled"), &mut patch, math::mul(), &[x, inv_sqrt2])?[0];
        let erf = patch.wire_node(format!("{name}.erf"), ElementWiseOp(Box::new(math::Erf {}), None), &[scaled])?[0];
        let erf_plus_one = wire_with_rank_broadcast(format!("{name}.erf_plus_one"), &mut patch, math::add(), &[erf, one])?[0];
        let half_x = wire_with_rank_broadcast(format!("{name}.half_x"), &mut patch, math::mul(), &[x, half])?[0];
        let y = patch.wire_node(format!("{name}.gelu"), math::mul(), &[half_x, erf_plus_one])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The NNEF framework with every extension a decluttered ONNX model may use.
pub fn nnef_framework() -> tract_nnef::framework::Nnef {
    use tract_onnx::WithOnnx;
    use tract_transformers::WithTractTransformers;
    tract_nnef::nnef().with_onnx().with_tract_transformers()
}
