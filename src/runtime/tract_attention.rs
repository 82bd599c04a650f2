//! `FusedAttention` for `--target tract` (inputs and outputs as
//! `tome_passes::vit::lower::FUSED_ATTENTION_OP`): `softmax(scale·Q·Kᵀ + bias)·V`
//! per head in one node. tract runs a block's Q·Kᵀ, Softmax and P·V as
//! three ops over small per-head matrices at a fraction of its big MatMuls'
//! rate (a fifth of ViT-B/16's time at r = 16 for 3% of its MACs); this op
//! runs `tome_kernels::attend` on each head, heads spread over tract's threads.
//! It reads q, k and v, and writes its output, in whatever axis order tract's
//! axis-change pass hands it, so that the transposes around an attention
//! vanish as they did into tract's MatMuls.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::Mul;
use tract_onnx::tract_hir::internal::*;

use tome_kernels::{attend, Head, Matrix, Scratch};

use crate::runtime::tract_ops::{floats, moved_axis, picked_slice};
use tome_passes::vit::lower::FUSED_ATTENTION_OP;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let scale: f32 = node.get_attr_opt("scale")?.unwrap_or(1.0);
    if !(3..=4).contains(&node.input.len()) || node.output.len() != 1 || !scale.is_finite() {
        bail!("{}: {FUSED_ATTENTION_OP} takes inputs (q, kᵀ, v[, bias]), a finite scale, and gives one output", node.name);
    }
    Ok((expand(FusedAttention { scale, layout: IN_ORDER, factors: [1.0; 2], picks: [None; 3] }), vec![]))
}

/// q [B,H,N,D], kᵀ [B,H,D,N], v [B,H,N,Dv] and an optional bias [B,1,1,N]
/// or [B,N,1] (the same values in memory) added to every row of logits; output [B,H,N,Dv], float32. `layout[t][a]`
/// is the axis of tensor t (q, kᵀ, v, output) that holds its a-th axis in
/// that order. What tract's declutter folds in on top of the ONNX op:
/// `factors`, scalars q and kᵀ are multiplied by first (a graph's `q·s`,
/// rounded as that Mul rounds), and `picks`: `Some((axis, i))` when q, kᵀ
/// or v is index `i` of its input's `axis`, one axis more than the four
/// (timm's q, k and v slices of the qkv projection, read where they lie).
#[derive(Clone, Debug, PartialEq)]
pub struct FusedAttention {
    pub scale: f32,
    pub layout: [[usize; 4]; 4],
    pub factors: [f32; 2],
    pub picks: [Option<(usize, usize)>; 3],
}

const IN_ORDER: [[usize; 4]; 4] = [[0, 1, 2, 3]; 4];
const OUTPUT: usize = 3;

impl Eq for FusedAttention {}

impl std::hash::Hash for FusedAttention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scale.to_bits().hash(state);
        self.layout.hash(state);
        self.factors.map(f32::to_bits).hash(state);
        self.picks.hash(state)
    }
}

impl FusedAttention {
    /// Tensor `t`'s axes in the order above, picked from `axes` (its shape
    /// or its strides).
    fn ordered<T: Clone>(&self, t: usize, axes: &[T]) -> [T; 4] {
        self.layout[t].map(|a| axes[a].clone())
    }

    /// `x · c` on q or kᵀ, `c` a uniform float32 constant that does not
    /// broadcast `x`: the op with factor `c`, and `x`.
    fn fold_factor(&self, model: &TypedModel, mul: &TypedNode, slot: usize) -> TractResult<Option<(Self, OutletId)>> {
        let is_mul = mul.op_as::<TypedBinOp>().is_some_and(|op| op.0.is::<Mul>() && op.1.is_none());
        if !is_mul || mul.inputs.len() != 2 {
            return Ok(None);
        }
        let out = &mul.outputs[0].fact;
        for (x, c) in [(mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])] {
            let (x_fact, c_fact) = (model.outlet_fact(x)?, model.outlet_fact(c)?);
            let uniform = c_fact.konst.as_ref().and_then(|k| k.as_uniform()).filter(|k| k.datum_type() == f32::datum_type());
            let factor = uniform.as_ref().and_then(|k| k.cast_to_scalar::<f32>().ok());
            if let Some(factor) = factor.filter(|_| x_fact.konst.is_none() && x_fact.shape == out.shape && out.datum_type == f32::datum_type()) {
                let mut op = self.clone();
                op.factors[slot] = factor;
                return Ok(Some((op, x)));
            }
        }
        Ok(None)
    }

    /// q, kᵀ or v read at index `i` of axis `a` of a tensor they are a
    /// slice of (`picked_slice`): the op, and that tensor.
    fn fold_pick(&self, model: &TypedModel, rm: &TypedNode, slot: usize) -> Option<(Self, OutletId)> {
        let (pick, input) = picked_slice(model, rm)?;
        let mut op = self.clone();
        op.layout[slot] = op.layout[slot].map(|a| pick.input_axis(a));
        op.picks[slot] = Some((pick.axis, pick.index));
        Some((op, input))
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
        }
        // The bias is [B,1,1,N] or [B,N,1]: `output_facts` checks it.
        for t in inputs.iter().take(3).chain(outputs) {
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
        Ok(vec![
            format!("scale={}", self.scale),
            format!("axes of q, kT, v, output: {:?}", self.layout),
            format!("q, kT multiplied by {:?}; (axis, index) picked in q, kT, v: {:?}", self.factors, self.picks),
        ])
    }

    op_as_typed_op!();
}

impl TypedOp for FusedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let rank = |t: usize, f: &TypedFact| match t {
            0..3 => f.rank() == if self.picks[t].is_some() { 5 } else { 4 },
            _ => matches!(f.rank(), 3 | 4),
        };
        let picked = |t: usize| self.picks[t].is_none_or(|(axis, i)| inputs[t].shape[axis].as_i64().is_some_and(|len| (i as i64) < len));
        let fits = inputs.len() >= 3 && inputs.iter().enumerate().all(|(t, f)| rank(t, f) && f.datum_type == f32::datum_type()) && (0..3).all(picked);
        if !fits {
            bail!("{FUSED_ATTENTION_OP} takes float32 q [B,H,N,D], kᵀ [B,H,D,N], v [B,H,N,Dv] and bias [B,1,1,N] or [B,N,1]; got {inputs:?}");
        }
        let [b, h, n, d] = self.ordered(0, &inputs[0].shape);
        let [kb, kh, kd, kn] = self.ordered(1, &inputs[1].shape);
        let [vb, vh, vn, dv] = self.ordered(2, &inputs[2].shape);
        let fits = [kb, vb] == [b.clone(), b.clone()]
            && [kh, vh] == [h.clone(), h.clone()]
            && [kn, vn] == [n.clone(), n.clone()]
            && kd == d
            && d.as_i64() != Some(0)
            && inputs.get(3).is_none_or(|bias| {
                *bias.shape == [b.clone(), 1.into(), 1.into(), n.clone()] || *bias.shape == [b.clone(), n.clone(), 1.into()]
            });
        if !fits {
            bail!("{FUSED_ATTENTION_OP} (axes {:?}) takes q [B,H,N,D], kᵀ [B,H,D,N], v [B,H,N,Dv] and bias [B,1,1,N] or [B,N,1], D > 0; got {inputs:?}", self.layout);
        }
        let mut shape = [b.clone(), h.clone(), n.clone(), dv.clone()];
        for (dim, &axis) in [b, h, n, dv].into_iter().zip(&self.layout[OUTPUT]) {
            shape[axis] = dim;
        }
        Ok(tvec!(f32::fact(shape)))
    }

    /// Folds in a scalar multiplication of q or kᵀ, and a one-wide slice
    /// (with its axis removed) of q, kᵀ or v: tract would copy each.
    fn declutter(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        for slot in 0..3 {
            let producer = model.node(node.inputs[slot].node);
            let folded = if slot < 2 && self.factors[slot] == 1.0 { self.fold_factor(model, producer, slot)? } else { None };
            let folded = folded.or(if self.picks[slot].is_none() { self.fold_pick(model, producer, slot) } else { None });
            if let Some((op, input)) = folded {
                let mut inputs = node.inputs.clone();
                inputs[slot] = input;
                return Ok(Some(TypedModelPatch::replace_single_op(model, node, &inputs, op)?));
            }
        }
        Ok(None)
    }

    /// Takes a moved axis on q, kᵀ, v or the output into its layout.
    fn change_axes(&self, _model: &TypedModel, _node: &TypedNode, io: InOut, change: &AxisOp) -> TractResult<Option<AxisChangeConsequence>> {
        let (tensor, &AxisOp::Move(from, to)) = (match io {
            InOut::In(slot) if slot < 3 => slot,
            InOut::Out(0) => OUTPUT,
            _ => return Ok(None),
        }, change) else {
            return Ok(None);
        };
        let moved = |axis: usize| moved_axis(axis, from, to);
        let mut op = self.clone();
        op.layout[tensor] = op.layout[tensor].map(moved);
        if let Some((axis, _)) = op.picks.get_mut(tensor).and_then(|p| p.as_mut()) {
            *axis = moved(*axis);
        }
        Ok(Some(AxisChangeConsequence { substitute_op: Some(Box::new(op)), wire_changes: tvec!((io, change.clone())) }))
    }

    as_op!();
}

/// Head (b, h) of a tensor whose axes in order have `strides`, starting at
/// `offset`, its elements multiplied by `factor`.
fn head_matrix(data: &[f32], offset: usize, strides: [usize; 4], factor: f32, b: usize, h: usize) -> Matrix<'_> {
    Matrix { data: &data[offset + b * strides[0] + h * strides[1]..], row_stride: strides[2], col_stride: strides[3], factor }
}

/// The output tensor, written by all threads at once: each head writes its
/// own elements only.
struct SharedOut(*mut f32, usize);
// SAFETY: the threads write disjoint elements (below), and the tensor
// outlives them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Writes `values` at `first`, `step` apart.
    ///
    /// # Safety
    /// No other thread may read or write those elements meanwhile.
    unsafe fn write(&self, first: usize, step: usize, values: &[f32]) {
        assert!(first + (values.len().max(1) - 1) * step < self.1, "{FUSED_ATTENTION_OP}: an output index out of range");
        for (k, &x) in values.iter().enumerate() {
            // SAFETY: in range (above).
            unsafe { *self.0.add(first + k * step) = x };
        }
    }
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let facts: TVec<TypedFact> = inputs.iter().map(|t| TypedFact::shape_and_dt_of(t)).collect();
        let out_shape = self.output_facts(&facts.iter().collect::<TVec<_>>())?.remove(0).shape.as_concrete().map(|s| s.to_vec());
        let out_shape = out_shape.context("concrete shapes")?;
        let [batch, heads, n, d] = self.ordered(0, inputs[0].shape());
        let dv = self.ordered(2, inputs[2].shape())[3];
        let (q, kt, v) = (floats(&inputs[0])?, floats(&inputs[1])?, floats(&inputs[2])?);
        let bias = inputs.get(3).map(|b| floats(b)).transpose()?;
        // Every element is written below, one head at a time.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        // Tensors are dense, so strides are non-negative.
        let strides = |t: usize, tensor: &Tensor| self.ordered(t, tensor.strides()).map(|s| s as usize);
        let [q_s, kt_s, v_s] = [0, 1, 2].map(|t| strides(t, &inputs[t]));
        let [q_at, kt_at, v_at] = [0, 1, 2].map(|t| self.picks[t].map_or(0, |(axis, i)| i * inputs[t].strides()[axis] as usize));
        let o_s = strides(OUTPUT, &out);
        if n > 0 && dv > 0 {
            let mut view = out.try_as_plain_ram_mut()?;
            let o = view.as_slice_mut::<f32>()?;
            let shared = SharedOut(o.as_mut_ptr(), o.len());
            let mut all_heads: Vec<usize> = (0..batch * heads).collect();
            let work = batch * heads * n * n * (d + dv);
            tract_linalg::multithread::par_chunks_mut(&mut all_heads, 1, work, |_, chunk| {
                let mut scratch = Scratch::default();
                for &bh in chunk.iter() {
                    let (b, h) = (bh / heads, bh % heads);
                    let head = Head {
                        q: head_matrix(q, q_at, q_s, self.factors[0], b, h),
                        kt: head_matrix(kt, kt_at, kt_s, self.factors[1], b, h),
                        v: head_matrix(v, v_at, v_s, 1.0, b, h),
                        bias: bias.map(|bias| &bias[b * n..][..n]),
                        scale: self.scale,
                        n,
                        d,
                        dv,
                    };
                    let base = b * o_s[0] + h * o_s[1];
                    attend(&head, &mut scratch, &mut |i, c, values| {
                        // SAFETY: elements (b, h, i.., c) are this head's own,
                        // as the layout is a permutation of the axes.
                        unsafe { shared.write(base + i * o_s[2] + c * o_s[3], o_s[2], values) }
                    });
                }
                Ok(())
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}
