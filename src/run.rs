//! Runs an ONNX model with tract on CPU, and turns images into model inputs.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

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
        let file = crate::onnx_io::read(path)?;
        Runner::from_proto(&file.proto, &file.dir)
    }

    /// Plans a model held in memory; external data is read from `dir`.
    pub fn from_proto(proto: &tome_passes::pb::ModelProto, dir: &Path) -> Result<Runner, Error> {
        let parsed = tract_onnx::onnx().parse(proto, dir.to_str()).map_err(run_err)?;
        let model = parsed.model;
        let input_names = model.input_outlets().map_err(run_err)?.iter().map(|o| model.node(o.node).name.clone()).collect();
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
            .map(|s| s.iter().map(|d| d.to_i64().map(|v| v as usize).unwrap_or(0)).collect())
            .unwrap_or_default();
        let input_type = model.input_fact(0).ok().and_then(|f| f.datum_type.concretize()).unwrap_or(DatumType::F32);
        let plan = model.into_optimized().map_err(|e| run_err(format!("{e:#}")))?.into_runnable().map_err(run_err)?;
        Ok(Runner { plan, input_names, output_names, input_shape, input_type })
    }

    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let inputs: TVec<TValue> = inputs.into_iter().map(|t| t.into()).collect();
        let outputs = self.plan.run(inputs).map_err(|e| run_err(format!("{e:#}")))?;
        Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
    }
}

/// Loads an image, resizes it (bicubic) to `height`×`width` and normalises
/// each channel: `(v / 255 - mean) / std`, as [1, 3, H, W] float32.
pub fn image_tensor(path: &Path, height: usize, width: usize, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor, Error> {
    let img = image::open(path).map_err(|e| Error::Input(format!("{}: cannot read the image: {e}", path.display())))?;
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
