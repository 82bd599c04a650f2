//! tomesd's merge and unmerge for one transformer block, as graph nodes
//! (`TOME_SPEC.md`, "Stable Diffusion UNets"). One matching per block, from
//! the block input; each merged sub-layer reads `merge(norm(x))` and its
//! branch is `unmerge`d before the residual Add.
//!
//! ```text
//! x ─ x/‖x‖ ─┬─ Gather(src tokens) ─┐
//!            └─ Gather(dst tokens) ─┴─ MatMul (cosine) ─ ArgMax → dst_of, best
//! best ─ TopK(all, descending) → order: order[:r] merge, order[r:] stay
//! merge(y)   = Concat(y[stay], (y[dst] + onehot(dst_of)ᵀ·y[merging]) / (1 + count))
//! unmerge(o) = GatherND(o, row of every token): a staying src its row, a
//!              merging src its dst's row, a dst its own
//! ```
//! No reducing scatter: the mean is a one-hot MatMul divided by the count;
//! the unmerge is one gather with a row index per token, built with one
//! ScatterElements (a permutation's inverse, no duplicates).

use crate::graph::{Graph, TensorType, FLOAT};
use crate::patch::{int_attr, Emitter, Patch, Rewire};
use crate::sd::matcher::UnetBlock;
use crate::PassError;

/// Where a block's tokens go: the constant split into src and dst tokens,
/// and how many merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// src tokens in tomesd's order (its `a_idx`).
    pub src: Vec<i64>,
    /// dst tokens in tomesd's order (its `b_idx`).
    pub dst: Vec<i64>,
    pub r: usize,
}

/// tomesd's split of an h×w token grid (row-major) with stride sy×sx and
/// dst at the top-left of each cell (`use_rand=False`): one dst per whole
/// cell; the rest, rows and columns left over by the cells included, src.
/// Order within each set does not change the result (attention is
/// permutation-equivariant and unmerge puts every row back), so both are
/// ascending.
pub fn split(h: usize, w: usize, sy: usize, sx: usize, r: usize) -> Split {
    let (hsy, wsx) = (h / sy, w / sx);
    let is_dst = |y: usize, x: usize| y < hsy * sy && x < wsx * sx && y.is_multiple_of(sy) && x.is_multiple_of(sx);
    let (mut src, mut dst) = (vec![], vec![]);
    for y in 0..h {
        for x in 0..w {
            let t = (y * w + x) as i64;
            if is_dst(y, x) { dst.push(t) } else { src.push(t) }
        }
    }
    let r = r.min(src.len());
    Split { src, dst, r }
}

/// The matching of one block, as tensors: `merge` and `unmerge` apply it.
pub struct Matching {
    /// [B, stay, 1] int64: the src tokens that stay, as token indices (none
    /// when every src merges).
    stay: Option<String>,
    /// [B, r, 1] int64: the src tokens that merge away.
    merging: String,
    /// [B, dst, r] float: 1 where a merging token joins that dst.
    joins: String,
    /// [B, dst, 1] float: 1 + how many tokens join each dst.
    count: String,
    /// [B, N, 1] int64: the row of the merged sequence each token reads back.
    rows: String,
}

/// Emits the matching of `block` from its input (float32 throughout).
fn matching(e: &mut Emitter, block: &UnetBlock, split: &Split, x_elem: i32) -> Matching {
    let (ns, nd, r) = (split.src.len() as i64, split.dst.len() as i64, split.r as i64);
    let stay_n = ns - r;
    let x = match x_elem {
        FLOAT => block.input.clone(),
        _ => e.cast("x_float", &block.input, FLOAT),
    };
    let norm = e.reduce("ReduceL2", "norm", &x, &[2], true);
    let metric = e.op("Div", "metric", &[&x, &norm], vec![]);
    let src_tokens = e.const_i64("src_tokens", &[ns], &split.src);
    let dst_tokens = e.const_i64("dst_tokens", &[nd], &split.dst);
    let a = e.op("Gather", "a", &[&metric, &src_tokens], vec![int_attr("axis", 1)]);
    let b = e.op("Gather", "b", &[&metric, &dst_tokens], vec![int_attr("axis", 1)]);
    let bt = e.transpose("b_t", &b, &[0, 2, 1]);
    let scores = e.op("MatMul", "scores", &[&a, &bt], vec![]);
    let dst_of = e.op("ArgMax", "dst_of", &[&scores], vec![int_attr("axis", 2), int_attr("keepdims", 1)]);
    let best = e.op("GatherElements", "best", &[&scores, &dst_of], vec![int_attr("axis", 2)]);
    let all = e.const_i64("order_k", &[1], &[ns]);
    let desc = vec![int_attr("axis", 1), int_attr("largest", 1), int_attr("sorted", 1)];
    let order = e.op_multi("TopK", "order", &[&best, &all], &["score", "index"], desc).swap_remove(1);
    let merging_a = e.slice("merging_a", &order, 1, 0, r, 1);
    let merging = e.op("Gather", "merging", &[&src_tokens, &merging_a], vec![int_attr("axis", 0)]);
    // Gathering by [B, k, 1] indices gives [B, k, 1] token indices, GatherND's form.
    let stay = (stay_n > 0).then(|| {
        let stay_a = e.slice("stay_a", &order, 1, r, ns, 1);
        e.op("Gather", "stay", &[&src_tokens, &stay_a], vec![int_attr("axis", 0)])
    });
    // joins[b, j, i] = 1 when merging token i joins dst j.
    let merging_dst = e.op("GatherElements", "merging_dst", &[&dst_of, &merging_a], vec![int_attr("axis", 1)]);
    let dst_range: Vec<i64> = (0..nd).collect();
    let dst_range = e.const_i64("dst_range", &[1, 1, nd], &dst_range);
    let joins_bool = e.op("Equal", "joins_bool", &[&merging_dst, &dst_range], vec![]);
    let joins_rd = e.cast("joins_rd", &joins_bool, FLOAT);
    let joins = e.transpose("joins", &joins_rd, &[0, 2, 1]);
    let joined = e.reduce("ReduceSum", "joined", &joins, &[2], true);
    let one = e.const_f32("one", &[1], &[1.0]);
    let count = e.op("Add", "count", &[&joined, &one], vec![]);
    // rank[i]: where src i sits in `order` (the inverse permutation).
    let positions: Vec<i64> = (0..ns).collect();
    let positions = e.const_i64("positions", &[1, ns, 1], &positions);
    let like_order = e.op("Shape", "order_shape", &[&order], vec![]);
    let positions = e.op("Expand", "positions_batch", &[&positions, &like_order], vec![]);
    let rank = e.op("ScatterElements", "rank", &[&positions, &order, &positions], vec![int_attr("axis", 1)]);
    // A staying src reads row rank - r; a merging one its dst's row, stay_n + dst_of.
    let r_const = e.const_i64("r", &[1], &[r]);
    let merges = e.op("Less", "merges", &[&rank, &r_const], vec![]);
    let stay_row = e.op("Sub", "stay_row", &[&rank, &r_const], vec![]);
    let stay_n_const = e.const_i64("stay_n", &[1], &[stay_n]);
    let joined_row = e.op("Add", "joined_row", &[&dst_of, &stay_n_const], vec![]);
    let src_rows = e.op("Where", "src_rows", &[&merges, &joined_row, &stay_row], vec![]);
    let dst_rows: Vec<i64> = (0..nd).map(|j| stay_n + j).collect();
    let dst_rows = e.const_i64("dst_rows", &[1, nd, 1], &dst_rows);
    // [B, 1, 1] zeros broadcast the constant rows over the batch.
    let first_rank = e.slice("first_rank", &rank, 1, 0, 1, 1);
    let zero = e.const_i64("zero", &[1], &[0]);
    let batch_zeros = e.op("Mul", "batch_zeros", &[&first_rank, &zero], vec![]);
    let dst_rows = e.op("Add", "dst_rows_batch", &[&batch_zeros, &dst_rows], vec![]);
    let by_split = e.op("Concat", "rows_by_split", &[&src_rows, &dst_rows], vec![int_attr("axis", 1)]);
    // Back to token order: token t is entry place[t] of concat(src, dst).
    let mut place = vec![0i64; (ns + nd) as usize];
    for (k, &t) in split.src.iter().chain(&split.dst).enumerate() {
        place[t as usize] = k as i64;
    }
    let place = e.const_i64("token_place", &[ns + nd], &place);
    let rows = e.op("Gather", "rows", &[&by_split, &place], vec![int_attr("axis", 1)]);
    Matching { stay, merging, joins, count, rows }
}

/// `merge(y)`: the staying src rows, then each dst row averaged with the
/// rows joining it. [B, N, C] → [B, N - r, C], in y's type.
fn merge(e: &mut Emitter, what: &str, y: &str, elem: i32, m: &Matching, split: &Split) -> String {
    let nd = split.dst.len() as i64;
    let y32 = match elem {
        FLOAT => y.to_string(),
        _ => e.cast(&format!("{what}.y_float"), y, FLOAT),
    };
    let gather_nd = |e: &mut Emitter, name: &str, index: &str| {
        e.op("GatherND", &format!("{what}.{name}"), &[&y32, index], vec![int_attr("batch_dims", 1)])
    };
    let merging = gather_nd(e, "merging", &m.merging);
    let dst_tokens = e.const_i64(&format!("{what}.dst_tokens"), &[nd], &split.dst);
    let dst = e.op("Gather", &format!("{what}.dst"), &[&y32, &dst_tokens], vec![int_attr("axis", 1)]);
    let joined = e.op("MatMul", &format!("{what}.joined"), &[&m.joins, &merging], vec![]);
    let sum = e.op("Add", &format!("{what}.sum"), &[&dst, &joined], vec![]);
    let mean = e.op("Div", &format!("{what}.mean"), &[&sum, &m.count], vec![]);
    let out = match &m.stay {
        Some(stay) => {
            let stay = gather_nd(e, "stay", stay);
            e.op("Concat", &format!("{what}.out"), &[&stay, &mean], vec![int_attr("axis", 1)])
        }
        None => mean,
    };
    match elem {
        FLOAT => out,
        _ => e.cast(&format!("{what}.out_cast"), &out, elem),
    }
}

/// `unmerge(o)`: every token reads its row of the merged sequence.
fn unmerge(e: &mut Emitter, what: &str, o: &str, m: &Matching) -> String {
    e.op("GatherND", &format!("{what}.out"), &[o, &m.rows], vec![int_attr("batch_dims", 1)])
}

/// The patch merging the chosen sub-layers of `block` with `split`.
pub fn block_patch(g: &Graph, block: &UnetBlock, split: &Split, merged: &[super::matcher::Kind]) -> Result<Patch, PassError> {
    let anchor = g.producer(&block.input).unwrap_or(block.sublayers[0].norm);
    let mut patch = Patch::new(format!("{}: tomesd r={}", block.name, split.r), anchor);
    patch.resized_axis = Some(1);
    let x_ty = g.ty(&block.input).cloned().ok_or_else(|| PassError::MissingType(block.input.clone()))?;
    let mut e = Emitter::new(&mut patch, format!("{}.tomesd", block.name), g.opset);
    let m = matching(&mut e, block, split, x_ty.elem);
    let mut rewires = vec![];
    let mut types = vec![];
    for sub in block.sublayers.iter().filter(|s| merged.contains(&s.kind)) {
        let kind = sub.kind.name();
        let normed = g.node(sub.norm).output().to_string();
        let elem = g.ty(&normed).map_or(FLOAT, |t| t.elem);
        let merged_in = merge(&mut e, &format!("{kind}.merge"), &normed, elem, &m, split);
        types.push((merged_in.clone(), tokens(&x_ty, block.tokens - split.r, block.width, elem)));
        for (id, slot) in g.consumers(&normed) {
            rewires.push(Rewire { node: id, slot, tensor: merged_in.clone() });
        }
        let branch = g.node(sub.residual).input(sub.branch_slot).unwrap_or_default().to_string();
        let restored = unmerge(&mut e, &format!("{kind}.unmerge"), &branch, &m);
        rewires.push(Rewire { node: sub.residual, slot: sub.branch_slot, tensor: restored });
    }
    patch.rewires = rewires;
    patch.types.extend(types);
    Ok(patch)
}

fn tokens(like: &TensorType, n: usize, c: usize, elem: i32) -> TensorType {
    let mut ty = crate::patch::tokens_type(like, n, c);
    ty.elem = elem;
    ty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dst_is_the_top_left_of_each_whole_cell() {
        // 5x5 grid, 2x2 cells: four whole cells, the last row and column are all src.
        let s = split(5, 5, 2, 2, 100);
        assert_eq!(s.dst, vec![0, 2, 10, 12]);
        assert_eq!(s.src.len(), 21);
        assert_eq!(s.r, 21, "r is clamped to the src count");
    }

    #[test]
    fn three_quarters_merges_every_src_at_stride_two() {
        let s = split(16, 16, 2, 2, (256.0 * 0.75) as usize);
        assert_eq!((s.src.len(), s.dst.len(), s.r), (192, 64, 192));
    }
}
