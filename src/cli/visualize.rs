//! `tome-compile visualize`: which patches each final token stands for, as in
//! the paper's figure. Every group of patches merged into one token is filled
//! with its mean colour, with dark borders between groups.

use std::path::Path;

use tract_onnx::prelude::*;

use crate::runtime::run::{image_tensor, Runner};
use crate::{onnx, Error, Options};

/// Grid of final-token groups for one image.
#[derive(Clone, Debug)]
pub struct Visualization {
    /// `group[row * side + col]`: the final token a patch was merged into.
    pub group: Vec<i64>,
    pub side: usize,
    /// Distinct groups among the patches: the final number of patch tokens.
    pub groups: usize,
    pub image: image::RgbImage,
}

const BORDER: image::Rgb<u8> = image::Rgb([16, 16, 16]);

/// Compiles `model` with the source map exposed, runs it on `image`, and
/// draws the groups at the model's input resolution.
pub fn visualize(model: &Path, opts: &Options, picture: &Path, mean: [f32; 3], std: [f32; 3]) -> Result<Visualization, Error> {
    let mut file = onnx::io::read(model)?;
    let (_, types) = crate::prepare(&mut file.proto, &file.dir, opts)?;
    let report = tome_passes::compile_exposing_sources(&mut file.proto, types, opts)?;
    let runner = Runner::from_proto(&file.proto, &file.dir)?;
    let (h, w) = match runner.input_shape.as_slice() {
        [_, 3, h, w] if *h > 0 && *w > 0 => (*h, *w),
        s => return Err(Error::Input(format!("visualize needs an input of shape [batch, 3, H, W], this model takes {s:?}"))),
    };
    let tokens = report.blocks.first().map(|b| b.step.tokens_in).unwrap_or(0);
    let side = (report.patches as f64).sqrt().round() as usize;
    if side * side != report.patches || h % side != 0 || w % side != 0 {
        return Err(Error::Input(format!("visualize needs a square patch grid; this model has {} patches", report.patches)));
    }
    let input = image_tensor(picture, h, w, mean, std)?;
    let outputs = runner.run(vec![input.clone()])?;
    let source: Vec<i64> = match runner.output_names.iter().position(|n| n == tome_passes::SOURCE_OUTPUT) {
        Some(ix) => {
            // tract may hand integer index tensors back as TDim.
            let ints = outputs[ix].cast_to::<i64>().map_err(|e| Error::Run(e.to_string()))?;
            let view = ints.to_plain_array_view::<i64>().map_err(|e| Error::Run(e.to_string()))?;
            view.iter().copied().collect()
        }
        None => (0..tokens as i64).collect(), // nothing merged: every token is its own
    };
    let group: Vec<i64> = source.get(report.prefix..tokens).map(<[i64]>::to_vec).unwrap_or_default();
    let mut distinct = group.clone();
    distinct.sort();
    distinct.dedup();
    let image = draw(&input, &group, side, mean, std)?;
    Ok(Visualization { groups: distinct.len(), group, side, image })
}

/// Fills each group with its mean colour and darkens patch edges between groups.
fn draw(input: &Tensor, group: &[i64], side: usize, mean: [f32; 3], std: [f32; 3]) -> Result<image::RgbImage, Error> {
    let (h, w) = (input.shape()[2], input.shape()[3]);
    let pixels = crate::runtime::run::floats(input).ok_or_else(|| Error::Run("input is not float32".into()))?;
    let (ph, pw) = (h / side, w / side);
    let patch_of = |x: usize, y: usize| (y / ph) * side + x / pw;
    let mut sums: std::collections::HashMap<i64, ([f64; 3], f64)> = Default::default();
    for y in 0..h {
        for x in 0..w {
            let entry = sums.entry(group[patch_of(x, y)]).or_default();
            for c in 0..3 {
                let v = pixels[c * h * w + y * w + x] * std[c] + mean[c];
                entry.0[c] += v.clamp(0.0, 1.0) as f64;
            }
            entry.1 += 1.0;
        }
    }
    let colour = |g: i64| {
        let (sum, n) = sums[&g];
        image::Rgb([0, 1, 2].map(|c| (sum[c] / n * 255.0).round() as u8))
    };
    Ok(image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let g = group[patch_of(x, y)];
        let edge = (x % pw == 0 && x > 0 && group[patch_of(x - 1, y)] != g)
            || (y % ph == 0 && y > 0 && group[patch_of(x, y - 1)] != g);
        if edge { BORDER } else { colour(g) }
    }))
}

/// Writes the picture atomically.
pub fn save(v: &Visualization, out: &Path) -> Result<(), Error> {
    let mut png = std::io::Cursor::new(Vec::new());
    v.image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| Error::Input(format!("{}: cannot encode the PNG: {e}", out.display())))?;
    crate::onnx::io::write_atomic(out, &png.into_inner())
}
