//! tome-compile as a library: ONNX in, Token Merging ONNX out, and a tract
//! runner for the result. The graph work lives in `tome_passes`; this crate
//! does file I/O, type inference (with tract) and execution.

pub mod bench;
pub mod check;
pub mod deploy;
pub mod inspect;
pub mod macs;
pub mod npz;
pub mod onnx_io;
pub mod run;
pub mod visualize;
pub mod tensorrt_rules;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tome_passes::{pb, Dim, TensorType};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

pub use deploy::{compile_bytes, compile_bytes_for, compile_file_with, Format, Target};
pub use tome_passes::{Options, PassError, Report, Schedule};

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
    #[error("tract cannot infer the model's shapes: {0}")]
    Shapes(String),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error("the compiled graph does not type-check in tract ({0}); this is a tome-compile bug, please report it with the model")]
    Verify(String),
    #[error("{0}")]
    Input(String),
    #[error("tract failed to run the model: {0}")]
    Run(String),
    #[error("the compiled model does not meet --target {target}: {findings}")]
    Target { target: String, findings: String },
    #[error("tract cannot write the model as NNEF: {0}")]
    Nnef(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_path_buf(), source }
    }
}

/// Rewrites `proto` (whose external data lives under `dir`) to apply ToMe.
/// The result is checked by tract's type inference before it is returned.
pub fn compile(proto: &mut pb::ModelProto, dir: &Path, opts: &Options) -> Result<Report, Error> {
    let types = infer_types(proto, dir)?;
    let report = tome_passes::compile(proto, types, opts)?;
    infer_types(proto, dir).map_err(|e| Error::Verify(e.to_string()))?;
    Ok(report)
}

/// Reads `input`, compiles it and writes `output` (plus `<output>.data` when
/// the input kept weights in external files). Nothing is written on error.
pub fn compile_file(input: &Path, output: &Path, opts: &Options) -> Result<Report, Error> {
    onnx_io::check_output_path(input, output)?;
    let mut file = onnx_io::read(input)?;
    let report = compile(&mut file.proto, &file.dir, opts)?;
    onnx_io::write(&mut file.proto, &file.dir, output)?;
    Ok(report)
}

/// Element type and shape of every tensor, from tract's analysis; the batch
/// axis stays symbolic.
pub fn infer_types(proto: &pb::ModelProto, dir: &Path) -> Result<HashMap<String, TensorType>, Error> {
    let dir = dir.to_str();
    let parsed = tract_onnx::onnx().parse(proto, dir).map_err(|e| Error::Shapes(format!("{e:#}")))?;
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
}

fn onnx_elem(dt: DatumType) -> i32 {
    match dt {
        DatumType::F32 => 1,
        DatumType::U8 => 2,
        DatumType::I8 => 3,
        DatumType::U16 => 4,
        DatumType::I16 => 5,
        DatumType::I32 => 6,
        DatumType::I64 => 7,
        DatumType::Bool => 9,
        DatumType::F16 => 10,
        DatumType::F64 => 11,
        _ => 0,
    }
}
