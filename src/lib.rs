//! tome-compile as a library: ONNX in, Token Merging ONNX out, and a tract
//! runner for the result. The graph work lives in `tome_passes`; this crate
//! does file I/O, type inference (with tract) and execution.

pub mod cli;
pub mod onnx;
pub mod runtime;
pub mod targets;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tome_passes::{pb, Dim, TensorType};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

pub use targets::deploy::{compile_bytes, compile_bytes_for, compile_file_checked, compile_file_with, Compiled, FileOptions, Format, Target};
pub use tome_passes::{Ops, Options, PassError, Report, Schedule};

/// Errors a user can cause; each names the file, tensor or node involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a readable ONNX model: {why}")]
    NotOnnx { path: PathBuf, why: String },
    #[error("external data of tensor {tensor}: {why}")]
    ExternalData { tensor: String, why: String },
    #[error("the output path {0} is the input model; choose another -o")]
    OutputIsInput(PathBuf),
    #[error("writing {0} would replace the input's external data; choose another -o")]
    OutputIsInputData(PathBuf),
    #[error("{what}: {why}; the model is probably corrupt")]
    TooLarge { what: String, why: String },
    #[error("invalid graph: {0}")]
    Graph(String),
    #[error("tract cannot infer the model's shapes: {0}")]
    Shapes(String),
    #[error(transparent)]
    Pass(#[from] PassError),
    /// tract's type check of the compiled graph failed, before anything ran.
    #[error("the compiled graph does not type-check in tract ({0}); this is a tome-compile bug, please report it with the model")]
    TypeCheck(String),
    #[error("{0}")]
    Input(String),
    #[error("tract failed to run the model: {0}")]
    Run(String),
    #[error("the model does not meet target {target}: {findings}")]
    Target { target: String, findings: String },
    #[error("tract cannot write the model as NNEF: {0}")]
    Nnef(String),
    /// `--verify` ran the compiled model and found it wrong.
    #[error("verification failed, nothing was written: {0} (--verify off writes the model anyway)")]
    Verification(String),
    #[error("panic while {during}: {message}. The model is probably malformed (check it with onnx.checker); if it is valid, please report this with the model")]
    Panic { during: String, message: String },
}

/// What kind of failure an error is; each kind has one exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The command line is wrong: flags, their values (--r, -o, --target),
    /// or the contents of an --input/--image file. Exit code 1.
    Usage,
    /// The model file is not a well-formed ONNX model. Exit code 2.
    InvalidModel,
    /// A well-formed model that tome-compile does not handle. Exit code 2.
    UnsupportedModel,
    /// A file cannot be opened, read or written. Exit code 3.
    Io,
    /// The compiled model failed a check (type check, --verify). Exit code 4.
    VerificationFailed,
    /// A bug: a patch failed validation or a panic was caught. Exit code 4.
    Internal,
}

impl ErrorKind {
    /// The process exit status for this kind (0 is success).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => 1,
            ErrorKind::InvalidModel | ErrorKind::UnsupportedModel => 2,
            ErrorKind::Io => 3,
            ErrorKind::VerificationFailed | ErrorKind::Internal => 4,
        }
    }

    /// The `kind` field of `--json` errors.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage",
            ErrorKind::InvalidModel => "invalid_model",
            ErrorKind::UnsupportedModel => "unsupported_model",
            ErrorKind::Io => "io",
            ErrorKind::VerificationFailed => "verification_failed",
            ErrorKind::Internal => "internal",
        }
    }
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_path_buf(), source }
    }

    /// The one mapping from errors to kinds (and so to exit codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Input(_) | Error::OutputIsInput(_) | Error::OutputIsInputData(_) => ErrorKind::Usage,
            Error::NotOnnx { .. } | Error::ExternalData { .. } | Error::TooLarge { .. } | Error::Graph(_) | Error::Shapes(_) => {
                ErrorKind::InvalidModel
            }
            Error::Run(_) => ErrorKind::InvalidModel,
            Error::Target { .. } | Error::Nnef(_) => ErrorKind::UnsupportedModel,
            Error::Io { .. } => ErrorKind::Io,
            Error::TypeCheck(_) | Error::Verification(_) => ErrorKind::VerificationFailed,
            Error::Panic { .. } => ErrorKind::Internal,
            Error::Pass(e) => ErrorKind::of_pass(e),
        }
    }
}

impl ErrorKind {
    /// The kind of a pass error: most are refusals of an unsupported model.
    pub fn of_pass(e: &PassError) -> ErrorKind {
        match e {
            PassError::BadSchedule(_) | PassError::BadOption(_) => ErrorKind::Usage,
            PassError::NoGraph | PassError::DuplicateTensor(_) | PassError::Cycle(_) => ErrorKind::InvalidModel,
            PassError::BadPatch { .. } => ErrorKind::Internal,
            // NoBlocks, Unsupported, TokenConsumer, OldOpset, MissingType, and refusals added later.
            _ => ErrorKind::UnsupportedModel,
        }
    }
}

/// Rewrites `proto` (whose external data lives under `dir`) to apply ToMe.
/// The result is checked by tract's type inference before it is returned.
/// A panic inside (tract's, on an odd graph) comes back as `Error::Panic`.
pub fn compile(proto: &mut pb::ModelProto, dir: &Path, opts: &Options) -> Result<Report, Error> {
    runtime::guard::catch_panics("compiling the model", || {
        let (prepared, types) = prepare(proto, dir, opts)?;
        let (mut report, _) = rewrite(proto, dir, types, opts)?;
        report.prepared = prepared;
        Ok(report)
    })
}

/// Rewrites the UNet `proto` with tomesd's merging (`tome_passes::sd`);
/// `latent` pins a symbolic latent input's height and width. Checked by
/// tract's type inference like `compile`.
pub fn compile_unet(
    proto: &mut pb::ModelProto,
    dir: &Path,
    opts: &tome_passes::sd::UnetOptions,
    latent: Option<[i64; 2]>,
) -> Result<(Vec<String>, tome_passes::sd::UnetReport), Error> {
    runtime::guard::catch_panics("compiling the UNet", || {
        let (prepared, types) = prepare_latent(proto, dir, latent)?;
        let report = tome_passes::sd::compile_unet(proto, types, opts)?;
        infer_types(proto, dir).map_err(|e| Error::TypeCheck(e.to_string()))?;
        Ok((prepared, report))
    })
}

/// `prepare_sized` for a UNet: a symbolic latent needs `--latent`.
pub(crate) fn prepare_latent(proto: &mut pb::ModelProto, dir: &Path, latent: Option<[i64; 2]>) -> Result<(Vec<String>, HashMap<String, TensorType>), Error> {
    let symbolic = |d: &pb::tensor_shape_proto::Dimension| !matches!(d.value, Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0);
    let latent_input = proto.graph.iter().flat_map(|g| &g.input).find_map(|i| {
        let Some(pb::type_proto::Value::TensorType(t)) = i.r#type.as_ref().and_then(|t| t.value.as_ref()) else { return None };
        let dims = &t.shape.as_ref()?.dim;
        (dims.len() == 4).then(|| (i.name.clone(), dims[2..].iter().any(symbolic)))
    });
    if let (Some((name, true)), None) = (&latent_input, latent) {
        return Err(PassError::Unsupported(format!(
            "the latent input {name} leaves its height and width symbolic; pass --latent HxW (64x64 for 512 px images, 128x128 for SDXL's 1024 px)"
        ))
        .into());
    }
    let (mut done, types) = prepare_sized(proto, dir, latent)?;
    for line in &mut done {
        *line = line.replace("by --image-size", "by --latent");
    }
    Ok((done, types))
}

/// The UNet's transformer blocks and tomesd's plan for them, nothing changed.
pub fn inspect_unet(
    proto: &mut pb::ModelProto,
    dir: &Path,
    opts: &tome_passes::sd::UnetOptions,
    latent: Option<[i64; 2]>,
) -> Result<tome_passes::sd::UnetReport, Error> {
    runtime::guard::catch_panics("inspecting the UNet", || {
        let (_, types) = prepare_latent(proto, dir, latent)?;
        Ok(tome_passes::sd::inspect_unet(proto, types, opts)?)
    })
}

/// The passes on a model whose types are `types`, then tract's type check of
/// their result; returns the compiled model's types too.
fn rewrite(proto: &mut pb::ModelProto, dir: &Path, types: HashMap<String, TensorType>, opts: &Options) -> Result<(Report, HashMap<String, TensorType>), Error> {
    let report = tome_passes::compile(proto, types, opts)?;
    let compiled = infer_types(proto, dir).map_err(|e| Error::TypeCheck(e.to_string()))?;
    Ok((report, compiled))
}

/// `compile` for a model whose types are already known (several compiles
/// of one model); returns the compiled model's types too.
pub(crate) fn compile_typed(
    proto: &mut pb::ModelProto,
    dir: &Path,
    types: HashMap<String, TensorType>,
    opts: &Options,
) -> Result<(Report, HashMap<String, TensorType>), Error> {
    runtime::guard::catch_panics("compiling the model", || rewrite(proto, dir, types, opts))
}

/// Reads `input`, compiles it and writes `output` (plus `<output>.data` when
/// the input kept weights in external files), verifying the result when it
/// is cheap (`verify::Mode::Auto`). Nothing is written on error.
pub fn compile_file(input: &Path, output: &Path, opts: &Options) -> Result<Report, Error> {
    compile_file_with(input, output, opts, Target::Portable, Format::Onnx)
}

/// Readies an export for inference (`tome_passes::prepare`: local
/// functions inlined, onnxruntime's contrib ops unfused, a symbolic image
/// input pinned), then folds the shape vectors tract cannot follow
/// (`tome_passes::fold_shapes`) until it follows them all. Returns what
/// was done, one line each, and the types of the prepared model.
pub fn prepare(proto: &mut pb::ModelProto, dir: &Path, opts: &Options) -> Result<(Vec<String>, HashMap<String, TensorType>), Error> {
    prepare_sized(proto, dir, opts.image_size)
}

/// `prepare`, pinning a symbolic image (or latent) input to `size`.
pub fn prepare_sized(proto: &mut pb::ModelProto, dir: &Path, size: Option<[i64; 2]>) -> Result<(Vec<String>, HashMap<String, TensorType>), Error> {
    let mut done = tome_passes::prepare(proto, size)?;
    let mut folded = 0;
    let mut types = infer_types(proto, dir)?;
    for _ in 0..4 {
        let untyped = proto.graph.iter().flat_map(|g| &g.node).flat_map(|n| &n.output).any(|o| !o.is_empty() && !types.contains_key(o));
        if !untyped {
            break;
        }
        match tome_passes::fold_shapes(proto, types.clone())? {
            0 => break,
            n => folded += n,
        }
        types = infer_types(proto, dir)?;
    }
    if folded > 0 {
        done.push(format!("folded {folded} shape vectors tract could not follow"));
    }
    Ok((done, types))
}

/// Element type and shape of every tensor, from tract's analysis; the batch
/// axis stays symbolic. Declared sizes are bounded before tract reads them
/// and inferred sizes after (`validate`).
pub fn infer_types(proto: &pb::ModelProto, dir: &Path) -> Result<HashMap<String, TensorType>, Error> {
    onnx::validate::check_declared(proto)?;
    let readable = onnx::tract_readable(proto)?;
    let types = runtime::guard::catch_panics("analysing the model with tract", || {
        let dir = dir.to_str();
        let parsed = crate::runtime::tract_ops::onnx().parse(&readable, dir).map_err(|e| Error::Shapes(format!("{e:#}")))?;
        let mut model = parsed.model;
        model.analyse(false).map_err(|e| Error::Shapes(format!("{e:#}")))?;
        let mut types = HashMap::new();
        for (name, outlet) in parsed.outlets_by_name {
            let Ok(fact) = model.outlet_fact(outlet) else { continue };
            let (Some(dt), Some(shape)) = (fact.datum_type.concretize(), fact.shape.concretize()) else { continue };
            let shape = shape
                .iter()
                .map(|d| match d.to_i64() {
                    Ok(v) => Dim::Fixed(v),
                    Err(_) => Dim::Symbol(d.to_string()),
                })
                .collect();
            types.insert(name, TensorType::new(onnx_elem(dt), shape));
        }
        Ok(types)
    })?;
    onnx::validate::check_inferred(&types)?;
    Ok(types)
}

fn onnx_elem(dt: DatumType) -> i32 {
    match dt {
        DatumType::F32 => 1,
        DatumType::U8 => 2,
        DatumType::I8 => 3,
        DatumType::U16 => 4,
        DatumType::I16 => 5,
        DatumType::I32 => 6,
        // tract types shape vectors as TDim; in ONNX they are int64.
        DatumType::I64 | DatumType::TDim => 7,
        DatumType::Bool => 9,
        DatumType::F16 => 10,
        DatumType::F64 => 11,
        _ => 0,
    }
}
