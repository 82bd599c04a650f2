//! tract's ops for `--target tract` (semantics in `TOME_SPEC.md`, inputs and
//! outputs as `tome_passes::vit::tome::{FUSED_MERGE_OP, PROP_BIAS_OP}`):
//! `BipartiteMerge`, a block's matching and size-weighted merge in one node
//! from its keys (tome-kernels' `merge`; the standard-op form costs about
//! 40 small nodes per block; this one reads each token once), and `ProportionalBias`, the proportional-attention
//! Add done in place.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use std::borrow::Cow;

use tract_onnx::tract_hir::internal::*;

use tome_kernels::merge::{self, Merge, Metric};
use tome_passes::vit::tome::{FUSED_MERGE_OP, PROP_BIAS_OP};

/// tract's ONNX front end, knowing `BipartiteMerge`, `ProportionalBias`,
/// `FusedAttention` (`tract_attention`) and `FusedLayerNorm` (`tract_norm`).
/// Every place that hands a model to tract goes through here, so compiled
/// `--target tract` files load.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert(FUSED_MERGE_OP, build);
    onnx.op_register.insert(PROP_BIAS_OP, build_bias);
    onnx.op_register.insert(tome_passes::vit::lower::FUSED_ATTENTION_OP, crate::runtime::tract_attention::build);
    onnx.op_register.insert(tome_passes::vit::lower::FUSED_LAYER_NORM_OP, crate::runtime::tract_norm::build);
    onnx
}

/// Where axis `axis` lands when tract's `AxisOp::Move(from, to)` moves
/// `from` to `to` (the ops' layouts follow tract's axis changes with it).
pub(crate) fn moved_axis(axis: usize, from: usize, to: usize) -> usize {
    match axis {
        a if a == from => to,
        a if from < a && a <= to => a - 1,
        a if to <= a && a < from => a + 1,
        a => a,
    }
}

/// A float32 tensor's values, in memory order.
pub(crate) fn floats(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let r: i64 = node.get_attr("r")?;
    let prefix: i64 = node.get_attr_opt("prefix")?.unwrap_or(0);
    let keys_transposed: i64 = node.get_attr_opt("keys_transposed")?.unwrap_or(0);
    if r < 1 || prefix < 0 || !(0..=1).contains(&keys_transposed) {
        bail!("{}: {FUSED_MERGE_OP} needs r >= 1, prefix >= 0 and keys_transposed 0 or 1, has r={r}, prefix={prefix}, keys_transposed={keys_transposed}", node.name);
    }
    if !(2..=3).contains(&node.input.len()) || node.output.len() != 2 {
        bail!("{}: {FUSED_MERGE_OP} takes inputs (x, keys or scores[, size]) and gives outputs (x, size)", node.name);
    }
    let keys_layout = if keys_transposed == 1 { [0, 1, 3, 2] } else { [0, 1, 2, 3] };
    Ok((expand(BipartiteMerge { r: r as usize, prefix: prefix as usize, keys_layout }), vec![]))
}

/// Bipartite soft matching on the block's keys or given scores, then the
/// size-weighted merge.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct BipartiteMerge {
    pub r: usize,
    /// Protected prefix tokens (cls, dist, registers).
    pub prefix: usize,
    /// The axis of rank-4 keys that holds each of (B, H, N, D): [0, 1, 3,
    /// 2] for the ONNX node's `keys_transposed`, and whatever order tract's
    /// axis changes move them into after (it would copy them otherwise).
    pub keys_layout: [usize; 4],
}

impl Expansion for BipartiteMerge {
    fn name(&self) -> StaticName {
        FUSED_MERGE_OP.into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_output_arity(outputs, 2)?;
        // Input 1 is keys (rank 4) or scores (rank 3).
        for (i, t) in inputs.iter().chain(outputs).enumerate() {
            s.equals(&t.datum_type, f32::datum_type())?;
            if i != 1 {
                s.equals(&t.rank, 3)?;
            }
        }
        for out in outputs {
            s.equals(&out.shape[0], &inputs[0].shape[0])?;
        }
        s.equals(&outputs[0].shape[2], &inputs[0].shape[2])?;
        s.equals(&outputs[1].shape[2], 1.to_dim())?;
        let r = self.r;
        s.given(&inputs[0].shape[1], move |s, n| {
            if let Ok(n) = n.to_usize() {
                self.check_tokens(n)?;
            }
            s.equals(&outputs[0].shape[1], n.clone() - r)?;
            s.equals(&outputs[1].shape[1], n - r)
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for BipartiteMerge {
    fn name(&self) -> StaticName {
        FUSED_MERGE_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("r={} prefix={} axes of keys (B, H, N, D): {:?}", self.r, self.prefix, self.keys_layout)])
    }

    op_as_typed_op!();
}

impl TypedOp for BipartiteMerge {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        let ranks: Vec<usize> = inputs.iter().map(|f| f.rank()).collect();
        if inputs.iter().any(|f| f.datum_type != f32::datum_type()) || ranks[0] != 3 || !(3..=4).contains(&ranks[1]) || ranks.get(2).is_some_and(|&r| r != 3) {
            bail!("{FUSED_MERGE_OP} takes float32 x [B,N,C], keys [B,H,N,D] or scores [B,⌈N/2⌉,⌊N/2⌋], and size [B,N,1]; got {inputs:?}");
        }
        if let Ok(n) = x.shape[1].to_usize() {
            self.check_tokens(n)?;
            let expected = [n.div_ceil(2), n / 2];
            let tokens_axis = self.keys_layout[2];
            if ranks[1] == 4 && inputs[1].shape[tokens_axis].to_usize().is_ok_and(|k| k != n) {
                bail!("{FUSED_MERGE_OP}: keys must have {n} tokens on axis {tokens_axis}, are {:?}", inputs[1].shape);
            }
            if ranks[1] == 3 && inputs[1].shape.iter().skip(1).map(|d| d.to_usize().ok()).ne(expected.map(Some)) {
                bail!("{FUSED_MERGE_OP}: scores must be [B,{},{}] for {n} tokens, are {:?}", expected[0], expected[1], inputs[1].shape);
            }
            if inputs.get(2).is_some_and(|s| s.shape.iter().skip(1).map(|d| d.to_usize().ok()).ne([Some(n), Some(1)])) {
                bail!("{FUSED_MERGE_OP}: size must be [B,{n},1], is {:?}", inputs[2].shape);
            }
        }
        let (batch, n, c) = (x.shape[0].clone(), x.shape[1].clone() - self.r, x.shape[2].clone());
        Ok(tvec!(f32::fact([batch.clone(), n.clone(), c]), f32::fact([batch, n, 1.to_dim()])))
    }

    /// Takes a moved axis of the keys into `keys_layout`.
    fn change_axes(&self, model: &TypedModel, node: &TypedNode, io: InOut, change: &AxisOp) -> TractResult<Option<AxisChangeConsequence>> {
        let (InOut::In(1), &AxisOp::Move(from, to)) = (io, change) else { return Ok(None) };
        if model.outlet_fact(node.inputs[1])?.rank() != 4 {
            return Ok(None);
        }
        let op = BipartiteMerge { keys_layout: self.keys_layout.map(|a| moved_axis(a, from, to)), ..self.clone() };
        Ok(Some(AxisChangeConsequence { substitute_op: Some(Box::new(op)), wire_changes: tvec!((io, change.clone())) }))
    }

    as_op!();
}

impl EvalOp for BipartiteMerge {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shape = inputs[0].shape().to_vec();
        let &[batch, n, c] = shape.as_slice() else { bail!("{FUSED_MERGE_OP}: x must be [B,N,C], is {shape:?}") };
        let (values, shape, transposed) = self.metric_input(&inputs[1])?;
        let metric = Metric::of(&values, &shape, transposed)
            .ok_or_else(|| format_err!("{FUSED_MERGE_OP}: input 1 must be keys [B,H,N,D] or scores, is {:?}", inputs[1].shape()))?;
        let merge = Merge {
            x: floats(&inputs[0])?,
            metric,
            size: inputs.get(2).map(|s| floats(s)).transpose()?,
            batch,
            n,
            c,
            r: self.r,
            prefix: self.prefix,
        };
        merge.check_lengths().map_err(|e| format_err!("{FUSED_MERGE_OP}: {e}"))?;
        let out_n = n - self.r;
        // Every element is written by the kernel, row by row.
        let mut out_x = unsafe { Tensor::uninitialized::<f32>(&[batch, out_n, c])? };
        let mut out_size = unsafe { Tensor::uninitialized::<f32>(&[batch, out_n, 1])? };
        let mut x_view = out_x.try_as_plain_ram_mut()?;
        let mut size_view = out_size.try_as_plain_ram_mut()?;
        // Images spread over tract's threads, when there is enough work.
        let work = batch * n * (c + values.len() / batch.max(1) / n.max(1));
        let pool = |count: usize, task: &(dyn Fn(usize) + Sync)| {
            let mut images: Vec<usize> = (0..count).collect();
            // The closure cannot fail.
            let _ = tract_linalg::multithread::par_chunks_mut(&mut images, 1, work, |_, images| {
                images.iter().for_each(|&b| task(b));
                Ok(())
            });
        };
        merge.run_on(&pool, x_view.as_slice_mut::<f32>()?, size_view.as_slice_mut::<f32>()?);
        Ok(tvec!(out_x.into_tvalue(), out_size.into_tvalue()))
    }
}

impl BipartiteMerge {
    /// Input 1 as the kernel reads it: keys [B,H,N,D] or [B,H,D,N] in
    /// memory order as they lie where `keys_layout` allows, else copied
    /// into [B,H,N,D] (tract's key sum is a head's worth, small); scores as
    /// they are. The values, their shape and whether keys are transposed.
    fn metric_input<'t>(&self, t: &'t Tensor) -> TractResult<(Cow<'t, [f32]>, Vec<usize>, bool)> {
        let values = floats(t)?;
        if t.rank() != 4 {
            return Ok((Cow::Borrowed(values), t.shape().to_vec(), false));
        }
        let [b, h, n, d] = self.keys_layout.map(|a| t.shape()[a]);
        // Tensors are dense, so strides are non-negative.
        let strides = self.keys_layout.map(|a| t.strides()[a] as usize);
        // Whether axes of these sizes and strides lie as a dense tensor of
        // that shape (an axis of one has any stride).
        let dense = |dims: [usize; 4], strides: [usize; 4]| {
            (0..4).all(|i| dims[i] == 1 || strides[i] == dims[i + 1..].iter().product::<usize>())
        };
        let [sb, sh, sn, sd] = strides;
        if dense([b, h, n, d], strides) {
            return Ok((Cow::Borrowed(values), vec![b, h, n, d], false));
        }
        if dense([b, h, d, n], [sb, sh, sd, sn]) {
            return Ok((Cow::Borrowed(values), vec![b, h, d, n], true));
        }
        let mut keys = Vec::with_capacity(b * h * n * d);
        for row in (0..b).flat_map(|ib| (0..h).map(move |ih| ib * sb + ih * sh)) {
            for token in (0..n).map(|it| row + it * sn) {
                keys.extend((0..d).map(|k| values[token + k * sd]));
            }
        }
        Ok((Cow::Owned(keys), vec![b, h, n, d], false))
    }

    fn check_tokens(&self, n: usize) -> TractResult<()> {
        merge::check(self.r, self.prefix, n).map_err(|e| format_err!("{FUSED_MERGE_OP}: {e}"))
    }
}

fn build_bias(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if node.input.len() != 2 || node.output.len() != 1 {
        bail!("{}: {PROP_BIAS_OP} takes inputs (logits, bias) and gives one output", node.name);
    }
    Ok((expand(ProportionalBias), vec![]))
}

/// The proportional-attention Add, `logits[b,h,i,j] + bias[b,0,0,j]`, in
/// place. tract fuses a bias into Q·Kᵀ only when it does not vary with the
/// batch; past batch 1 its generic broadcast Add streams the logits at a
/// quarter of this loop's speed. At batch 1 the op turns back into tract's
/// Add, which then fuses for free.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ProportionalBias;

impl Expansion for ProportionalBias {
    fn name(&self) -> StaticName {
        PROP_BIAS_OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        for t in inputs.iter().chain(outputs) {
            s.equals(&t.datum_type, f32::datum_type())?;
            s.equals(&t.rank, 4)?;
        }
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for ProportionalBias {
    fn name(&self) -> StaticName {
        PROP_BIAS_OP.into()
    }

    op_as_typed_op!();
}

impl TypedOp for ProportionalBias {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (logits, bias) = (inputs[0], inputs[1]);
        let fits = bias.shape.len() == 4 && bias.shape[1].is_one() && bias.shape[2].is_one() && bias.shape[3] == logits.shape[3];
        if logits.rank() != 4 || !fits || logits.datum_type != f32::datum_type() || bias.datum_type != f32::datum_type() {
            bail!("{PROP_BIAS_OP} takes float32 logits [B,H,N,N] and bias [B,1,1,N]; got {logits:?} and {bias:?}");
        }
        Ok(tvec!(logits.without_value()))
    }

    fn declutter(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        if !model.outlet_fact(node.inputs[0])?.shape[0].is_one() {
            return Ok(None);
        }
        let add = tract_onnx::tract_core::ops::math::add();
        Ok(Some(TypedModelPatch::replace_single_op(model, node, &node.inputs, add)?))
    }

    as_op!();
}

impl EvalOp for ProportionalBias {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let bias = inputs.pop().context("bias")?;
        let mut logits = inputs.pop().context("logits")?.into_tensor();
        let shape = logits.shape().to_vec();
        let &[batch, _, _, n] = shape.as_slice() else { bail!("{PROP_BIAS_OP}: logits must be [B,H,N,N], are {shape:?}") };
        if bias.shape() != [batch, 1, 1, n] {
            bail!("{PROP_BIAS_OP}: bias must be [{batch},1,1,{n}], is {:?}", bias.shape());
        }
        let bias = floats(&bias)?;
        let mut view = logits.try_as_plain_ram_mut()?;
        let rows_per_image = shape[1] * shape[2];
        for (k, row) in view.as_slice_mut::<f32>()?.chunks_exact_mut(n).enumerate() {
            let b = &bias[k / rows_per_image * n..][..n];
            for (v, add) in row.iter_mut().zip(b) {
                *v += add;
            }
        }
        Ok(tvec!(logits.into_tvalue()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys moved into every axis order come back as the same keys: read in
    /// place where they lie as [B,H,N,D] or [B,H,D,N], copied otherwise.
    #[test]
    fn keys_in_any_axis_order_read_as_the_same_keys() {
        let dims = [2usize, 3, 5, 4];
        let logical = Tensor::from_shape(&dims, &(0..120).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let at = |[b, h, n, d]: [usize; 4]| ((b * 3 + h) * 5 + n) * 4 + d;
        let mut copied = 0;
        for perm in [[0, 1, 2, 3], [0, 1, 3, 2], [1, 0, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0], [0, 2, 1, 3]] {
            // Physical axis i holds logical axis perm[i]; keys_layout maps back.
            let physical = logical.clone().permute_axes(&perm).unwrap();
            let mut keys_layout = [0; 4];
            perm.iter().enumerate().for_each(|(i, &a)| keys_layout[a] = i);
            let op = BipartiteMerge { r: 1, prefix: 0, keys_layout };
            let (values, shape, transposed) = op.metric_input(&physical).unwrap();
            copied += matches!(values, Cow::Owned(_)) as usize;
            let [b, h, k2, k3] = shape[..] else { panic!("rank 4: {shape:?}") };
            assert_eq!((b, h), (2, 3), "{perm:?}");
            for (i, &v) in values.iter().enumerate() {
                let (ib, ih, i2, i3) = (i / (h * k2 * k3), i / (k2 * k3) % h, i / k3 % k2, i % k3);
                let (n, d) = if transposed { (i3, i2) } else { (i2, i3) };
                assert_eq!(v, at([ib, ih, n, d]) as f32, "{perm:?} at {i}");
            }
        }
        assert_eq!(copied, 4, "only [B,H,N,D] and [B,H,D,N] are read in place");
        // A one-head sum (what --target tract passes) moved behind its
        // tokens lies as [B,N,D] all the same: read in place.
        let sum = Tensor::from_shape(&[2, 1, 5, 4], &(0..40).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let op = BipartiteMerge { r: 1, prefix: 0, keys_layout: [0, 2, 1, 3] };
        let moved = sum.permute_axes(&[0, 2, 1, 3]).unwrap();
        let (values, shape, transposed) = op.metric_input(&moved).unwrap();
        assert!(matches!(values, Cow::Borrowed(_)) && shape == [2, 1, 5, 4] && !transposed, "{shape:?}");
    }
}
