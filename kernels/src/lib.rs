//! Compute kernels for tome-compile's ops, in their own crate so that
//! debug builds (tests) still compile them optimised (`Cargo.toml`) and
//! the runtime plugins (`plugins/`) link them without tract.
//!
//! `attend`: one head of `softmax(scale·q·kᵀ + bias)·v`, a panel of
//! queries at a time, so that the panel stays in cache from logits to
//! output. `merge`: bipartite matching and the size-weighted merge.

pub mod merge;

/// A matrix in a slice: element (i, j) is `data[i·row_stride + j·col_stride]
/// × factor`, the product rounded to f32 as a multiplication node would
/// round it, so that q, k and v can be read where the projection left them
/// and a graph's scaling of q or k costs no pass of its own.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
    pub factor: f32,
}

impl Matrix<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride] * self.factor
    }
}

/// One head's inputs: q [n,d], kᵀ [d,n], v [n,dv], bias [n].
pub struct Head<'a> {
    pub q: Matrix<'a>,
    pub kt: Matrix<'a>,
    pub v: Matrix<'a>,
    pub bias: Option<&'a [f32]>,
    pub scale: f32,
    pub n: usize,
    pub d: usize,
    pub dv: usize,
}

/// Q, K and V packed as the tiles read them, and one panel of queries'
/// logits; reused from head to head.
#[derive(Default)]
pub struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    logits: Vec<f32>,
}

/// Runs the tiles compiled for the best instruction set this CPU has:
/// 6 keys × 32 queries (12 AVX-512 registers of 16 lanes), 6 × 16 (12 AVX2
/// ones), or 4 × 16 elsewhere. Larger tiles spill: LLVM does not fully
/// unroll them. The output goes to
/// `write(i, c, values)`: column `c`, rows `i..i + values.len()`.
pub fn attend(head: &Head, scratch: &mut Scratch, write: &mut dyn FnMut(usize, usize, &[f32])) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { attend_avx512(head, scratch, write) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { attend_avx2(head, scratch, write) };
        }
    }
    attend_tiles::<{ cfg!(target_arch = "aarch64") }, 4, 16>(head, scratch, write)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn attend_avx512(head: &Head, scratch: &mut Scratch, write: &mut dyn FnMut(usize, usize, &[f32])) {
    attend_tiles::<true, 6, 32>(head, scratch, write)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(head: &Head, scratch: &mut Scratch, write: &mut dyn FnMut(usize, usize, &[f32])) {
    attend_tiles::<true, 6, 16>(head, scratch, write)
}

/// For each panel of `C` queries: its logits against every key, transposed
/// (a row per key, a column per query), the softmax of each column, then
/// its output, transposed too, as Vᵀ·Pᵀ. Both products are sums of outer
/// products `acc += a ⊗ b` over an `R × C` tile held in registers: `a`
/// holds `R` keys (or channels of V), read from packed tiles, and `b` the
/// panel's `C` queries, which stay in cache across the tiles.
#[inline(always)]
fn attend_tiles<const FMA: bool, const R: usize, const C: usize>(head: &Head, s: &mut Scratch, write: &mut dyn FnMut(usize, usize, &[f32])) {
    let Head { q, kt, v, bias, scale, n, d, dv } = *head;
    let qt = Matrix { row_stride: q.col_stride, col_stride: q.row_stride, ..q };
    pack_panels::<C>(&mut s.q, qt, d, n);
    pack_panels::<R>(&mut s.k, kt, d, n);
    pack_panels::<R>(&mut s.v, v, n, dv);
    s.logits.resize(n.next_multiple_of(R) * C, 0.0);
    for (i0, q_panel) in (0..n).step_by(C).zip(s.q.chunks_exact(d * C)) {
        for (rows, k_tile) in s.logits.chunks_exact_mut(R * C).zip(s.k.chunks_exact(d * R)) {
            let mut acc = [[0f32; C]; R];
            for (a, b) in k_tile.chunks_exact(R).zip(q_panel.chunks_exact(C)) {
                outer_add::<FMA, R, C>(&mut acc, a, b);
            }
            rows.copy_from_slice(acc.as_flattened());
        }
        // Rows past n are padding (zero keys); a short last panel's
        // missing queries are zeros, computed and not written.
        let probabilities = &mut s.logits[..n * C];
        softmax_columns::<FMA, C>(probabilities, bias, scale);
        let queries = C.min(n - i0);
        for (c0, v_tile) in (0..dv).step_by(R).zip(s.v.chunks_exact(n * R)) {
            let mut acc = [[0f32; C]; R];
            for (a, b) in v_tile.chunks_exact(R).zip(probabilities.chunks_exact(C)) {
                outer_add::<FMA, R, C>(&mut acc, a, b);
            }
            for (c, acc) in (c0..dv).zip(&acc) {
                write(i0, c, &acc[..queries]);
            }
        }
    }
}

/// `acc[r][c] += a[r]·b[c]`, fused where the target has FMA (elsewhere
/// `mul_add` would be a libm call).
#[inline(always)]
pub(crate) fn outer_add<const FMA: bool, const R: usize, const C: usize>(acc: &mut [[f32; C]; R], a: &[f32], b: &[f32]) {
    let (a, b): (&[f32; R], &[f32; C]) = (a.try_into().expect("R values"), b.try_into().expect("C values"));
    for r in 0..R {
        for c in 0..C {
            acc[r][c] = if FMA { a[r].mul_add(b[c], acc[r][c]) } else { a[r] * b[c] + acc[r][c] };
        }
    }
}

/// `src` [rows, width] as panels [⌈width/C⌉][rows][C], zero-padded on the
/// right, so that a tile's inner loop reads memory in order. Inlined, so
/// that it compiles for the caller's instruction set.
#[inline(always)]
pub(crate) fn pack_panels<const C: usize>(dst: &mut Vec<f32>, src: Matrix, rows: usize, width: usize) {
    dst.clear();
    dst.resize(width.div_ceil(C) * rows * C, 0.0);
    for (c0, panel) in (0..width).step_by(C).zip(dst.chunks_exact_mut(rows * C)) {
        let w = C.min(width - c0);
        if src.row_stride == 1 && src.col_stride != 1 {
            // Columns lie in order in memory (q or k read transposed):
            // read each column in order, write it down the panel.
            for c in 0..w {
                let column = &src.data[(c0 + c) * src.col_stride..][..rows];
                panel.iter_mut().skip(c).step_by(C).zip(column).for_each(|(o, x)| *o = x * src.factor);
            }
            continue;
        }
        for (r, out) in panel.chunks_exact_mut(C).enumerate() {
            if src.col_stride == 1 {
                out[..w].iter_mut().zip(&src.data[r * src.row_stride + c0..][..w]).for_each(|(o, x)| *o = x * src.factor);
            } else {
                out[..w].iter_mut().enumerate().for_each(|(c, x)| *x = src.at(r, c0 + c));
            }
        }
    }
}

/// Each column of `logits` (`C` queries side by side, a row per key)
/// becomes `softmax(scale·column + bias)`: an `exp` within 2 ulp of the
/// true value in f32 arithmetic, a sum in order, a division. (Every
/// fixture's merge decisions sit at least 1e-5 from a tie, far above what
/// 2 ulp can move.) The columns' sums run side by side, each in order.
#[inline(always)]
fn softmax_columns<const FMA: bool, const C: usize>(logits: &mut [f32], bias: Option<&[f32]>, scale: f32) {
    let mut max = [f32::NEG_INFINITY; C];
    for (j, row) in logits.chunks_exact_mut(C).enumerate() {
        let row: &mut [f32; C] = row.try_into().expect("C logits");
        for (x, m) in row.iter_mut().zip(&mut max) {
            *x = match bias {
                Some(bias) => *x * scale + bias[j],
                None => *x * scale,
            };
            *m = m.max(*x);
        }
    }
    let mut sum = [0f32; C];
    for row in logits.chunks_exact_mut(C) {
        for ((x, m), sum) in row.iter_mut().zip(&max).zip(&mut sum) {
            *x = exp::<FMA>(*x - m);
            *sum += *x;
        }
    }
    for row in logits.chunks_exact_mut(C) {
        row.iter_mut().zip(&sum).for_each(|(x, sum)| *x /= sum);
    }
}

/// `e^x` for `x ≤ 0` (softmax's range) within 2 ulp, in f32 on vector
/// lanes: no branches or tables. `x` is split as `k·ln2 + t` with
/// |t| ≤ ln2/2; `e^t` is its Taylor series to t⁷ (remainder below 6e-9),
/// and 2^k goes into the exponent bits. Below -87.3, where e^x leaves the
/// normal floats, it gives 0: an error under 1.2e-38, nothing next to the
/// row's largest term, 1.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer, held in the low mantissa bits.
    const SHIFT: f32 = 12582912.0;
    // ln 2 as 0.693359375 (9 significant bits: k·LN2_HI is exact for
    // |k| < 2¹⁵) and the rest of ln 2.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let shifted = madd(x, std::f32::consts::LOG2_E, SHIFT);
    let k = shifted - SHIFT;
    let t = madd(-k, LN2_LO, madd(-k, LN2_HI, x));
    let mut p = 1.0 / 5040.0; // 1/7!
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd(p, t, c);
    }
    // k ≥ -126 above the cut below, so 2^k is a normal f32.
    let two_k = f32::from_bits((shifted.to_bits().wrapping_add(127) & 0xff) << 23);
    let y = p * two_k;
    // NaN passes through.
    if x < -87.3 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of one head as written (logits, softmax, sum), in f64
    /// or, rounding every step, f32.
    fn naive(h: &Head, round: fn(f64) -> f64) -> Vec<f64> {
        let mut out = vec![0.0; h.n * h.dv];
        for i in 0..h.n {
            let logits: Vec<f64> = (0..h.n)
                .map(|j| {
                    let dot = (0..h.d).fold(0.0, |s, k| round(s + round(h.q.at(i, k) as f64 * h.kt.at(k, j) as f64)));
                    round(round(dot * h.scale as f64) + h.bias.map_or(0.0, |b| b[j] as f64))
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| round(round(l - max).exp())).collect();
            let sum = e.iter().fold(0.0, |s, x| round(s + x));
            for c in 0..h.dv {
                out[i * h.dv + c] = (0..h.n).fold(0.0, |s, j| round(s + round(round(e[j] / sum) * h.v.at(j, c) as f64)));
            }
        }
        out
    }

    /// Deterministic values in [-2, 2).
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1 << 22) as f32 - 2.0
            })
            .collect()
    }

    /// Within 2 ulp of f64 `exp` over a sample of every 997th float in
    /// [-87.3, 0] and at the edges; 0 below, where e^x < 1.2e-38.
    #[test]
    fn exp_is_within_two_ulp() {
        let last = (-87.3f32).to_bits();
        let sample = (0x8000_0000..=last).step_by(997).map(f32::from_bits);
        let edges = [0.0, -0.0, -1e-30, -0.34657, -0.34658, -1.0, -20.5, -87.0, -87.29];
        for x in sample.chain(edges) {
            let want = (x as f64).exp();
            for (got, fma) in [(exp::<true>(x), true), (exp::<false>(x), false)] {
                let ulp = f32::from_bits((want as f32).to_bits() & 0x7f80_0000) as f64 * f32::EPSILON as f64;
                let ulps = (got as f64 - want).abs() / ulp;
                assert!(ulps <= 2.0, "e^{x:e} (fma {fma}): {got:e} against {want:e}, {ulps:.2} ulp");
            }
        }
        for x in [-87.31, -104.0, -1e9, f32::NEG_INFINITY] {
            assert_eq!(exp::<true>(x), 0.0, "e^{x:e}");
        }
        assert!(exp::<true>(f32::NAN).is_nan() && exp::<false>(f32::NAN).is_nan());
    }

    /// Each output element is summed in the same order whatever the tile,
    /// so the tile shape cannot change a bit (the fixtures' merge decisions
    /// rest on that).
    #[test]
    fn every_tile_shape_gives_the_same_bits() {
        for (n, d, dv) in [(1, 1, 1), (7, 5, 3), (37, 64, 64), (197, 64, 64)] {
            let (q, kt, v, bias) = (values(n * d, 5), values(d * n, 6), values(n * dv, 7), values(n, 8));
            let m = |data, row_stride| Matrix { data, row_stride, col_stride: 1, factor: 1.0 };
            let head = Head { q: m(&q, d), kt: m(&kt, n), v: m(&v, dv), bias: Some(&bias), scale: 0.3, n, d, dv };
            type Tiles = fn(&Head, &mut Scratch, &mut dyn FnMut(usize, usize, &[f32]));
            let run = |tiles: Tiles| {
                let mut out = vec![f32::NAN; n * dv];
                tiles(&head, &mut Scratch::default(), &mut |i, c, values| values.iter().enumerate().for_each(|(k, &x)| out[(i + k) * dv + c] = x));
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            let reference = run(attend_tiles::<false, 1, 1>);
            for (shape, out) in [("4x16", run(attend_tiles::<false, 4, 16>)), ("6x32", run(attend_tiles::<false, 6, 32>)), ("3x8", run(attend_tiles::<false, 3, 8>))] {
                assert!(out == reference, "n={n} d={d} dv={dv}: the {shape} tiles round differently from 1x1 ones");
            }
        }
    }

    #[test]
    fn tiles_are_as_accurate_as_the_attention_written_out_in_f32() {
        for (n, d, dv) in [(1, 1, 1), (5, 3, 7), (21, 32, 32), (37, 64, 64), (197, 64, 64), (33, 80, 40)] {
            let (q, kt, v, bias) = (values(n * d, 1), values(d * n, 2), values(n * dv, 3), values(n, 4));
            let rows = |data, width| Matrix { data, row_stride: width, col_stride: 1, factor: 1.0 };
            let columns = |data, height| Matrix { data, row_stride: 1, col_stride: height, factor: 1.0 };
            // In order, and transposed in memory (k as [n,d] the way Q·Kᵀ reads it).
            let layouts = [(rows(&q, d), rows(&kt, n), rows(&v, dv)), (columns(&q, n), columns(&kt, d), columns(&v, n))];
            for (bias, (q, kt, v)) in [None, Some(bias.as_slice())].into_iter().flat_map(|b| layouts.map(|l| (b, l))) {
                let head = Head { q, kt, v, bias, scale: 0.7, n, d, dv };
                let mut out = vec![f32::NAN; n * dv];
                attend(&head, &mut Scratch::default(), &mut |i, c, values| values.iter().enumerate().for_each(|(k, &x)| out[(i + k) * dv + c] = x));
                let exact = naive(&head, |x| x);
                let worst = |got: &[f64]| got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                let ours = worst(&out.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let plain_f32 = worst(&naive(&head, |x| x as f32 as f64));
                let what = format!("n={n} d={d} dv={dv} bias={} q row stride {}", bias.is_some(), q.row_stride);
                assert!(ours <= 2.0 * plain_f32 + 1e-7, "{what}: off by {ours}, the f32 attention written out by {plain_f32}");
            }
        }
    }
}
