//! `FusedLayerNorm` for `--target tract` (inputs and outputs as
//! `tome_passes::vit::lower::FUSED_LAYER_NORM_OP`): a LayerNormalization over
//! the last axis, one row at a time. tract expands the standard op into a
//! mean, a subtraction and its RmsNorm, three passes over the residual
//! stream with a tensor written by each; this reads a row, its mean and
//! variance from eight-lane partial sums, and writes the normalised row.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::runtime::tract_ops::floats;
use tome_passes::vit::lower::FUSED_LAYER_NORM_OP;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let epsilon: f32 = node.get_attr_opt("epsilon")?.unwrap_or(1e-5);
    if !(2..=3).contains(&node.input.len()) || node.output.len() != 1 || !(epsilon.is_finite() && epsilon >= 0.0) {
        bail!("{}: {FUSED_LAYER_NORM_OP} takes inputs (x, scale[, bias]), a finite epsilon >= 0, and gives one output", node.name);
    }
    Ok((expand(FusedLayerNorm { epsilon }), vec![]))
}

/// x [.., C] normalised over its last axis, times scale [C], plus bias [C].
#[derive(Clone, Debug, PartialEq)]
pub struct FusedLayerNorm {
    pub epsilon: f32,
}

impl Eq for FusedLayerNorm {}

impl std::hash::Hash for FusedLayerNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.epsilon.to_bits().hash(state)
    }
}

impl Expansion for FusedLayerNorm {
    fn name(&self) -> StaticName {
        FUSED_LAYER_NORM_OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        for t in inputs.iter().chain(outputs) {
            s.equals(&t.datum_type, f32::datum_type())?;
        }
        for vector in &inputs[1..] {
            s.equals(&vector.rank, 1)?;
        }
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for FusedLayerNorm {
    fn name(&self) -> StaticName {
        FUSED_LAYER_NORM_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("epsilon: {}", self.epsilon)])
    }

    op_as_typed_op!();
}

impl TypedOp for FusedLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        let c = x.shape.last().cloned();
        let fits = |v: &&TypedFact| v.datum_type == f32::datum_type() && v.rank() == 1 && Some(&v.shape[0]) == c.as_ref();
        if x.datum_type != f32::datum_type() || x.rank() < 1 || !inputs[1..].iter().all(fits) {
            bail!("{FUSED_LAYER_NORM_OP} takes float32 x [.., C], scale [C] and bias [C]; got {inputs:?}");
        }
        Ok(tvec!(x.without_value()))
    }

    as_op!();
}

impl EvalOp for FusedLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let c = *inputs[0].shape().last().context("x has no axis")?;
        let x = floats(&inputs[0])?;
        let scale = floats(&inputs[1])?;
        let bias = inputs.get(2).map(|b| floats(b)).transpose()?;
        if scale.len() != c || bias.is_some_and(|b| b.len() != c) {
            bail!("{FUSED_LAYER_NORM_OP}: scale and bias must have {c} values");
        }
        let mut out = unsafe { Tensor::uninitialized::<f32>(inputs[0].shape())? };
        if c > 0 {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            // Rows go to tract's threads past its threshold of work (32768
            // by default), an element counted as an eighth: a row is cheap
            // (about 0.2 ns an element) against the 15-20 µs hand-off to the
            // threads. ViT-S/16 and ViT-B/16 at batch 1 stay on one thread:
            // their compiled graphs ran at 0.954-0.995 (five paired runs) and
            // 0.981-1.004 (four) of their time with rows spread on two.
            tract_linalg::multithread::par_chunks_mut(y, c, x.len() / 8, |first, rows| {
                for (k, row) in rows.chunks_exact_mut(c).enumerate() {
                    normalize(&x[(first + k) * c..][..c], scale, bias, self.epsilon, row);
                }
                Ok(())
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// The sum of `f` over `x`, in eight lanes the compiler keeps in a vector.
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// One row: `(x - mean) / sqrt(var + epsilon) · scale + bias`, the
/// variance taken around the mean (two passes, as the reference does).
fn normalize(x: &[f32], scale: &[f32], bias: Option<&[f32]>, epsilon: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + epsilon).sqrt();
    match bias {
        Some(bias) => {
            for (((o, v), s), b) in out.iter_mut().zip(x).zip(scale).zip(bias) {
                *o = (v - mean) * inv * s + b;
            }
        }
        None => {
            for ((o, v), s) in out.iter_mut().zip(x).zip(scale) {
                *o = (v - mean) * inv * s;
            }
        }
    }
}
