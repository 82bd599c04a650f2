//! tomesd's merge and unmerge for one transformer block, as graph nodes
//! (`TOME_SPEC.md`, "Stable Diffusion UNets"). One matching per block, from
//! the block input; each merged sub-layer reads `merge(norm(x))` and its
//! branch is `unmerge`d before the residual Add.
//!
//! ```text
//! x ─ x/‖x‖ ─┬─ Gather(src tokens) ─┐
//!            └─ Gather(dst tokens) ─┴─ MatMul (cosine) ─ ArgMax → dst_of, best
//! best ─ TopK(K = min(r, src - r)) → which r src tokens merge (flags)
//! merge(y)   = Concat(y[stay], (y[dst] + joinsᵀ·y[src]) / (1 + count))
//! unmerge(o) = GatherElements(o, row of every token): a staying src its row, a
//!              merging src its dst's row, a dst its own
//! ```
//! No reducing scatter: the mean is a one-hot MatMul divided by the count
//! (`joins`, 1 where a merging src meets its dst); the unmerge is one
//! gather with a row index per token (GatherElements: onnxruntime's
//! shape inference mishandles GatherND's batch_dims).

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

/// A split with the dst of each whole sy×sx cell drawn uniformly from the
/// cell by `rng` (tomesd's `use_rand=True` draws one per cell the same way).
pub fn random_split(h: usize, w: usize, sy: usize, sx: usize, r: usize, rng: &mut Rng) -> Split {
    let (hsy, wsx) = (h / sy, w / sx);
    let mut is_dst = vec![false; h * w];
    for cy in 0..hsy {
        for cx in 0..wsx {
            let k = rng.below((sy * sx) as u64) as usize;
            is_dst[(cy * sy + k / sx) * w + cx * sx + k % sx] = true;
        }
    }
    let (mut src, mut dst) = (vec![], vec![]);
    for (t, d) in is_dst.iter().enumerate() {
        if *d { dst.push(t as i64) } else { src.push(t as i64) }
    }
    let r = r.min(src.len());
    Split { src, dst, r }
}

/// xorshift64*: a small, seeded, portable generator (the patterns must be
/// the same bytes on every machine).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n (n small: the modulo bias is below 1e-17).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How many dst patterns a block with random dst cells carries; the
/// timestep picks one (t mod PATTERNS), so consecutive denoising steps use
/// different cells.
pub const PATTERNS: usize = 64;

/// The token sets of a block: one split, or one per pattern picked by the
/// timestep input. As tomesd, an odd batch uses the top-left split (random
/// cells there would differ between the prompted and unprompted halves of
/// classifier-free guidance): `splits` ends with it.
pub enum Tokens<'a> {
    Fixed(&'a Split),
    Random { splits: &'a [Split], timestep: &'a str, stream: &'a str },
}

impl Tokens<'_> {
    fn first(&self) -> &Split {
        match self {
            Tokens::Fixed(s) => s,
            Tokens::Random { splits, .. } => &splits[0],
        }
    }
}

/// `v - floor(v / m) * m` for a float32 scalar `v` (ONNX's Mod on floats
/// needs fmod, which TensorRT lacks).
fn float_mod(e: &mut Emitter, what: &str, v: &str, m: f32) -> String {
    let m = e.const_f32(&format!("{what}.m"), &[], &[m]);
    let q = e.op("Div", &format!("{what}.div"), &[v, &m], vec![]);
    let q = e.op("Floor", &format!("{what}.floor"), &[&q], vec![]);
    let q = e.op("Mul", &format!("{what}.multiple"), &[&q, &m], vec![]);
    e.op("Sub", what, &[v, &q], vec![])
}

/// The matching of one block, as tensors: `merge` and `unmerge` apply it.
pub struct Matching {
    /// [B, stay, 1] int64: the src tokens that stay, as token indices, in
    /// token order (none when every src merges).
    stay: Option<String>,
    /// [B, dst, src] float: 1 where src token i merges into dst j.
    joins: String,
    /// [B, dst, 1] float: 1 + how many tokens join each dst.
    count: String,
    /// [B, N, 1] int64: the row of the merged sequence each token reads back.
    rows: String,
    /// [src] and [dst] int64: the token indices of each set.
    src_tokens: String,
    dst_tokens: String,
}

/// The token indices of `tokens`' src set, dst set, and each token's place
/// in concat(src, dst): constants, or rows of per-pattern tables picked by
/// the timestep.
fn token_tensors(e: &mut Emitter, tokens: &Tokens) -> (String, String, String) {
    let place_of = |s: &Split| {
        let mut place = vec![0i64; s.src.len() + s.dst.len()];
        for (k, &t) in s.src.iter().chain(&s.dst).enumerate() {
            place[t as usize] = k as i64;
        }
        place
    };
    match tokens {
        Tokens::Fixed(s) => {
            let n = (s.src.len() + s.dst.len()) as i64;
            (
                e.const_i64("src_tokens", &[s.src.len() as i64], &s.src),
                e.const_i64("dst_tokens", &[s.dst.len() as i64], &s.dst),
                e.const_i64("token_place", &[n], &place_of(s)),
            )
        }
        Tokens::Random { splits, timestep, stream } => {
            // k = floor(t) mod patterns, from the first timestep of the batch, in float32
            // (exact below 2^24); an odd batch takes the last split, the top-left one.
            let p = splits.len() as i64;
            let random = (p - 1) as f32;
            let flat_shape = e.const_i64("t_flat_shape", &[1], &[-1]);
            let flat = e.op("Reshape", "t_flat", &[timestep, &flat_shape], vec![]);
            let first = e.const_i64("t_first", &[], &[0]);
            let t = e.op("Gather", "t", &[&flat, &first], vec![int_attr("axis", 0)]);
            let t = e.cast("t_float", &t, FLOAT);
            let t = e.op("Floor", "t_floor", &[&t], vec![]);
            let k = float_mod(e, "t_mod", &t, random);
            let shape = e.op("Shape", "stream_shape", &[stream], vec![]);
            let batch = e.op("Gather", "batch", &[&shape, &first], vec![int_attr("axis", 0)]);
            let batch = e.cast("batch_float", &batch, FLOAT);
            let odd = float_mod(e, "batch_mod", &batch, 2.0);
            let half = e.const_f32("half_batch", &[], &[0.5]);
            let odd = e.op("Greater", "odd_batch", &[&odd, &half], vec![]);
            let top_left = e.const_f32("top_left_pattern", &[], &[random]);
            let k = e.op("Where", "pattern_f", &[&odd, &top_left, &k], vec![]);
            let k = e.cast("pattern", &k, crate::graph::INT64);
            let (ns, nd) = (splits[0].src.len() as i64, splits[0].dst.len() as i64);
            let src: Vec<i64> = splits.iter().flat_map(|s| s.src.clone()).collect();
            let dst: Vec<i64> = splits.iter().flat_map(|s| s.dst.clone()).collect();
            let place: Vec<i64> = splits.iter().flat_map(place_of).collect();
            let src = e.const_i64("src_table", &[p, ns], &src);
            let dst = e.const_i64("dst_table", &[p, nd], &dst);
            let place = e.const_i64("place_table", &[p, ns + nd], &place);
            let pick = |e: &mut Emitter, what: &str, table: &str| e.op("Gather", what, &[table, &k], vec![int_attr("axis", 0)]);
            (pick(e, "src_tokens", &src), pick(e, "dst_tokens", &dst), pick(e, "token_place", &place))
        }
    }
}

/// Emits the matching of `block` from its input (float32 throughout).
///
/// The r best-matched src tokens merge. They are found with one TopK of
/// K = min(r, src - r): the r largest, or the src - r smallest that stay
/// (TensorRT takes K < 3840; a whole sort would need K = src). The staying
/// tokens are compacted in token order by an exclusive CumSum of their flags
/// and one ScatterElements (the merging ones all write one spare row, dropped).
fn matching(e: &mut Emitter, block: &UnetBlock, tokens: &Tokens, x_elem: i32) -> Matching {
    let split = tokens.first();
    let (ns, nd, r) = (split.src.len() as i64, split.dst.len() as i64, split.r as i64);
    let stay_n = ns - r;
    let x = match x_elem {
        FLOAT => block.input.clone(),
        _ => e.cast("x_float", &block.input, FLOAT),
    };
    let norm = e.reduce("ReduceL2", "norm", &x, &[2], true);
    let metric = e.op("Div", "metric", &[&x, &norm], vec![]);
    let (src_tokens, dst_tokens, place) = token_tensors(e, tokens);
    let a = e.op("Gather", "a", &[&metric, &src_tokens], vec![int_attr("axis", 1)]);
    let b = e.op("Gather", "b", &[&metric, &dst_tokens], vec![int_attr("axis", 1)]);
    let bt = e.transpose("b_t", &b, &[0, 2, 1]);
    let scores = e.op("MatMul", "scores", &[&a, &bt], vec![]);
    let dst_of = e.op("ArgMax", "dst_of", &[&scores], vec![int_attr("axis", 2), int_attr("keepdims", 1)]);
    let best = e.op("GatherElements", "best", &[&scores, &dst_of], vec![int_attr("axis", 2)]);
    let zero = e.const_f32("zero", &[1], &[0.0]);
    let one = e.const_f32("one", &[1], &[1.0]);
    // [B, src, 1] zeros, float and int64: flags, ones and index buffers start from them (their batch follows x).
    let zeros = e.op("Mul", "zeros", &[&best, &zero], vec![]);
    let zero_i = e.const_i64("zero_i64", &[1], &[0]);
    let zeros_i = e.op("Mul", "zeros_i", &[&dst_of, &zero_i], vec![]);
    // merges [B, src, 1]: 1.0 for the r src tokens with the best matches.
    let merges = if stay_n == 0 {
        e.op("Add", "merges", &[&zeros, &one], vec![])
    } else {
        let (k, largest) = if r <= stay_n { (r, 1) } else { (stay_n, 0) };
        let k_const = e.const_i64("k", &[1], &[k]);
        let attrs = vec![int_attr("axis", 1), int_attr("largest", largest), int_attr("sorted", 1)];
        let top = e.op_multi("TopK", "chosen", &[&best, &k_const], &["score", "index"], attrs);
        let chosen_zeros = e.op("Mul", "chosen_zeros", &[&top[0], &zero], vec![]);
        let ones = e.op("Add", "chosen_ones", &[&chosen_zeros, &one], vec![]);
        let chosen = e.op("ScatterElements", "chosen_flag", &[&zeros, &top[1], &ones], vec![int_attr("axis", 1)]);
        if largest == 1 { chosen } else { e.op("Sub", "merges", &[&one, &chosen], vec![]) }
    };
    // joins[b, j, i] = 1 when src i merges into dst j.
    let dst_range: Vec<i64> = (0..nd).collect();
    let dst_range = e.const_i64("dst_range", &[1, 1, nd], &dst_range);
    let is_dst_bool = e.op("Equal", "is_dst_bool", &[&dst_of, &dst_range], vec![]);
    let is_dst = e.cast("is_dst", &is_dst_bool, FLOAT);
    let joins_sd = e.op("Mul", "joins_sd", &[&is_dst, &merges], vec![]);
    let joins = e.transpose("joins", &joins_sd, &[0, 2, 1]);
    let joined = e.reduce("ReduceSum", "joined", &joins, &[2], true);
    let count = e.op("Add", "count", &[&joined, &one], vec![]);
    // A merging src reads its dst's row, stay_n + dst_of; a staying one its place among those staying.
    let stay_n_const = e.const_i64("stay_n", &[1], &[stay_n]);
    let joined_row = e.op("Add", "joined_row", &[&dst_of, &stay_n_const], vec![]);
    let (src_rows, stay) = if stay_n == 0 {
        (joined_row, None)
    } else {
        let stays_f = e.op("Sub", "stays_f", &[&one, &merges], vec![]);
        let axis = e.const_i64("cumsum_axis", &[], &[1]);
        // Counts below 2^24 are exact in float32 (TensorRT's CumSum takes no int64).
        let place_f = e.op("CumSum", "stay_place_f", &[&stays_f, &axis], vec![int_attr("exclusive", 1)]);
        let place = e.cast("stay_place", &place_f, crate::graph::INT64);
        let half = e.const_f32("half", &[1], &[0.5]);
        let stays = e.op("Greater", "stays", &[&stays_f, &half], vec![]);
        let src_rows = e.op("Where", "src_rows", &[&stays, &place, &joined_row], vec![]);
        // The staying tokens' ids, written at their places; merging ones all land on the spare row stay_n.
        let target = e.op("Where", "stay_target", &[&stays, &place, &stay_n_const], vec![]);
        let column = e.const_i64("src_column_shape", &[3], &[1, ns, 1]);
        let token_ids = e.op("Reshape", "src_token_ids", &[&src_tokens, &column], vec![]);
        let token_ids = e.op("Add", "src_token_ids_batch", &[&zeros_i, &token_ids], vec![]);
        let buffer = e.slice("stay_buffer", &zeros_i, 1, 0, stay_n + 1, 1);
        let written = e.op("ScatterElements", "stay_written", &[&buffer, &target, &token_ids], vec![int_attr("axis", 1)]);
        (src_rows, Some(e.slice("stay", &written, 1, 0, stay_n, 1)))
    };
    let dst_rows: Vec<i64> = (0..nd).map(|j| stay_n + j).collect();
    let dst_rows = e.const_i64("dst_rows", &[1, nd, 1], &dst_rows);
    // [B, 1, 1] zeros broadcast the constant rows over the batch.
    let batch_zeros = e.slice("batch_zeros", &zeros_i, 1, 0, 1, 1);
    let dst_rows = e.op("Add", "dst_rows_batch", &[&batch_zeros, &dst_rows], vec![]);
    let by_split = e.op("Concat", "rows_by_split", &[&src_rows, &dst_rows], vec![int_attr("axis", 1)]);
    // Back to token order: token t is entry place[t] of concat(src, dst).
    let rows = e.op("Gather", "rows", &[&by_split, &place], vec![int_attr("axis", 1)]);
    Matching { stay, joins, count, rows, src_tokens, dst_tokens }
}

/// `merge(y)`: the staying src rows, then each dst row averaged with the
/// rows joining it. [B, N, C] → [B, N - r, C], in y's type.
fn merge(e: &mut Emitter, what: &str, y: &str, width: i64, elem: i32, m: &Matching) -> String {
    let y32 = match elem {
        FLOAT => y.to_string(),
        _ => e.cast(&format!("{what}.y_float"), y, FLOAT),
    };
    let gather_rows = |e: &mut Emitter, name: &str, index: &str| {
        e.gather_rows(&format!("{what}.{name}"), &y32, index, width)
    };
    let src = e.op("Gather", &format!("{what}.src"), &[&y32, &m.src_tokens], vec![int_attr("axis", 1)]);
    let dst = e.op("Gather", &format!("{what}.dst"), &[&y32, &m.dst_tokens], vec![int_attr("axis", 1)]);
    let joined = e.op("MatMul", &format!("{what}.joined"), &[&m.joins, &src], vec![]);
    let sum = e.op("Add", &format!("{what}.sum"), &[&dst, &joined], vec![]);
    let mean = e.op("Div", &format!("{what}.mean"), &[&sum, &m.count], vec![]);
    let out = match &m.stay {
        Some(stay) => {
            let stay = gather_rows(e, "stay", stay);
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
fn unmerge(e: &mut Emitter, what: &str, o: &str, width: i64, m: &Matching) -> String {
    e.gather_rows(&format!("{what}.out"), o, &m.rows, width)
}

/// The patch merging the chosen sub-layers of `block` with `split`.
pub fn block_patch(g: &Graph, block: &UnetBlock, tokens: &Tokens, merged: &[super::matcher::Kind]) -> Result<Patch, PassError> {
    let split = tokens.first();
    let anchor = g.producer(&block.input).unwrap_or(block.sublayers[0].norm);
    let mut patch = Patch::new(format!("{}: tomesd r={}", block.name, split.r), anchor);
    patch.resized_axis = Some(1);
    let x_ty = g.ty(&block.input).cloned().ok_or_else(|| PassError::MissingType(block.input.clone()))?;
    let mut e = Emitter::new(&mut patch, format!("{}.tomesd", block.name), g.opset);
    let m = matching(&mut e, block, tokens, x_ty.elem);
    let mut rewires = vec![];
    let mut types = vec![];
    for sub in block.sublayers.iter().filter(|s| merged.contains(&s.kind)) {
        let kind = sub.kind.name();
        let normed = g.node(sub.norm).output().to_string();
        let elem = g.ty(&normed).map_or(FLOAT, |t| t.elem);
        let merged_in = merge(&mut e, &format!("{kind}.merge"), &normed, block.width as i64, elem, &m);
        types.push((merged_in.clone(), tokens_type(&x_ty, block.tokens - split.r, block.width, elem)));
        for (id, slot) in g.consumers(&normed) {
            rewires.push(Rewire { node: id, slot, tensor: merged_in.clone() });
        }
        let branch = g.node(sub.residual).input(sub.branch_slot).unwrap_or_default().to_string();
        let restored = unmerge(&mut e, &format!("{kind}.unmerge"), &branch, block.width as i64, &m);
        rewires.push(Rewire { node: sub.residual, slot: sub.branch_slot, tensor: restored });
    }
    patch.rewires = rewires;
    patch.types.extend(types);
    Ok(patch)
}

fn tokens_type(like: &TensorType, n: usize, c: usize, elem: i32) -> TensorType {
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
    fn random_dst_cells_are_uniform_over_each_cell() {
        let mut rng = Rng::new(7);
        let mut seen = [0usize; 4];
        for _ in 0..PATTERNS {
            let s = random_split(16, 16, 2, 2, 128, &mut rng);
            assert_eq!((s.src.len(), s.dst.len(), s.r), (192, 64, 128), "one dst per cell, the sizes of the fixed split");
            for &t in &s.dst {
                let (y, x) = (t as usize / 16, t as usize % 16);
                seen[(y % 2) * 2 + x % 2] += 1;
            }
        }
        // 4096 draws over 4 offsets: 1024 each on average, sd 28.
        assert!(seen.iter().all(|&c| (900..1150).contains(&c)), "{seen:?}");
    }

    #[test]
    fn three_quarters_merges_every_src_at_stride_two() {
        let s = split(16, 16, 2, 2, (256.0 * 0.75) as usize);
        assert_eq!((s.src.len(), s.dst.len(), s.r), (192, 64, 192));
    }
}
