//! `BipartiteMerge`: a block's bipartite soft matching on its keys (or on
//! scores already taken), then ToMe's size-weighted merge (`TOME_SPEC.md`). One kernel for
//! every runtime that takes the op: tract (`--target tract`) and
//! onnxruntime and OpenVINO through their plugins (`plugins/`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{outer_add, pack_panels, Matrix};

/// A runtime's threads as the kernel borrows them: `pool(count, task)`
/// runs `task(i)` once for each i in 0..count, on whichever of its threads
/// it likes, and returns when every call has returned (onnxruntime's
/// `KernelContext_ParallelFor`, OpenVINO's TBB `parallel_for`).
pub type Pool<'a> = &'a dyn Fn(usize, &(dyn Fn(usize) + Sync));

/// A pool's task as a plugin hands it through a runtime's C parallel for:
/// `run` catches a panic (it must not unwind into the runtime) and marks
/// `panicked`.
pub struct Task<'a> {
    pub task: &'a (dyn Fn(usize) + Sync),
    pub panicked: &'a AtomicBool,
}

impl Task<'_> {
    pub fn run(&self, i: usize) {
        if catch_unwind(AssertUnwindSafe(|| (self.task)(i))).is_err() {
            self.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// The merge's inputs for a batch: x [batch, n, c], what the matching
/// scores come from, size [batch, n] or every token one patch; r A tokens
/// merge away, the first `prefix` tokens are protected.
pub struct Merge<'a> {
    pub x: &'a [f32],
    pub metric: Metric<'a>,
    pub size: Option<&'a [f32]>,
    pub batch: usize,
    pub n: usize,
    pub c: usize,
    pub r: usize,
    pub prefix: usize,
}

/// What the matching scores come from.
pub enum Metric<'a> {
    /// The block's keys: element (image, head, token, k) of `keys` at
    /// `strides` · that index (any axis order, as a runtime lays them out or
    /// picks them from a larger tensor). The kernel takes ToMe's similarity
    /// of their mean over heads.
    Keys { keys: &'a [f32], heads: usize, d: usize, strides: [usize; 4] },
    /// The similarity scores already taken, [batch, ⌈n/2⌉, ⌊n/2⌋] (A =
    /// even tokens by B = odd tokens).
    Scores(&'a [f32]),
}

impl<'a> Metric<'a> {
    /// The op's second input as its shape says: dense keys for rank 4
    /// ([B,H,N,D], or [B,H,D,N] when `keys_transposed`), keys stacked with
    /// other tensors for rank 5 ([S,B,H,N,D], the keys first: onnxruntime
    /// `Attention`'s `present`, S = 2), scores for rank 3, else `None`.
    pub fn of(values: &'a [f32], shape: &[usize], keys_transposed: bool) -> Option<Metric<'a>> {
        match (shape, keys_transposed) {
            (&[_, heads, d, n], true) | (&[_, heads, n, d], false) => Some(Metric::dense_keys(values, heads, n, d, keys_transposed)),
            (&[stack, _, heads, n, d], false) if stack > 0 => Some(Metric::dense_keys(&values[..values.len() / stack], heads, n, d, false)),
            ([_, _, _], _) => Some(Metric::Scores(values)),
            _ => None,
        }
    }

    /// Dense keys [B,H,N,D], or [B,H,D,N] when `transposed`.
    pub fn dense_keys(keys: &'a [f32], heads: usize, n: usize, d: usize, transposed: bool) -> Metric<'a> {
        let strides = match transposed {
            false => [heads * n * d, n * d, d, 1],
            true => [heads * n * d, n * d, 1, n],
        };
        Metric::Keys { keys, heads, d, strides }
    }
}

/// How many elements a tensor of shape `dims` and `strides` reaches, from
/// its first to its last: its length when it is dense.
pub fn span(dims: [usize; 4], strides: [usize; 4]) -> usize {
    match dims.contains(&0) {
        true => 0,
        false => 1 + dims.iter().zip(strides).map(|(dim, s)| (dim - 1) * s).sum::<usize>(),
    }
}

/// The op's optional third output: each merged size's natural log, the
/// next block's proportional bias.
pub fn log_of(size: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(size).for_each(|(o, s)| *o = s.ln());
}

/// The third output spread over query rows (attribute `log_size_rows`):
/// each image's n log sizes written n times, [n, n] an image, the
/// proportional bias as onnxruntime's `Attention` takes it
/// (`attention_bias` [B,1,N,N]; it broadcasts no rows).
pub fn log_rows_of(size: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    for (image, rows) in size.chunks_exact(n).zip(out.chunks_exact_mut(n * n)) {
        let (first, rest) = rows.split_at_mut(n);
        log_of(image, first);
        rest.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(first));
    }
}

/// Why a merge cannot run on its inputs, in words naming the input.
pub fn check(r: usize, prefix: usize, n: usize) -> Result<(), String> {
    // At most half of the unprotected tokens can merge away (`r_eff`).
    if r > n.saturating_sub(prefix) / 2 {
        return Err(format!("r={r} is more than half of the {n} tokens past the {prefix} protected"));
    }
    Ok(())
}

impl Merge<'_> {
    /// Whether each slice has its shape's length: a message naming the
    /// input that is off.
    pub fn check_lengths(&self) -> Result<(), String> {
        let (b, n, c) = (self.batch, self.n, self.c);
        check(self.r, self.prefix, n)?;
        if c == 0 {
            return Err("x has no channels".into());
        }
        let mut inputs = vec![("x", self.x.len(), vec![b, n, c])];
        match self.metric {
            // Keys span exactly the elements their strides reach: all of a
            // dense [B,H,N,D] or [B,H,D,N] tensor.
            Metric::Keys { keys, heads, d, strides } => {
                let dims = [b, heads, n, d];
                if heads == 0 || d == 0 {
                    return Err(format!("keys [B,H,N,D] = {dims:?} have no heads or no channels"));
                }
                let span = span(dims, strides);
                if keys.len() != span {
                    return Err(format!("keys [B,H,N,D] = {dims:?} with strides {strides:?} span {span} values, have {}", keys.len()));
                }
            }
            Metric::Scores(scores) => inputs.push(("scores", scores.len(), vec![b, n.div_ceil(2), n / 2])),
        }
        inputs.extend(self.size.map(|s| ("size", s.len(), vec![b, n, 1])));
        match inputs.into_iter().find(|(_, len, shape)| *len != shape.iter().product::<usize>()) {
            Some((what, len, shape)) => Err(format!("{what} has {len} values, must be {shape:?}")),
            None => Ok(()),
        }
    }

    /// Merges every image, in order: x into `out_x` [batch, n - r, c],
    /// sizes into `out_size` [batch, n - r]. Call `check_lengths` first.
    pub fn run(&self, out_x: &mut [f32], out_size: &mut [f32]) {
        self.run_on(&|count, task| (0..count).for_each(task), out_x, out_size)
    }

    /// As `run`, an image per task on a runtime's `pool`. (Splitting one
    /// image's work over threads gained nothing measurable: 1.030 against
    /// 1.023-1.034 of the bound on ViT-S/16 at batch 1 in OpenVINO.)
    pub fn run_on(&self, pool: Pool, out_x: &mut [f32], out_size: &mut [f32]) {
        let (c, out_n) = (self.c, self.n - self.r);
        if out_n == 0 {
            return;
        }
        let images: Vec<_> = out_x.chunks_exact_mut(out_n * c).zip(out_size.chunks_exact_mut(out_n)).map(Mutex::new).collect();
        pool(images.len(), &|b| {
            // Each task locks its own image only: never contended.
            let mut image = images[b].lock().unwrap_or_else(|e| e.into_inner());
            let (x, size) = &mut *image;
            self.run_image(b, x, size);
        });
    }

    /// Merges image `b` into its `out_x` [n - r, c] and `out_size` [n - r].
    fn run_image(&self, b: usize, out_x: &mut [f32], out_size: &mut [f32]) {
        let (n, c) = (self.n, self.c);
        let (na, nb) = (n.div_ceil(2), n / 2);
        let image = Image {
            x: &self.x[b * n * c..][..n * c],
            size: self.size.map(|s| &s[b * n..][..n]),
            c,
        };
        let pb = self.prefix / 2;
        let best = match self.metric {
            Metric::Keys { keys, heads, d, strides } => {
                let keys = Keys { keys: &keys[b * strides[0]..], heads, d, n, strides };
                SCRATCH.with(|scratch| scratch.borrow_mut().best(keys, pb))
            }
            Metric::Scores(scores) => scores[b * na * nb..][..na * nb].chunks_exact(nb).map(|row| best_of(&row[pb..], pb)).collect(),
        };
        let rows = self.rows(best);
        image.write(&rows, out_x, out_size);
    }

    /// The matching (`TOME_SPEC.md`) from each A token's best score and B
    /// token (over unprotected B tokens, the lowest index on ties): the r
    /// best-scoring A tokens merge away, protected A tokens never, and the
    /// output order `unm[:pa], B[:pb], unm[pa:], B[pb:]`.
    fn rows(&self, mut best: Vec<(f32, usize)>) -> Vec<Row> {
        let (na, nb) = (self.n.div_ceil(2), self.n / 2);
        let (pa, pb) = (self.prefix.div_ceil(2), self.prefix / 2);
        best[..pa].fill((f32::NEG_INFINITY, 0));
        // Stable sort, descending: ties keep the lower index first. `+ 0.0`
        // makes -0 equal to 0, as a comparison of values does.
        let mut order: Vec<usize> = (0..na).collect();
        order.sort_by(|&a, &b| (best[b].0 + 0.0).total_cmp(&(best[a].0 + 0.0)));
        let (src, unm) = order.split_at(self.r);
        let mut unm = unm.to_vec();
        if self.prefix > 0 {
            unm.sort_unstable();
        }
        let mut joined: Vec<Vec<usize>> = vec![vec![]; nb];
        for &a in src {
            joined[best[a].1].push(a);
        }
        let mut joined = joined.into_iter().enumerate().map(|(j, a)| Row::Joined(j, a));
        let cut = pa.min(unm.len());
        let mut rows: Vec<Row> = unm[..cut].iter().map(|&i| Row::Kept(i)).collect();
        rows.extend(joined.by_ref().take(pb));
        rows.extend(unm[cut..].iter().map(|&i| Row::Kept(i)));
        rows.extend(joined);
        rows
    }
}

thread_local! {
    /// Each thread's buffers for the similarity, reused from call to call
    /// (allocated for each image, the ViT-S/16 merge took 36.8 µs against
    /// 26.6: the allocator gave their pages back to the system and faulted
    /// them in again).
    static SCRATCH: std::cell::RefCell<Similarity> = std::cell::RefCell::default();
}

/// ToMe's similarity: the metric (the keys' sum over heads, each token's
/// row L2-normalised; the mean's 1/heads cancels), then each A (even)
/// token's best score against the B (odd) ones.
#[derive(Default)]
struct Similarity {
    sum: Vec<f32>,
    norms: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Similarity {
    /// Each A token's best score and B token from one image's keys, over B
    /// tokens from `pb` on, compiled for the best instruction set this CPU
    /// has.
    fn best(&mut self, image: Keys, pb: usize) -> Vec<(f32, usize)> {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { self.best_avx512(image, pb) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { self.best_avx2(image, pb) };
            }
        }
        self.fill::<{ cfg!(target_arch = "aarch64") }, 4, 16>(image, pb)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn best_avx512(&mut self, image: Keys, pb: usize) -> Vec<(f32, usize)> {
        self.fill::<true, 6, 32>(image, pb)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn best_avx2(&mut self, image: Keys, pb: usize) -> Vec<(f32, usize)> {
        self.fill::<true, 6, 16>(image, pb)
    }

    #[inline(always)]
    fn fill<const FMA: bool, const R: usize, const C: usize>(&mut self, image: Keys, pb: usize) -> Vec<(f32, usize)> {
        let Keys { keys, heads, d, n, strides: [_, sh, sn, sd] } = image;
        // The sum over heads, a row at a time, along whichever of tokens and
        // channels lies in order in memory (channels when neither does):
        // [n, d], or [d, n] (`transposed`) for keys whose tokens do. Rows
        // that lie back to back (a dense head) are one row, summed a block
        // at a time so that the block stays in L1 while every head is
        // added to it (row by row is 6-8% slower on dense keys).
        let transposed = sd != 1 && sn == 1;
        let (len, row_stride, step) = if transposed { (n, sd, sn) } else { (d, sn, sd) };
        let (len, row_stride) = if step == 1 && row_stride == len { (n * d, 0) } else { (len, row_stride) };
        self.sum.clear();
        self.sum.resize(n * d, 0.0);
        const BLOCK: usize = 512;
        for (i, row) in self.sum.chunks_exact_mut(len).enumerate() {
            for (j, block) in row.chunks_mut(BLOCK).enumerate() {
                for head in (0..heads).map(|h| &keys[h * sh + i * row_stride + j * BLOCK * step..]) {
                    match step {
                        1 => block.iter_mut().zip(head).for_each(|(m, k)| *m += k),
                        _ => block.iter_mut().zip(head.iter().step_by(step)).for_each(|(m, k)| *m += k),
                    }
                }
            }
        }
        let metric = match transposed {
            false => {
                for row in self.sum.chunks_exact_mut(d) {
                    let norm = sum_of_squares(row).sqrt();
                    row.iter_mut().for_each(|v| *v /= norm);
                }
                Matrix { data: &self.sum, row_stride: 1, col_stride: d, factor: 1.0 }
            }
            true => {
                // Across tokens, which lie in order: every loop vectorises.
                self.norms.clear();
                self.norms.resize(n, 0.0);
                for row in self.sum.chunks_exact(n) {
                    self.norms.iter_mut().zip(row).for_each(|(s, v)| *s += v * v);
                }
                self.norms.iter_mut().for_each(|s| *s = s.sqrt());
                for row in self.sum.chunks_exact_mut(n) {
                    row.iter_mut().zip(&self.norms).for_each(|(v, norm)| *v /= norm);
                }
                Matrix { data: &self.sum, row_stride: n, col_stride: 1, factor: 1.0 }
            }
        };
        let (na, nb) = (n.div_ceil(2), n / 2);
        best_tiles::<FMA, R, C>(metric, d, na, nb, pb, &mut self.a, &mut self.b)
    }
}

/// One image's keys (from its first element on), their shape and the
/// strides of (image, head, token, channel).
#[derive(Clone, Copy)]
struct Keys<'a> {
    keys: &'a [f32],
    heads: usize,
    d: usize,
    n: usize,
    strides: [usize; 4],
}

/// For each A token (the even tokens of `metric`, whose element (k, t) is
/// token t's k-th value), its best score A·Bᵀ against the B tokens (the odd
/// ones) from `pb` on and the first B token holding it, as `best_of` would
/// find in the scores; (-inf, 0) where no score beats -inf. The scores come
/// in register tiles of R A tokens × C B tokens as `attend`'s logits, summed
/// over the d columns, and each tile goes straight into a running maximum
/// per A token and column lane: the scores are never stored.
#[inline(always)]
fn best_tiles<const FMA: bool, const R: usize, const C: usize>(
    metric: Matrix,
    d: usize,
    na: usize,
    nb: usize,
    pb: usize,
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) -> Vec<(f32, usize)> {
    // Token i of A is token 2i, token j of B token 2j + 1.
    let a_t = Matrix { col_stride: 2 * metric.col_stride, ..metric };
    let b_t = Matrix { data: &metric.data[metric.col_stride.min(metric.data.len())..], ..a_t };
    pack_panels::<R>(a, a_t, d, na);
    pack_panels::<C>(b, b_t, d, nb);
    // Lane c of A token i: the best score in column c of the panels so far,
    // and the first panel (its first B token) that held it.
    let mut lanes = vec![([f32::NEG_INFINITY; C], [0u32; C]); na];
    for (j0, b_panel) in (0..nb).step_by(C).zip(b.chunks_exact(d * C)) {
        // Protected columns and the panel's zero padding never count.
        let mut valid = [0f32; C];
        for (c, v) in valid.iter_mut().enumerate() {
            *v = if j0 + c >= pb && j0 + c < nb { 0.0 } else { f32::NEG_INFINITY };
        }
        for (i0, a_tile) in (0..na).step_by(R).zip(a.chunks_exact(d * R)) {
            let mut acc = [[0f32; C]; R];
            for (a, b) in a_tile.chunks_exact(R).zip(b_panel.chunks_exact(C)) {
                outer_add::<FMA, R, C>(&mut acc, a, b);
            }
            for ((best, first), acc) in lanes[i0..].iter_mut().zip(&acc) {
                for c in 0..C {
                    let v = acc[c] + valid[c];
                    let better = v > best[c];
                    best[c] = if better { v } else { best[c] };
                    first[c] = if better { j0 as u32 } else { first[c] };
                }
            }
        }
    }
    lanes
        .iter()
        .map(|(best, first)| {
            let max = lanes_max(best);
            // The first B token holding the maximum: the lowest of the lanes'
            // first tokens holding it (u32::MAX: not this lane).
            let at = (0..C).map(|c| if best[c] == max { first[c] + c as u32 } else { u32::MAX }).min().unwrap_or(u32::MAX);
            match max > f32::NEG_INFINITY {
                true => (max, at as usize),
                false => (f32::NEG_INFINITY, 0),
            }
        })
        .collect()
}

/// Σ v², in eight lanes (one vector register; a sum in order would wait on
/// each addition).
fn sum_of_squares(row: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The maximum of `values` (-inf if every one is -inf or NaN), taken in
/// eight lanes, which the compiler keeps in one vector register.
#[inline(always)]
fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// A row's maximum and the first index holding it (offset by `skip`), or
/// (-inf, 0) if every value is -inf or NaN: the given scores' `best_tiles`.
fn best_of(row: &[f32], skip: usize) -> (f32, usize) {
    let max = lanes_max(row);
    match row.iter().position(|&v| v == max) {
        Some(j) if max > f32::NEG_INFINITY => (max, j + skip),
        _ => (f32::NEG_INFINITY, 0),
    }
}

/// One image's tokens and sizes.
struct Image<'a> {
    x: &'a [f32],
    size: Option<&'a [f32]>,
    c: usize,
}

/// An output token: A token `i` kept as is, or B token `j` with the A
/// tokens merged into it.
enum Row {
    Kept(usize),
    Joined(usize, Vec<usize>),
}

impl Image<'_> {
    fn size_of(&self, token: usize) -> f32 {
        self.size.map_or(1.0, |s| s[token])
    }

    /// `sum(x·size) / sum(size)` over each row's tokens (A token i is token
    /// 2i, B token j is 2j+1), into `x` [rows, c] and `size` [rows].
    /// A row of one token is its token: the reference's `x·s/s` is x within
    /// half an ulp.
    fn write(&self, rows: &[Row], x: &mut [f32], size: &mut [f32]) {
        let c = self.c;
        let token = |t: usize| &self.x[t * c..][..c];
        for ((row, out), total) in rows.iter().zip(x.chunks_exact_mut(c)).zip(size) {
            let (t, sources) = match row {
                Row::Kept(i) => (2 * i, &[][..]),
                Row::Joined(j, sources) => (2 * j + 1, sources.as_slice()),
            };
            *total = self.size_of(t);
            if sources.is_empty() {
                out.copy_from_slice(token(t));
                continue;
            }
            for (o, v) in out.iter_mut().zip(token(t)) {
                *o = v * *total;
            }
            for &a in sources {
                let s = self.size_of(2 * a);
                for (o, v) in out.iter_mut().zip(token(2 * a)) {
                    *o += v * s;
                }
                *total += s;
            }
            for o in out.iter_mut() {
                *o /= *total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::values;

    /// Keys laid out in any axis order, or picked from a larger tensor,
    /// merge as the same keys dense: the head sum runs along whichever axis
    /// lies in order.
    #[test]
    fn keys_in_any_layout_merge_as_dense_keys() {
        let (b, h, n, d, c) = (2, 3, 13, 6, 5);
        let dense = values(b * h * n * d, 11);
        let (x, size) = (values(b * n * c, 12), values(b * n, 13).iter().map(|s| s + 3.0).collect::<Vec<_>>());
        let merged = |metric: Metric| {
            let merge = Merge { x: &x, metric, size: Some(&size), batch: b, n, c, r: 4, prefix: 1 };
            merge.check_lengths().unwrap();
            let (mut out_x, mut out_size) = (vec![f32::NAN; b * (n - 4) * c], vec![f32::NAN; b * (n - 4)]);
            merge.run(&mut out_x, &mut out_size);
            (out_x, out_size)
        };
        let reference = merged(Metric::dense_keys(&dense, h, n, d, false));
        // Physical axis i of each layout holds logical axis order[i] (of
        // b, h, n, d, and a fifth axis of three that the keys are index 1 of).
        for order in [&[0, 1, 3, 2][..], &[0, 2, 1, 3], &[2, 0, 3, 1], &[3, 2, 0, 1], &[1, 3, 2, 0], &[0, 2, 4, 1, 3], &[4, 0, 1, 3, 2]] {
            let dims: Vec<usize> = order.iter().map(|&a| [b, h, n, d, 3][a]).collect();
            let mut strides = [0; 5];
            for (i, &a) in order.iter().enumerate() {
                strides[a] = dims[i + 1..].iter().product();
            }
            let mut laid_out = values(dims.iter().product(), 14);
            let first = if order.len() == 5 { strides[4] } else { 0 };
            for (i, &v) in dense.iter().enumerate() {
                let at = [i / (h * n * d), i / (n * d) % h, i / d % n, i % d];
                laid_out[first + at.iter().zip(&strides).map(|(a, s)| a * s).sum::<usize>()] = v;
            }
            let strides = [strides[0], strides[1], strides[2], strides[3]];
            let keys = &laid_out[first..first + span([b, h, n, d], strides)];
            assert!(merged(Metric::Keys { keys, heads: h, d, strides }) == reference, "keys laid out as {order:?}");
        }
        // onnxruntime's `present` [2,B,H,N,D]: the keys, then the values.
        let present = [dense.clone(), values(b * h * n * d, 15)].concat();
        let in_present = Metric::of(&present, &[2, b, h, n, d], false).expect("keys in present");
        assert!(merged(in_present) == reference, "keys read from present");
        assert!(Metric::of(&present, &[2, b, h, d, n], true).is_none(), "present holds k untransposed");
        // The sizes' logs spread over rows: every row of an image the same.
        let sizes = merged(Metric::dense_keys(&dense, h, n, d, false)).1;
        let out_n = n - 4;
        let mut rows = vec![f32::NAN; b * out_n * out_n];
        log_rows_of(&sizes, out_n, &mut rows);
        for (image, block) in sizes.chunks_exact(out_n).zip(rows.chunks_exact(out_n * out_n)) {
            let logs: Vec<f32> = image.iter().map(|s| s.ln()).collect();
            assert!(block.chunks_exact(out_n).all(|row| row == logs.as_slice()), "log sizes spread over rows");
        }
        let short = Merge { x: &x, metric: Metric::dense_keys(&dense[1..], h, n, d, false), size: None, batch: b, n, c, r: 4, prefix: 1 };
        assert!(short.check_lengths().unwrap_err().contains("span 468 values, have 467"));
    }

    /// The tiles' running best per A token is `best_of` on the scores
    /// written out (each a sum in k order, as the tiles take it): the same
    /// maximum, ties to the lowest B token (here tied across lanes and
    /// panels), protected B tokens skipped, NaN never best, and (-inf, 0)
    /// for an A token with no score above -inf.
    #[test]
    fn tiles_pick_the_best_as_best_of_on_the_scores() {
        let (n, d): (usize, usize) = (157, 19);
        let (na, nb) = (n.div_ceil(2), n / 2);
        // Token t's values at t·d: B token j is token 2j + 1.
        let mut metric = values(n * d, 21);
        let token = |j: usize| 2 * j + 1;
        for (from, to) in [(3, 40), (3, 35), (3, 7), (50, 51), (70, 2)] {
            metric.copy_within(token(from) * d..token(from) * d + d, token(to) * d);
        }
        metric[token(20) * d + 4] = f32::NAN;
        metric[4 * d..5 * d].fill(f32::NAN);
        metric[8 * d..9 * d].fill(f32::NEG_INFINITY);
        let m = Matrix { data: &metric, row_stride: 1, col_stride: d, factor: 1.0 };
        let scores: Vec<f32> = (0..na * nb)
            .map(|at| (0..d).fold(0.0, |acc, k| metric[2 * (at / nb) * d + k].mul_add(metric[token(at % nb) * d + k], acc)))
            .collect();
        for pb in [0, 1, 5] {
            let expected: Vec<(f32, usize)> = scores.chunks_exact(nb).map(|row| best_of(&row[pb..], pb)).collect();
            assert!(expected.iter().any(|&(_, j)| [3, 7].contains(&j)) && expected[2] == (f32::NEG_INFINITY, 0));
            let (mut a, mut b) = (vec![], vec![]);
            for best in [best_tiles::<true, 6, 32>(m, d, na, nb, pb, &mut a, &mut b), best_tiles::<true, 4, 16>(m, d, na, nb, pb, &mut a, &mut b)] {
                let same = best.iter().zip(&expected).all(|(a, b)| a.1 == b.1 && a.0.to_bits() == b.0.to_bits());
                assert!(same && best.len() == na, "pb = {pb}: {best:?} against {expected:?}");
            }
        }
    }
}
