//! Runs an ONNX model with tract on CPU, and turns images into model inputs.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use tome_passes::pb;

use crate::Error;

/// A model optimised and planned by tract, ready to run.
pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    pub input_names: Vec<String>,
    pub output_names: Vec<String>,
    /// Declared input shape, with 0 where the axis is symbolic (the batch).
    pub input_shape: Vec<usize>,
    pub input_type: DatumType,
}

fn run_err(e: impl std::fmt::Display) -> Error {
    Error::Run(e.to_string())
}

impl Runner {
    /// Loads `path` (external data resolved next to it) and plans it.
    pub fn load(path: &Path) -> Result<Runner, Error> {
        let file = crate::onnx::io::read(path)?;
        Runner::from_proto(&file.proto, &file.dir)
    }

    /// Plans a model whose external data lives under `dir`. Sizes are bounded
    /// first (`validate`), and a panic in tract comes back as an error.
    pub fn from_proto(proto: &pb::ModelProto, dir: &Path) -> Result<Runner, Error> {
        crate::onnx::validate::check_declared(proto)?;
        let readable = crate::onnx::tract_readable(proto)?;
        crate::runtime::guard::catch_panics("loading the model with tract", || {
            let parsed = crate::runtime::tract_ops::onnx().parse(&readable, dir.to_str()).map_err(run_err)?;
            let model = parsed.model;
            let input_names =
                model.input_outlets().map_err(run_err)?.iter().map(|o| model.node(o.node).name.clone()).collect();
            let output_names = model
                .output_outlets()
                .map_err(run_err)?
                .iter()
                .map(|o| model.outlet_label(*o).unwrap_or(&model.node(o.node).name).to_string())
                .collect();
            let input_shape = model
                .input_fact(0)
                .ok()
                .and_then(|f| f.shape.concretize())
                .map(|s| s.iter().map(|d| d.to_i64().ok().and_then(|v| usize::try_from(v).ok()).unwrap_or(0)).collect())
                .unwrap_or_default();
            let input_type = model.input_fact(0).ok().and_then(|f| f.datum_type.concretize()).unwrap_or(DatumType::F32);
            let plan =
                model.into_optimized().map_err(|e| run_err(format!("{e:#}")))?.into_runnable().map_err(run_err)?;
            Ok(Runner { plan, input_names, output_names, input_shape, input_type })
        })
    }

    /// Runs the plan. A planned model fails at run time on inputs it does
    /// not take (shape, type), so that error is about the inputs.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        crate::runtime::guard::catch_panics("running the model with tract", || {
            let inputs: TVec<TValue> = inputs.into_iter().map(|t| t.into()).collect();
            let outputs = self.plan.run(inputs).map_err(|e| Error::Input(format!("tract cannot run the model on these inputs: {e:#}")))?;
            Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
        })
    }

    /// The declared element type and shape of each input; `None` for a
    /// symbolic axis such as the batch.
    pub fn input_facts(&self) -> Vec<(DatumType, Vec<Option<usize>>)> {
        let model = self.plan.model();
        (0..model.inputs.len())
            .filter_map(|i| model.input_fact(i).ok())
            .map(|f| (f.datum_type, f.shape.iter().map(|d| d.to_i64().ok().and_then(|v| usize::try_from(v).ok())).collect()))
            .collect()
    }
}

/// Loads an image, resizes it (bicubic) to `height`×`width` and normalises
/// each channel: `(v / 255 - mean) / std`, as [1, 3, H, W] float32.
pub fn image_tensor(path: &Path, height: usize, width: usize, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor, Error> {
    let pixels = height.checked_mul(width).filter(|&p| p > 0 && p as u64 <= crate::onnx::validate::MAX_AXIS && height <= u32::MAX as usize && width <= u32::MAX as usize);
    if pixels.is_none() {
        return Err(Error::Input(format!("--image needs a model input of a sensible size, this model takes {height}x{width}")));
    }
    let img = image::open(path).map_err(|e| match e {
        image::ImageError::IoError(e) => Error::io(path, e),
        e => Error::Input(format!("{}: cannot read the image: {e}", path.display())),
    })?;
    let rgb = img.to_rgb8();
    let resized = image::imageops::resize(&rgb, width as u32, height as u32, image::imageops::FilterType::CatmullRom);
    let mut data = vec![0f32; 3 * height * width];
    for (x, y, px) in resized.enumerate_pixels() {
        for c in 0..3 {
            data[c * height * width + y as usize * width + x as usize] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    Tensor::from_shape(&[1, 3, height, width], &data).map_err(run_err)
}

/// The `k` largest entries of a row, as (index, value), largest first.
pub fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ix: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    ix.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ix.truncate(k);
    ix
}

/// The values of a float32 tensor in row-major order.
pub fn floats(t: &Tensor) -> Option<Vec<f32>> {
    t.to_plain_array_view::<f32>().ok().map(|v| v.iter().copied().collect())
}
