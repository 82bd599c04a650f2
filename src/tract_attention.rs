//! `FusedAttention` for `--target tract` (inputs and outputs as
//! `tome_passes::lower::FUSED_ATTENTION_OP`): `softmax(scale·Q·Kᵀ + bias)·V`
//! per head in one node. tract runs a block's Q·Kᵀ, Softmax and P·V as
//! three ops over small per-head matrices at a fraction of its big MatMuls'
//! rate (a fifth of ViT-B/16's time at r = 16 for 3% of its MACs); this op
//! runs `tome_kernels::attend` on each head, heads spread over tract's threads.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use tome_kernels::{attend, Head, Scratch};
use tome_passes::lower::FUSED_ATTENTION_OP;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let scale: f32 = node.get_attr_opt("scale")?.unwrap_or(1.0);
    if !(3..=4).contains(&node.input.len()) || node.output.len() != 1 || !scale.is_finite() {
        bail!("{}: {FUSED_ATTENTION_OP} takes inputs (q, kᵀ, v[, bias]), a finite scale, and gives one output", node.name);
    }
    Ok((expand(FusedAttention { scale }), vec![]))
}

/// q [B,H,N,D], kᵀ [B,H,D,N], v [B,H,N,Dv] and an optional bias [B,1,1,N]
/// added to every row of logits; output [B,H,N,Dv], float32.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedAttention {
    pub scale: f32,
}

impl Eq for FusedAttention {}

impl std::hash::Hash for FusedAttention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scale.to_bits().hash(state)
    }
}

impl Expansion for FusedAttention {
    fn name(&self) -> StaticName {
        FUSED_ATTENTION_OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        for t in inputs.iter().chain(outputs) {
            s.equals(&t.datum_type, f32::datum_type())?;
            s.equals(&t.rank, 4)?;
        }
        for axis in 0..3 {
            s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
        }
        s.equals(&outputs[0].shape[3], &inputs[2].shape[3])
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        FUSED_ATTENTION_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("scale={}", self.scale)])
    }

    op_as_typed_op!();
}

impl TypedOp for FusedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [q, kt, v] = [inputs[0], inputs[1], inputs[2]];
        let dims = |f: &TypedFact, axes: [usize; 4]| axes.map(|a| f.shape.get(a).cloned());
        let fits = inputs.iter().all(|f| f.rank() == 4 && f.datum_type == f32::datum_type())
            && dims(kt, [0, 1, 3, 2]) == dims(q, [0, 1, 2, 3])
            && dims(v, [0, 1, 2, 2]) == dims(q, [0, 1, 2, 2])
            && inputs.get(3).is_none_or(|b| {
                b.shape[0] == q.shape[0] && b.shape[1].is_one() && b.shape[2].is_one() && b.shape[3] == q.shape[2]
            });
        if !fits {
            bail!("{FUSED_ATTENTION_OP} takes float32 q [B,H,N,D], kᵀ [B,H,D,N], v [B,H,N,Dv] and bias [B,1,1,N]; got {inputs:?}");
        }
        Ok(tvec!(f32::fact([q.shape[0].clone(), q.shape[1].clone(), q.shape[2].clone(), v.shape[3].clone()])))
    }

    as_op!();
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let &[batch, heads, n, d] = inputs[0].shape() else { bail!("{FUSED_ATTENTION_OP}: q must be [B,H,N,D], is {:?}", inputs[0].shape()) };
        let dv = inputs[2].shape().last().copied().unwrap_or(0);
        if inputs[1].shape() != [batch, heads, d, n] || inputs[2].shape() != [batch, heads, n, dv] {
            bail!("{FUSED_ATTENTION_OP}: kᵀ must be [{batch},{heads},{d},{n}] and v [{batch},{heads},{n},Dv]; are {:?} and {:?}", inputs[1].shape(), inputs[2].shape());
        }
        if let Some(b) = inputs.get(3).filter(|b| b.shape() != [batch, 1, 1, n]) {
            bail!("{FUSED_ATTENTION_OP}: bias must be [{batch},1,1,{n}], is {:?}", b.shape());
        }
        fn floats(t: &TValue) -> TractResult<&[f32]> {
            t.try_as_plain_ram()?.as_slice::<f32>()
        }
        let (q, kt, v) = (floats(&inputs[0])?, floats(&inputs[1])?, floats(&inputs[2])?);
        let bias = inputs.get(3).map(floats).transpose()?;
        // Every element is written below, one head at a time.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&[batch, heads, n, dv])? };
        if n > 0 && dv > 0 {
            let mut view = out.try_as_plain_ram_mut()?;
            let o = view.as_slice_mut::<f32>()?;
            let work = batch * heads * n * n * (d + dv);
            tract_linalg::multithread::par_chunks_mut(o, n * dv, work, |first, chunk| {
                let mut scratch = Scratch::default();
                for (k, out) in chunk.chunks_exact_mut(n * dv).enumerate() {
                    let h = first + k;
                    let head = Head {
                        q: &q[h * n * d..][..n * d],
                        kt: &kt[h * d * n..][..d * n],
                        v: &v[h * n * dv..][..n * dv],
                        bias: bias.map(|b| &b[h / heads * n..][..n]),
                        scale: self.scale,
                        n,
                        d,
                        dv,
                    };
                    attend(&head, out, &mut scratch);
                }
                Ok(())
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}
