//! The decode step's matrix products, summed in one fixed order per element.
//!
//! A decode step multiplies a few rows (one per running sequence) by each weight matrix. A
//! general matrix library is the wrong tool for that twice over: gemm takes a different path
//! for one row than for several (so a sequence's logits would change with the batch it runs
//! in), and its matrix path packs the weight matrix before use, which for a handful of rows
//! costs as much memory traffic as the product itself.
//!
//! [`matmul_t`] streams each weight row once per step and multiplies it with every row of the
//! batch while it is in cache. Each output element is one dot product summed the same way
//! whatever the batch and however the work is split across threads: sixteen lanes over the
//! inner dimension in steps of sixteen, fused multiply-adds, a fixed reduction of the lanes,
//! then the leftover elements in order. So a row's result never depends on the rows beside it
//! (`tests::a_row_does_not_depend_on_its_batch`). On x86-64 the lanes are one AVX-512 register
//! or two AVX2 registers; elsewhere the same fused operations run one lane at a time, with the
//! same result (`tests::every_path_gives_the_same_bits`).

use rayon::prelude::*;

use crate::engine::simd::{path, Path};

/// Weight rows per parallel task.
const TASK_ROWS: usize = 32;
/// Partial sums per dot product: one AVX-512 register, two AVX2 registers.
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// `x @ w^T` for `x` `[rows, inner]` and `w` `[outs, inner]`, both row-major; returns
/// `[rows, outs]`, row-major, each element written in place by the task that computes it (a
/// transposition after the product cost 0.6 ms of an 8-row decode step).
pub fn matmul_t(x: &[f32], rows: usize, w: &[f32], inner: usize) -> Vec<f32> {
    assert!(
        inner > 0 && x.len() == rows * inner && w.len().is_multiple_of(inner),
        "matmul_t: [{rows}, {inner}] by {} weights",
        w.len()
    );
    let outs = w.len() / inner;
    let path = path();
    let mut out = vec![0f32; rows * outs];
    if rows == 0 {
        return out;
    }
    // Each task owns a run of `TASK_ROWS` weight rows, so a column of the result: it writes the
    // elements of its columns, each once, straight into `out`.
    let columns = Columns {
        ptr: out.as_mut_ptr(),
        outs,
    };
    (0..outs.div_ceil(TASK_ROWS))
        .into_par_iter()
        .for_each(|task| {
            let first = task * TASK_ROWS;
            let n = TASK_ROWS.min(outs - first);
            let ws = &w[first * inner..(first + n) * inner];
            // SAFETY: column `first + o` (o < n) belongs to this task alone, and `r < rows`.
            block(path, x, rows, ws, inner, &mut |o, r, v| unsafe {
                columns.set(r, first + o, v)
            });
        });
    out
}

/// The `[rows, outs]` result that [`matmul_t`]'s tasks write into side by side.
struct Columns {
    ptr: *mut f32,
    outs: usize,
}

// SAFETY: the tasks write disjoint elements (see `set`), and `matmul_t` reads the result only
// after every task has finished.
unsafe impl Sync for Columns {}

impl Columns {
    /// Writes element `[r, o]`.
    ///
    /// # Safety
    /// `r` and `o` are within the result, and no other thread accesses that element meanwhile.
    unsafe fn set(&self, r: usize, o: usize, v: f32) {
        // SAFETY: in bounds and unshared, by the caller's promise.
        unsafe { *self.ptr.add(r * self.outs + o) = v }
    }
}

/// Hands `out(o, r, x[r] · w[o])` every element for the weight rows of `w`, computed in register
/// tiles of `WN` weight rows by up to `XN` batch rows (sized to each path's registers).
fn block(path: Path, x: &[f32], rows: usize, w: &[f32], inner: usize, out: &mut impl Store) {
    match path {
        Path::Avx512 => tiled::<4, 4>(path, x, rows, w, inner, out),
        Path::Avx2 => tiled::<2, 2>(path, x, rows, w, inner, out),
        Path::Portable => tiled::<1, 1>(path, x, rows, w, inner, out),
    }
}

/// Where [`block`] puts each element: `store(o, r, v)` for weight row `o` and batch row `r`.
trait Store: FnMut(usize, usize, f32) {}
impl<F: FnMut(usize, usize, f32)> Store for F {}

fn tiled<const WN: usize, const XN: usize>(
    path: Path,
    x: &[f32],
    rows: usize,
    w: &[f32],
    inner: usize,
    out: &mut impl Store,
) {
    let n = w.len() / inner;
    let mut o = 0;
    while o < n {
        if n - o >= WN {
            weight_tile::<WN, XN>(path, x, rows, w, inner, o, out);
            o += WN;
        } else {
            weight_tile::<1, XN>(path, x, rows, w, inner, o, out);
            o += 1;
        }
    }
}

fn weight_tile<const WN: usize, const XN: usize>(
    path: Path,
    x: &[f32],
    rows: usize,
    w: &[f32],
    inner: usize,
    o: usize,
    out: &mut impl Store,
) {
    let ws: [&[f32]; WN] = std::array::from_fn(|i| &w[(o + i) * inner..(o + i + 1) * inner]);
    let passes = rows / XN + rows % XN;
    let mut r = 0;
    for pass in 0..passes {
        let lines = Lines::new(pass, passes, inner / LANES);
        if rows - r >= XN {
            rows_tile::<WN, XN>(path, x, ws, inner, (o, r), lines, out);
            r += XN;
        } else {
            rows_tile::<WN, 1>(path, x, ws, inner, (o, r), lines, out);
            r += 1;
        }
    }
}

/// The next weight tile's cache lines that one pass over this tile prefetches (a tile gets one
/// pass per tile of batch rows), one line per weight row at the steps where one is due.
///
/// Each pass prefetches its own share of the next tile, so the reads from memory run evenly
/// through all of a tile's passes: when the first pass alone fetched the whole next tile, memory
/// sat idle through the others, and at 8 batch rows on AVX2 (4 passes per tile) a decode step's
/// products took 55-57 ms instead of 48-49 (medians of 25 steps, interleaved).
///
/// A row of the next tile has one 64-byte line per step (sixteen floats). Numbering the steps of
/// all passes one after another, the line due at step `n` is `n / passes`, taken where `n` is a
/// multiple of `passes`: pass `pass` takes the lines from `pass * steps / passes` on, where the
/// pass before it stopped, so the passes together cover every line once.
#[derive(Clone, Copy)]
struct Lines {
    line: usize,
    /// `n % passes` for the current step `n`.
    rem: usize,
    passes: usize,
}

impl Lines {
    /// Pass `pass` of `passes`, over rows of `steps` steps.
    fn new(pass: usize, passes: usize, steps: usize) -> Self {
        let n = pass * steps;
        Self {
            line: n / passes,
            rem: n % passes,
            passes,
        }
    }

    /// The line to prefetch at this step, if one is due; then moves to the next step.
    #[inline(always)]
    fn step(&mut self) -> Option<usize> {
        let due = (self.rem == 0).then_some(self.line);
        self.rem += 1;
        if self.rem == self.passes {
            self.rem = 0;
            self.line += 1;
        }
        due
    }
}

/// Batch rows `r..r + XN` against the weight rows `ws` (from weight row `o`).
fn rows_tile<const WN: usize, const XN: usize>(
    path: Path,
    x: &[f32],
    ws: [&[f32]; WN],
    inner: usize,
    (o, r): (usize, usize),
    lines: Lines,
    out: &mut impl Store,
) {
    let xs: [&[f32]; XN] = std::array::from_fn(|j| &x[(r + j) * inner..(r + j + 1) * inner]);
    let lanes = lanes(path, ws, xs, lines);
    for i in 0..WN {
        for j in 0..XN {
            out(o + i, r + j, finish(&lanes[i][j], ws[i], xs[j]));
        }
    }
}

/// The lanes' fixed reduction (lane `l` with lane `l + 8`, then pairs within the eight), then
/// the elements past the last whole group of lanes, in order.
fn finish(lanes: &Lanes, w: &[f32], x: &[f32]) -> f32 {
    let l: [f32; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
    let mut sum = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    let whole = w.len() / LANES * LANES;
    for (a, b) in w[whole..].iter().zip(&x[whole..]) {
        sum = a.mul_add(*b, sum);
    }
    sum
}

fn lanes<const WN: usize, const XN: usize>(
    path: Path,
    ws: [&[f32]; WN],
    xs: [&[f32]; XN],
    lines: Lines,
) -> [[Lanes; XN]; WN] {
    match path {
        // SAFETY: `path()` picks these only where the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { lanes_avx512(ws, xs, lines) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { lanes_avx2(ws, xs, lines) },
        _ => lanes_portable(ws, xs),
    }
}

/// Lane `l` of an element is `Σ_m w[16m + l] · x[16m + l]`, each term added by a fused
/// multiply-add, in order of `m`.
fn lanes_portable<const WN: usize, const XN: usize>(
    ws: [&[f32]; WN],
    xs: [&[f32]; XN],
) -> [[Lanes; XN]; WN] {
    let mut acc = [[[0f32; LANES]; XN]; WN];
    let whole = xs[0].len() / LANES * LANES;
    for k in (0..whole).step_by(LANES) {
        for i in 0..WN {
            for j in 0..XN {
                for l in 0..LANES {
                    acc[i][j][l] = ws[i][k + l].mul_add(xs[j][k + l], acc[i][j][l]);
                }
            }
        }
    }
    acc
}

// The vector paths load through masked loads with every lane on (LLVM turns them into plain
// loads) and step pointers with `wrapping_add`: `_mm*_loadu_ps` and `pointer::add` carry the
// standard library's debug-build precondition checks, which in the dev profile (the tests and
// the README's server) cost about four times the arithmetic of these loops.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_avx512<const WN: usize, const XN: usize>(
    ws: [&[f32]; WN],
    xs: [&[f32]; XN],
    mut lines: Lines,
) -> [[Lanes; XN]; WN] {
    use std::arch::x86_64::*;
    let inner = xs[0].len();
    let whole = inner / LANES * LANES;
    let mut acc = [[_mm512_setzero_ps(); XN]; WN];
    let mut k = 0;
    while k < whole {
        let due = lines.step();
        let mut xv = [_mm512_setzero_ps(); XN];
        for j in 0..XN {
            // SAFETY: k + 16 <= whole <= the row's length.
            xv[j] = unsafe { _mm512_maskz_loadu_ps(0xffff, xs[j].as_ptr().wrapping_add(k)) };
        }
        for i in 0..WN {
            // SAFETY: every row has the same length (`inner`).
            let wv = unsafe { _mm512_maskz_loadu_ps(0xffff, ws[i].as_ptr().wrapping_add(k)) };
            // This pass's share of the next tile's rows (the rows are contiguous, see `Lines`):
            // the weights come from memory, and the loads of the next tile would otherwise
            // wait for it. A prefetch never faults, also past the end.
            if let Some(line) = due {
                let ahead = ws[i].as_ptr().wrapping_add(WN * inner + line * LANES);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            for j in 0..XN {
                acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
            }
        }
        k += LANES;
    }
    let mut out = [[[0f32; LANES]; XN]; WN];
    for i in 0..WN {
        for j in 0..XN {
            // SAFETY: `out[i][j]` holds sixteen floats.
            unsafe { _mm512_storeu_ps(out[i][j].as_mut_ptr(), acc[i][j]) };
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_avx2<const WN: usize, const XN: usize>(
    ws: [&[f32]; WN],
    xs: [&[f32]; XN],
    mut lines: Lines,
) -> [[Lanes; XN]; WN] {
    use std::arch::x86_64::*;
    let all = _mm256_set1_epi32(-1);
    let load = |row: &[f32], k: usize| {
        // SAFETY: k + 16 <= whole <= the row's length.
        unsafe {
            (
                _mm256_maskload_ps(row.as_ptr().wrapping_add(k), all),
                _mm256_maskload_ps(row.as_ptr().wrapping_add(k + 8), all),
            )
        }
    };
    let inner = xs[0].len();
    let whole = inner / LANES * LANES;
    let zero = _mm256_setzero_ps();
    let mut acc = [[(zero, zero); XN]; WN];
    let mut k = 0;
    while k < whole {
        let due = lines.step();
        let xv: [(__m256, __m256); XN] = std::array::from_fn(|j| load(xs[j], k));
        for i in 0..WN {
            let wv = load(ws[i], k);
            // As in `lanes_avx512`.
            if let Some(line) = due {
                let ahead = ws[i].as_ptr().wrapping_add(WN * inner + line * LANES);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            for j in 0..XN {
                acc[i][j].0 = _mm256_fmadd_ps(wv.0, xv[j].0, acc[i][j].0);
                acc[i][j].1 = _mm256_fmadd_ps(wv.1, xv[j].1, acc[i][j].1);
            }
        }
        k += LANES;
    }
    let mut out = [[[0f32; LANES]; XN]; WN];
    for i in 0..WN {
        for j in 0..XN {
            // SAFETY: `out[i][j]` holds sixteen floats.
            unsafe {
                _mm256_storeu_ps(out[i][j].as_mut_ptr(), acc[i][j].0);
                _mm256_storeu_ps(out[i][j].as_mut_ptr().add(8), acc[i][j].1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passes_over_a_tile_prefetch_each_line_once() {
        for (steps, count) in [(36, 1), (36, 4), (37, 4), (96, 2), (5, 3), (3, 5), (1, 1)] {
            let mut due = Vec::new();
            for pass in 0..count {
                let mut lines = Lines::new(pass, count, steps);
                due.extend((0..steps).filter_map(|_| lines.step()));
            }
            assert_eq!(
                due,
                (0..steps).collect::<Vec<_>>(),
                "{steps} steps, {count} passes"
            );
        }
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        // Shapes of the default model's projections and its output layer, and an odd one
        // (a tail past the lanes, a weight-row count that is no multiple of the tiles).
        for (outs, inner) in [
            (576, 576),
            (192, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
            (37, 21),
        ] {
            let w = random(outs * inner, 1);
            let x = random(9 * inner, 2);
            let alone = matmul_t(&x[..inner], 1, &w, inner);
            for batch in 2..=9 {
                let all = matmul_t(&x[..batch * inner], batch, &w, inner);
                assert_eq!(
                    all[..outs],
                    alone[..],
                    "[{outs}, {inner}]: row 0 differs in a batch of {batch}"
                );
                // The last row too: it sits in a different place in the tiles.
                let last = matmul_t(&x[(batch - 1) * inner..batch * inner], 1, &w, inner);
                assert_eq!(all[(batch - 1) * outs..], last[..]);
            }
        }
    }

    #[test]
    fn matches_a_double_precision_product() {
        let (rows, outs, inner) = (3, 45, 83);
        let w = random(outs * inner, 3);
        let x = random(rows * inner, 4);
        let got = matmul_t(&x, rows, &w, inner);
        for r in 0..rows {
            for o in 0..outs {
                let want: f64 = (0..inner)
                    .map(|k| x[r * inner + k] as f64 * w[o * inner + k] as f64)
                    .sum();
                let diff = (got[r * outs + o] as f64 - want).abs();
                assert!(diff < 1e-4, "[{r}, {o}]: {} vs {want}", got[r * outs + o]);
            }
        }
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let (inner, outs, rows) = (600, 9, 7);
        let w = random(outs * inner, 5);
        let x = random(rows * inner, 6);
        let run = |path| {
            let mut out = vec![0f32; outs * rows];
            block(path, &x, rows, &w, inner, &mut |o, r, v| {
                out[r * outs + o] = v
            });
            out
        };
        let portable = run(Path::Portable);
        for path in crate::engine::simd::paths() {
            assert_eq!(run(path), portable, "{path:?}");
        }
    }
}
