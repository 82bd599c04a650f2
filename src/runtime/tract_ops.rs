//! tract's ops for `--target tract` (semantics in `TOME_SPEC.md`, inputs and
//! outputs as `tome_passes::vit::tome::{FUSED_MERGE_OP, PROP_BIAS_OP}`):
//! `BipartiteMerge`, a block's matching and size-weighted merge in one node
//! from its keys (tome-kernels' `merge`; the standard-op form costs about
//! 40 small nodes per block; this one reads each token once), and `ProportionalBias`, the proportional-attention
//! Add done in place.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::array::Slice;
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

/// A one-wide `Slice` on axis `axis` at `index`, then `Rm(removed)`:
/// the slice's axis, or (tract's reshapes do this at batch 1) another axis
/// of one. An op can read index `index` of `axis` of the slice's input in
/// place of the copy.
pub(crate) struct Pick {
    pub axis: usize,
    pub index: usize,
    removed: usize,
}

impl Pick {
    /// The axis of the slice's input that holds axis `a` of the `Rm`'s
    /// output: the axis of one left in the slice's place holds the one
    /// removed.
    pub fn input_axis(&self, a: usize) -> usize {
        match a + (a >= self.removed) as usize {
            a if a == self.axis => self.removed,
            a => a,
        }
    }
}

/// The pick that `rm` ends, and the slice's input. Not while that input is
/// a moved axis: tract's axis changes push such moves down through the
/// slices into the ops' layouts, and cannot pass a tensor once several ops
/// read it (a move reaches a node through one input at a time): q, k and v
/// in `FusedAttention`, k in `BipartiteMerge` too.
pub(crate) fn picked_slice(model: &TypedModel, rm: &TypedNode) -> Option<(Pick, OutletId)> {
    let &AxisOp::Rm(removed) = rm.op_as::<AxisOp>()? else { return None };
    let slice_node = model.node(rm.inputs[0].node);
    let slice = slice_node.op_as::<Slice>()?;
    let start = slice.start.as_i64()?;
    if slice.end.as_i64()? != start + 1 || start < 0 {
        return None;
    }
    let input = slice_node.inputs[0];
    if removed != slice.axis && !model.outlet_fact(input).ok()?.shape.get(removed)?.is_one() {
        return None;
    }
    if model.node(input.node).op_as::<AxisOp>().is_some_and(|op| matches!(op, AxisOp::Move(..))) {
        return None;
    }
    Some((Pick { axis: slice.axis, index: start as usize, removed }, input))
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
    if !(2..=3).contains(&node.input.len()) || !(2..=3).contains(&node.output.len()) {
        bail!("{}: {FUSED_MERGE_OP} takes inputs (x, keys or scores[, size]) and gives outputs (x, size[, log_size])", node.name);
    }
    let log_size_rows: i64 = node.get_attr_opt("log_size_rows")?.unwrap_or(0);
    if !(0..=1).contains(&log_size_rows) || (log_size_rows == 1 && node.output.len() != 3) {
        bail!("{}: {FUSED_MERGE_OP} needs log_size_rows 0, or 1 with a third output, has {log_size_rows} and {} outputs", node.name, node.output.len());
    }
    let keys_layout = if keys_transposed == 1 { [0, 1, 3, 2] } else { [0, 1, 2, 3] };
    let log_size = node.output.len() == 3;
    let op = BipartiteMerge { r: r as usize, prefix: prefix as usize, keys_layout, pick: None, log_size, log_size_rows: log_size_rows == 1 };
    Ok((expand(op), vec![]))
}

/// Bipartite soft matching on the block's keys or given scores, then the
/// size-weighted merge.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct BipartiteMerge {
    pub r: usize,
    /// Protected prefix tokens (cls, dist, registers).
    pub prefix: usize,
    /// The axis of the keys that holds each of (B, H, N, D): [0, 1, 3, 2]
    /// for the ONNX node's `keys_transposed`, and whatever order tract's
    /// axis changes move them into after (it would copy them otherwise).
    pub keys_layout: [usize; 4],
    /// `Some((axis, i))` when the keys are index `i` of their input's
    /// `axis`, one axis more than the four (k picked from the qkv
    /// projection where `FusedAttention` reads it too).
    pub pick: Option<(usize, usize)>,
    /// Whether a third output gives `log(size)`.
    pub log_size: bool,
    /// Whether that output is spread over query rows, [B,1,N-r,N-r].
    pub log_size_rows: bool,
}

impl Expansion for BipartiteMerge {
    fn name(&self) -> StaticName {
        FUSED_MERGE_OP.into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2 + self.log_size as usize)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_output_arity(outputs, 2 + self.log_size as usize)?;
        // Input 1 is keys (rank 4, or 5 stacked with others), or scores
        // (rank 3); log(size) spread over rows is [B,1,N-r,N-r].
        let (per_token, rows) = outputs.split_at(if self.log_size_rows { 2 } else { outputs.len() });
        for (i, t) in inputs.iter().chain(per_token).enumerate() {
            s.equals(&t.datum_type, f32::datum_type())?;
            if i != 1 {
                s.equals(&t.rank, 3)?;
            }
        }
        for out in outputs {
            s.equals(&out.shape[0], &inputs[0].shape[0])?;
        }
        s.equals(&outputs[0].shape[2], &inputs[0].shape[2])?;
        for size in &per_token[1..] {
            s.equals(&size.shape[2], 1.to_dim())?;
        }
        for row in rows {
            s.equals(&row.datum_type, f32::datum_type())?;
            s.equals(&row.rank, 4)?;
            s.equals(&row.shape[1], 1.to_dim())?;
        }
        let r = self.r;
        s.given(&inputs[0].shape[1], move |s, n| {
            if let Ok(n) = n.to_usize() {
                self.check_tokens(n)?;
            }
            for out in per_token {
                s.equals(&out.shape[1], n.clone() - r)?;
            }
            for row in rows {
                s.equals(&row.shape[2], n.clone() - r)?;
                s.equals(&row.shape[3], n.clone() - r)?;
            }
            Ok(())
        })
    }

    /// Keys stacked with other tensors, [S,B,H,N,D] (onnxruntime
    /// `Attention`'s `present`), are index 0 of their first axis.
    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let mut op = self.clone();
        if model.outlet_fact(inputs[1])?.rank() == 5 && self.pick.is_none() {
            if self.keys_layout != [0, 1, 2, 3] {
                bail!("{prefix}: {FUSED_MERGE_OP} reads keys stacked [S,B,H,N,D] untransposed only (keys_transposed=0)");
            }
            (op.keys_layout, op.pick) = ([1, 2, 3, 4], Some((0, 0)));
        }
        model.wire_node(prefix, op, inputs)
    }
}

impl Op for BipartiteMerge {
    fn name(&self) -> StaticName {
        FUSED_MERGE_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("r={} prefix={} axes of keys (B, H, N, D): {:?}, (axis, index) picked: {:?}", self.r, self.prefix, self.keys_layout, self.pick)])
    }

    op_as_typed_op!();
}

impl TypedOp for BipartiteMerge {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        let ranks: Vec<usize> = inputs.iter().map(|f| f.rank()).collect();
        let keys_rank = 4 + self.pick.is_some() as usize;
        let metric_rank = if self.pick.is_some() { ranks[1] == keys_rank } else { (3..=4).contains(&ranks[1]) };
        if inputs.iter().any(|f| f.datum_type != f32::datum_type()) || ranks[0] != 3 || !metric_rank || ranks.get(2).is_some_and(|&r| r != 3) {
            bail!("{FUSED_MERGE_OP} takes float32 x [B,N,C], keys [B,H,N,D] (or stacked, [S,B,H,N,D]) or scores [B,⌈N/2⌉,⌊N/2⌋], and size [B,N,1]; got {inputs:?}");
        }
        if let Some((axis, i)) = self.pick.filter(|&(axis, i)| inputs[1].shape[axis].to_usize().is_ok_and(|len| i >= len)) {
            bail!("{FUSED_MERGE_OP}: keys are index {i} of axis {axis} of {:?}, which has fewer", inputs[1].shape);
        }
        if let Ok(n) = x.shape[1].to_usize() {
            self.check_tokens(n)?;
            let expected = [n.div_ceil(2), n / 2];
            let tokens_axis = self.keys_layout[2];
            if ranks[1] == keys_rank && inputs[1].shape[tokens_axis].to_usize().is_ok_and(|k| k != n) {
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
        let size = f32::fact([batch.clone(), n.clone(), 1.to_dim()]);
        let log_size = match self.log_size_rows {
            true => f32::fact([batch.clone(), 1.to_dim(), n.clone(), n.clone()]),
            false => size.clone(),
        };
        let mut facts = tvec!(f32::fact([batch, n, c]), size);
        facts.extend(self.log_size.then_some(log_size));
        Ok(facts)
    }

    /// Folds in a one-wide slice (with its axis removed) of the keys, k
    /// picked from the qkv projection: tract would copy it.
    fn declutter(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        if self.pick.is_some() || model.outlet_fact(node.inputs[1])?.rank() != 4 {
            return Ok(None);
        }
        let Some((pick, keys)) = picked_slice(model, model.node(node.inputs[1].node)) else { return Ok(None) };
        let op = BipartiteMerge { keys_layout: self.keys_layout.map(|a| pick.input_axis(a)), pick: Some((pick.axis, pick.index)), ..self.clone() };
        let mut inputs = node.inputs.clone();
        inputs[1] = keys;
        Ok(Some(TypedModelPatch::replace_single_op(model, node, &inputs, op)?))
    }

    /// Takes a moved axis of the keys into `keys_layout` (and the pick).
    fn change_axes(&self, model: &TypedModel, node: &TypedNode, io: InOut, change: &AxisOp) -> TractResult<Option<AxisChangeConsequence>> {
        let (InOut::In(1), &AxisOp::Move(from, to)) = (io, change) else { return Ok(None) };
        if model.outlet_fact(node.inputs[1])?.rank() != 4 + self.pick.is_some() as usize {
            return Ok(None);
        }
        let moved = |axis: usize| moved_axis(axis, from, to);
        let op = BipartiteMerge { keys_layout: self.keys_layout.map(moved), pick: self.pick.map(|(axis, i)| (moved(axis), i)), ..self.clone() };
        Ok(Some(AxisChangeConsequence { substitute_op: Some(Box::new(op)), wire_changes: tvec!((io, change.clone())) }))
    }

    as_op!();
}

impl EvalOp for BipartiteMerge {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shape = inputs[0].shape().to_vec();
        let &[batch, n, c] = shape.as_slice() else { bail!("{FUSED_MERGE_OP}: x must be [B,N,C], is {shape:?}") };
        let metric = self.metric(&inputs[1])?;
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
        // Images spread over tract's threads, when there is enough work: a
        // token's values in x and in the metric (keys picked from qkv are a
        // third of their input).
        let metric_per_token = match merge.metric {
            Metric::Keys { heads, d, .. } => heads * d,
            Metric::Scores(scores) => scores.len() / batch.max(1) / n.max(1),
        };
        let work = batch * n * (c + metric_per_token);
        let pool = |count: usize, task: &(dyn Fn(usize) + Sync)| {
            let mut images: Vec<usize> = (0..count).collect();
            // The closure cannot fail.
            let _ = tract_linalg::multithread::par_chunks_mut(&mut images, 1, work, |_, images| {
                images.iter().for_each(|&b| task(b));
                Ok(())
            });
        };
        merge.run_on(&pool, x_view.as_slice_mut::<f32>()?, size_view.as_slice_mut::<f32>()?);
        let log_size = match (self.log_size, self.log_size_rows) {
            (true, false) => {
                let mut log_size = unsafe { Tensor::uninitialized::<f32>(&[batch, out_n, 1])? };
                merge::log_of(size_view.as_slice::<f32>()?, log_size.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
                Some(log_size.into_tvalue())
            }
            (true, true) => {
                let mut rows = unsafe { Tensor::uninitialized::<f32>(&[batch, 1, out_n, out_n])? };
                merge::log_rows_of(size_view.as_slice::<f32>()?, out_n, rows.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
                Some(rows.into_tvalue())
            }
            (false, _) => None,
        };
        let mut outputs = tvec!(out_x.into_tvalue(), out_size.into_tvalue());
        outputs.extend(log_size);
        Ok(outputs)
    }
}

impl BipartiteMerge {
    /// Input 1 as the kernel reads it, in place: scores as they are, keys
    /// in whatever axis order `keys_layout` and `pick` say they lie.
    fn metric<'t>(&self, t: &'t Tensor) -> TractResult<Metric<'t>> {
        let values = floats(t)?;
        if t.rank() == 3 && self.pick.is_none() {
            return Ok(Metric::Scores(values));
        }
        if t.rank() != 4 + self.pick.is_some() as usize {
            bail!("{FUSED_MERGE_OP}: input 1 must be keys [B,H,N,D] or scores, is {:?}", t.shape());
        }
        let [b, heads, n, d] = self.keys_layout.map(|a| t.shape()[a]);
        // Tensors are dense, so strides are non-negative.
        let strides = self.keys_layout.map(|a| t.strides()[a] as usize);
        let first = self.pick.map_or(0, |(axis, i)| i * t.strides()[axis] as usize);
        let keys = values.get(first..first + merge::span([b, heads, n, d], strides)).context("keys beyond their tensor")?;
        Ok(Metric::Keys { keys, heads, d, strides })
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

    /// Keys moved into every axis order, or picked from a larger tensor,
    /// read back in place as the same keys.
    #[test]
    fn keys_in_any_axis_order_read_as_the_same_keys() {
        let dims = [2usize, 3, 5, 4];
        let at = |[b, h, n, d]: [usize; 4]| ((b * 3 + h) * 5 + n) * 4 + d;
        // Logical keys (b, h, n, d) with one more axis of 2 in front, which
        // the keys are index 1 of.
        let both = Tensor::from_shape(&[2, 2, 3, 5, 4], &(0..240).map(|v| v as f32 - 120.0).collect::<Vec<_>>()).unwrap();
        for perm in [[0, 1, 2, 3, 4], [0, 1, 2, 4, 3], [1, 2, 0, 3, 4], [3, 1, 0, 4, 2], [4, 3, 2, 1, 0], [1, 3, 0, 2, 4]] {
            // Physical axis i holds logical axis perm[i]; the layout maps back.
            let physical = both.clone().permute_axes(&perm).unwrap();
            let mut axes = [0; 5];
            perm.iter().enumerate().for_each(|(i, &a)| axes[a] = i);
            let pick = Some((axes[0], 1));
            let op = BipartiteMerge { r: 1, prefix: 0, keys_layout: [axes[1], axes[2], axes[3], axes[4]], pick, log_size: false, log_size_rows: false };
            let Ok(Metric::Keys { keys, heads, d, strides }) = op.metric(&physical) else { panic!("{perm:?}: keys") };
            assert_eq!((heads, d), (3, 4), "{perm:?}");
            for index in (0..120).map(|i| [i / 60, i / 20 % 3, i / 4 % 5, i % 4]) {
                let offset: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum();
                assert_eq!(keys[offset], at(index) as f32, "{perm:?} at {index:?}");
            }
        }
        // tract's reshape at batch 1 slices axis 2 of [1,N,3,H,D] and then
        // removes axis 0: [N,1,H,D], its axis 1 the slice's place.
        let pick = Pick { axis: 2, index: 1, removed: 0 };
        assert_eq!([0, 1, 2, 3].map(|a| pick.input_axis(a)), [1, 0, 3, 4]);
        let pick = Pick { axis: 2, index: 1, removed: 2 };
        assert_eq!([0, 1, 2, 3].map(|a| pick.input_axis(a)), [0, 1, 3, 4]);
        let op = BipartiteMerge { r: 1, prefix: 0, keys_layout: [0, 1, 2, 3], pick: None, log_size: false, log_size_rows: false };
        let keys = Tensor::from_shape(&dims, &(0..120).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let Ok(Metric::Keys { keys, strides, .. }) = op.metric(&keys) else { panic!("dense keys") };
        assert_eq!((keys.len(), strides), (120, [60, 20, 4, 1]));
    }
}
