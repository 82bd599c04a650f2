//! Compute kernels for tome-compile's tract ops, in their own crate so that
//! debug builds (tests) still compile them optimised (`Cargo.toml`).
//!
//! `attend`: one head of `softmax(scale·q·kᵀ + bias)·v`, tiled so that
//! each tile of query rows stays in registers and cache from logits to
//! output.

/// A matrix in a slice: element (i, j) at `data[i·row_stride + j·col_stride]`,
/// so that q, k and v can be read where the projection left them.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Matrix<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
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

/// Kᵀ and V packed into panels of whole tiles, one tile's query rows and
/// probabilities transposed, and its logits; reused from head to head.
#[derive(Default)]
pub struct Scratch {
    kt: Vec<f32>,
    v: Vec<f32>,
    qt: Vec<f32>,
    logits: Vec<f32>,
    pt: Vec<f32>,
}

/// Runs the tiles compiled for the best instruction set this CPU has:
/// 4 query rows × 32 columns (8 AVX-512 registers), or 4 × 16 (8 AVX2 or
/// NEON ones). Larger tiles spill: LLVM does not fully unroll them. The
/// output goes to `write(i, c, values)`: row `i`, columns `c..c + values.len()`.
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
    attend_tiles::<true, 4, 32>(head, scratch, write)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(head: &Head, scratch: &mut Scratch, write: &mut dyn FnMut(usize, usize, &[f32])) {
    attend_tiles::<true, 4, 16>(head, scratch, write)
}

/// For each tile of `R` query rows: its logits against every key, the
/// softmax of each row, then its output rows as P·V. Both products are sums
/// of outer products `acc += a ⊗ b` over an `R × C` tile held in
/// registers, reading Kᵀ and V from panels packed `C` columns wide.
#[inline(always)]
fn attend_tiles<const FMA: bool, const R: usize, const C: usize>(head: &Head, s: &mut Scratch, write: &mut dyn FnMut(usize, usize, &[f32])) {
    let Head { q, kt, v, bias, scale, n, d, dv } = *head;
    let np = n.next_multiple_of(C);
    pack_panels::<C>(&mut s.kt, kt, d, n);
    pack_panels::<C>(&mut s.v, v, n, dv);
    s.logits.resize(R * np, 0.0);
    for i0 in (0..n).step_by(R) {
        let rows = R.min(n - i0);
        // A short last tile repeats its last row; the repeats are not written.
        s.qt.clear();
        for k in 0..d {
            s.qt.extend((0..R).map(|r| q.at(i0 + r.min(rows - 1), k)));
        }
        for (j0, panel) in (0..np).step_by(C).zip(s.kt.chunks_exact(d * C)) {
            let mut acc = [[0f32; C]; R];
            for (a, b) in s.qt.chunks_exact(R).zip(panel.chunks_exact(C)) {
                outer_add::<FMA, R, C>(&mut acc, a, b);
            }
            for (r, acc) in acc.iter().enumerate() {
                s.logits[r * np + j0..][..C].copy_from_slice(acc);
            }
        }
        softmax_rows::<FMA, R>(&mut s.logits, np, n, bias, scale);
        s.pt.clear();
        for j in 0..n {
            s.pt.extend((0..R).map(|r| s.logits[r * np + j]));
        }
        for (c0, panel) in (0..dv).step_by(C).zip(s.v.chunks_exact(n * C)) {
            let mut acc = [[0f32; C]; R];
            for (a, b) in s.pt.chunks_exact(R).zip(panel.chunks_exact(C)) {
                outer_add::<FMA, R, C>(&mut acc, a, b);
            }
            let width = C.min(dv - c0);
            for (r, acc) in acc.iter().take(rows).enumerate() {
                write(i0 + r, c0, &acc[..width]);
            }
        }
    }
}

/// `acc[r][c] += a[r]·b[c]`, fused where the target has FMA (elsewhere
/// `mul_add` would be a libm call).
#[inline(always)]
fn outer_add<const FMA: bool, const R: usize, const C: usize>(acc: &mut [[f32; C]; R], a: &[f32], b: &[f32]) {
    let (a, b): (&[f32; R], &[f32; C]) = (a.try_into().expect("R values"), b.try_into().expect("C values"));
    for r in 0..R {
        for c in 0..C {
            acc[r][c] = if FMA { a[r].mul_add(b[c], acc[r][c]) } else { a[r] * b[c] + acc[r][c] };
        }
    }
}

/// `src` [rows, width] as panels [⌈width/C⌉][rows][C], zero-padded on the
/// right, so that a tile's inner loop reads memory in order.
fn pack_panels<const C: usize>(dst: &mut Vec<f32>, src: Matrix, rows: usize, width: usize) {
    dst.clear();
    dst.resize(width.div_ceil(C) * rows * C, 0.0);
    for (c0, panel) in (0..width).step_by(C).zip(dst.chunks_exact_mut(rows * C)) {
        let w = C.min(width - c0);
        for (r, out) in panel.chunks_exact_mut(C).enumerate() {
            if src.col_stride == 1 {
                out[..w].copy_from_slice(&src.data[r * src.row_stride + c0..][..w]);
            } else {
                out[..w].iter_mut().enumerate().for_each(|(c, x)| *x = src.at(r, c0 + c));
            }
        }
    }
}

/// Each of the `R` rows of `logits` (`stride` apart, `n` long) becomes
/// `softmax(scale·row + bias)`, rounded as the reference rounds it: `exp`
/// rounded to nearest in f32, a sum in order, a division. ToMe's matching
/// compares scores that can sit a few ulp apart, and the fixtures hold merge
/// decisions that a 2-ulp exp or a reordered sum flips. The rows' sums run
/// side by side, each in order, so that they do not wait on each other.
#[inline(always)]
fn softmax_rows<const FMA: bool, const R: usize>(logits: &mut [f32], stride: usize, n: usize, bias: Option<&[f32]>, scale: f32) {
    for row in logits.chunks_exact_mut(stride).take(R) {
        let row = &mut row[..n];
        match bias {
            Some(bias) => row.iter_mut().zip(bias).for_each(|(x, b)| *x = *x * scale + b),
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        row.iter_mut().for_each(|x| *x = exp::<FMA>(*x - max));
    }
    let mut sums = [0f32; R];
    for j in 0..n {
        for (r, sum) in sums.iter_mut().enumerate() {
            *sum += logits[r * stride + j];
        }
    }
    for (row, sum) in logits.chunks_exact_mut(stride).zip(sums) {
        row[..n].iter_mut().for_each(|x| *x /= sum);
    }
}

/// `e^x` rounded to nearest f32, for `x ≤ 0` (softmax's range): evaluated
/// in f64 to a relative error below 1e-15, so that rounding it to f32 gives
/// the correctly rounded value but within 1e-15 of a halfway point. No
/// branches or tables, so that a row's exps run on vector lanes. `x` is
/// split as `k·ln2 + t` with |t| ≤ ln2/2; `e^t` is its Taylor series to
/// t¹² (remainder below 2e-16), and 2^k goes into the exponent bits.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    // 1.5·2⁵²: adding it rounds to an integer, held in the low mantissa bits.
    const SHIFT: f64 = 6755399441055744.0;
    // ln 2 as a head with 21 trailing zero bits (k·LN2_HI is exact) and
    // the rest of ln 2.
    const LN2_HI: f64 = 0.6931471803691238;
    const LN2_LO: f64 = 1.9082149292705877e-10;
    let madd = |a: f64, b: f64, c: f64| if FMA { a.mul_add(b, c) } else { a * b + c };
    let xd = x as f64;
    let shifted = madd(xd, std::f64::consts::LOG2_E, SHIFT);
    let k = shifted - SHIFT;
    let t = madd(-k, LN2_LO, madd(-k, LN2_HI, xd));
    let mut p = 1.0 / 479001600.0; // 1/12!
    let mut factorial = 479001600.0;
    for i in (0..12).rev() {
        factorial /= (i + 1) as f64;
        p = madd(p, t, 1.0 / factorial);
    }
    // k ≥ -151 below the underflow cut, so 2^k is a normal f64.
    let two_k = f64::from_bits((shifted.to_bits().wrapping_add(1023) & 0x7ff) << 52);
    let y = (p * two_k) as f32;
    // Below -104 e^x rounds to 0 in f32 (NaN passes through).
    if xd < -104.0 { 0.0 } else { y }
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
    fn values(len: usize, seed: u32) -> Vec<f32> {
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

    /// Checked once over all 1.12e9 floats in [-104, 0]: equal to f64 `exp`
    /// rounded to f32 for every one, and different from glibc 2.36's `expf`
    /// (not correctly rounded) for 97 052 of them.
    #[test]
    fn exp_is_the_f64_exp_rounded_to_f32() {
        let last = (-104f32).to_bits();
        let sample = (0x8000_0000..=last).step_by(997).map(f32::from_bits);
        let edges = [0.0, -0.0, -1e-30, -87.5, -103.9, -103.98, -104.0, -105.0, f32::NEG_INFINITY];
        for x in sample.chain(edges) {
            let want = (x as f64).exp() as f32;
            for (got, fma) in [(exp::<true>(x), true), (exp::<false>(x), false)] {
                assert_eq!(got.to_bits(), want.to_bits(), "e^{x:e} (fma {fma}): {got:e}, rounded f64 exp {want:e}");
            }
        }
        assert!(exp::<true>(f32::NAN).is_nan() && exp::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn tiles_are_as_accurate_as_the_attention_written_out_in_f32() {
        for (n, d, dv) in [(1, 1, 1), (5, 3, 7), (21, 32, 32), (37, 64, 64), (197, 64, 64), (33, 80, 40)] {
            let (q, kt, v, bias) = (values(n * d, 1), values(d * n, 2), values(n * dv, 3), values(n, 4));
            let rows = |data, width| Matrix { data, row_stride: width, col_stride: 1 };
            let columns = |data, height| Matrix { data, row_stride: 1, col_stride: height };
            // In order, and transposed in memory (k as [n,d] the way Q·Kᵀ reads it).
            let layouts = [(rows(&q, d), rows(&kt, n), rows(&v, dv)), (columns(&q, n), columns(&kt, d), columns(&v, n))];
            for (bias, (q, kt, v)) in [None, Some(bias.as_slice())].into_iter().flat_map(|b| layouts.map(|l| (b, l))) {
                let head = Head { q, kt, v, bias, scale: 0.7, n, d, dv };
                let mut out = vec![f32::NAN; n * dv];
                attend(&head, &mut Scratch::default(), &mut |i, c, values| out[i * dv + c..][..values.len()].copy_from_slice(values));
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
