//! `BipartiteMerge`: a block's bipartite soft matching on given similarity
//! scores, then ToMe's size-weighted merge (`TOME_SPEC.md`). One kernel for
//! every runtime that takes the op: tract (`--target tract`) and
//! onnxruntime and OpenVINO through their plugins (`plugins/`).

/// The merge's inputs for a batch: x [batch, n, c], scores [batch, ⌈n/2⌉,
/// ⌊n/2⌋] (A = even tokens by B = odd tokens), size [batch, n] or every
/// token one patch; r A tokens merge away, the first `prefix` tokens are
/// protected.
pub struct Merge<'a> {
    pub x: &'a [f32],
    pub scores: &'a [f32],
    pub size: Option<&'a [f32]>,
    pub batch: usize,
    pub n: usize,
    pub c: usize,
    pub r: usize,
    pub prefix: usize,
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
        let mut inputs = vec![("x", self.x.len(), [b, n, c]), ("scores", self.scores.len(), [b, n.div_ceil(2), n / 2])];
        inputs.extend(self.size.map(|s| ("size", s.len(), [b, n, 1])));
        match inputs.into_iter().find(|(_, len, shape)| *len != shape.iter().product::<usize>()) {
            Some((what, len, shape)) => Err(format!("{what} has {len} values, must be {shape:?}")),
            None => Ok(()),
        }
    }

    /// Merges every image: x into `out_x` [batch, n - r, c], sizes into
    /// `out_size` [batch, n - r]. Call `check_lengths` first.
    pub fn run(&self, out_x: &mut [f32], out_size: &mut [f32]) {
        let (n, c, out_n) = (self.n, self.c, self.n - self.r);
        let (na, nb) = (n.div_ceil(2), n / 2);
        for b in 0..self.batch {
            let image = Image {
                x: &self.x[b * n * c..][..n * c],
                size: self.size.map(|s| &s[b * n..][..n]),
                c,
            };
            let rows = self.rows(&self.scores[b * na * nb..][..na * nb]);
            image.write(&rows, &mut out_x[b * out_n * c..][..out_n * c], &mut out_size[b * out_n..][..out_n]);
        }
    }

    /// The matching (`TOME_SPEC.md`): each A token's best B token, the r
    /// best-scoring A tokens merge away, and the output order
    /// `unm[:pa], B[:pb], unm[pa:], B[pb:]`.
    fn rows(&self, scores: &[f32]) -> Vec<Row> {
        let (na, nb) = (self.n.div_ceil(2), self.n / 2);
        let (pa, pb) = (self.prefix.div_ceil(2), self.prefix / 2);
        // Max and argmax per A row over unprotected B columns; ties go to the
        // lowest index, and a protected A row scores -inf.
        let best: Vec<(f32, usize)> = (0..na)
            .map(|i| match i < pa {
                true => (f32::NEG_INFINITY, 0),
                false => best_of(&scores[i * nb + pb..][..nb - pb], pb),
            })
            .collect();
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

/// A row's maximum and the first index holding it (offset by `skip`), or
/// (-inf, 0) if every value is -inf or NaN. The maximum is taken in eight
/// lanes, which the compiler keeps in one vector register.
fn best_of(row: &[f32], skip: usize) -> (f32, usize) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
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
