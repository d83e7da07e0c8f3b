//! The model's matrix products, each output element summed in one fixed order whatever the
//! batch.
//!
//! A decode step multiplies a few rows (one per running sequence) by each weight matrix, and a
//! prompt piece a few hundred. A general matrix library is the wrong tool for the first: gemm
//! takes a different path for one row than for several (so a sequence's logits would change
//! with the batch it runs in), and its matrix path packs the weight matrix before use, which
//! for a handful of rows costs as much memory traffic as the product itself.
//!
//! The weights are packed once, at load, as [`Panels`]: the weights of `width` outputs side by
//! side at each inner index, so one vector load takes one weight for each of them. [`matmul`]
//! runs a tile of batch rows against a panel by broadcasting each row's activation and adding
//! it into one accumulator lane per output (as a GEMM microkernel does): at each inner index a
//! tile of 8 rows x 48 outputs (AVX-512) loads 3 weight vectors for 24 fused multiply-adds, so
//! the arithmetic keeps up with the weights' stream from memory well past one row.
//!
//! Each output element is one chain of fused multiply-adds over the inner dimension in order,
//! starting from zero, whatever the batch, the tile, the panel width or the vector width: a
//! row's result never depends on the rows beside it
//! (`tests::a_row_does_not_depend_on_its_batch`) and every path gives the same bits
//! (`tests::every_path_gives_the_same_bits_as_the_plain_chain`).

use rayon::prelude::*;

use crate::engine::simd::{path, Path};

/// Batch rows per block of a product's work: while the panels run over one block, its
/// activations (at most 128 x 1536 floats, 768 KiB, for the default model) stay in cache.
const BLOCK_ROWS: usize = 128;
/// The widest panel and the tallest tile of any path (the staging buffer's size).
const MAX_WIDTH: usize = 48;
const MAX_TILE: usize = 8;

/// The AVX2 path's tile: 6 rows x 2 vectors of 8 outputs, 12 accumulators beside 2 weight
/// vectors and a broadcast in the 16 ymm registers. (4 x 3, the first choice, left one
/// accumulator to be spilled to the stack at every inner index: a step's products at 8 rows
/// took 34.8 ms against 27.6 ms for 6 x 2; 4 x 2 27.7, 3 x 3 25.7 but 18.0 ms at one row
/// against 14.3, 8 x 1 34.5.)
const AVX2_VECTORS: usize = 2;
const AVX2_TILE: usize = 6;

/// Outputs per panel and batch rows per tile: as many accumulators as the registers hold
/// beside the weight vectors (AVX-512: 8 x 3 of 32 zmm; AVX2: see [`AVX2_TILE`]).
fn shape(path: Path) -> (usize, usize) {
    match path {
        Path::Avx512 => (48, 8),
        Path::Avx2 => (8 * AVX2_VECTORS, AVX2_TILE),
        Path::Portable => (8, 4),
    }
}

/// A weight matrix `[outs, inner]` packed for [`matmul`] and for the vector path it was packed
/// for. Panel `p` holds outputs `p * width ..` as `[inner, width]`, row-major; the last panel is
/// padded with zeros. The packed copy replaces the row-major one (a second copy of the default
/// model's weights would be another 0.54 GB).
pub struct Panels {
    data: Vec<f32>,
    outs: usize,
    inner: usize,
    path: Path,
}

impl Panels {
    /// Packs the row-major `[outs, inner]` matrix `w` for this CPU's path.
    pub fn new(w: &[f32], inner: usize) -> Self {
        Self::for_path(path(), w, inner)
    }

    fn for_path(path: Path, w: &[f32], inner: usize) -> Self {
        assert!(
            inner > 0 && w.len().is_multiple_of(inner),
            "Panels: {} weights in rows of {inner}",
            w.len()
        );
        let outs = w.len() / inner;
        let (width, _) = shape(path);
        let mut data = vec![0f32; outs.div_ceil(width) * inner * width];
        data.par_chunks_mut(inner * width)
            .enumerate()
            .for_each(|(p, panel)| {
                let first = p * width;
                for c in 0..width.min(outs - first) {
                    let row = &w[(first + c) * inner..(first + c + 1) * inner];
                    for (k, v) in row.iter().enumerate() {
                        panel[k * width + c] = *v;
                    }
                }
            });
        Self {
            data,
            outs,
            inner,
            path,
        }
    }

    pub fn outs(&self) -> usize {
        self.outs
    }

    pub fn inner(&self) -> usize {
        self.inner
    }

    /// Appends row `o` of the matrix to `out` (the token embedding, where the output layer is
    /// tied to it).
    pub fn row_into(&self, o: usize, out: &mut Vec<f32>) {
        assert!(o < self.outs, "row {o} of {}", self.outs);
        let (width, _) = shape(self.path);
        let size = self.inner * width;
        let panel = &self.data[o / width * size..(o / width + 1) * size];
        out.extend(panel[o % width..].iter().step_by(width));
    }
}

/// `x @ w^T` for `x` `[rows, inner]`, row-major, and the packed `w` `[outs, inner]`; returns
/// `[rows, outs]`, row-major.
pub fn matmul(x: &[f32], rows: usize, w: &Panels) -> Vec<f32> {
    let (inner, outs) = (w.inner, w.outs);
    assert_eq!(
        x.len(),
        rows * inner,
        "matmul: [{rows}, {inner}] activations by [{outs}, {inner}] weights"
    );
    let mut out = vec![0f32; rows * outs];
    if rows == 0 || outs == 0 {
        return out;
    }
    let (width, tallest) = shape(w.path);
    let tiles = Tiles::new(x, rows, inner, tallest);
    let panels = outs.div_ceil(width);
    let result = Output {
        ptr: out.as_mut_ptr(),
        outs,
    };
    // One task per (block of rows, panel), block by block: a thread's run of tasks streams
    // through consecutive panels, which lie one after another in memory.
    (0..tiles.blocks.len() * panels)
        .into_par_iter()
        .for_each(|task| {
            let (block, p) = (task / panels, task % panels);
            let panel = &w.data[p * inner * width..(p + 1) * inner * width];
            let first = p * width;
            let n = width.min(outs - first);
            let mut staged = [0f32; MAX_WIDTH * MAX_TILE];
            for tile in &tiles.blocks[block] {
                let xt = &tiles.data[tile.at..tile.at + tile.rows * inner];
                run(w.path, tile.rows, panel, xt, &mut staged);
                for j in 0..tile.rows {
                    // SAFETY: columns `first..first + n` belong to this task's panel alone,
                    // rows `tile.row + j` to its block, and both are within the result.
                    unsafe { result.set(tile.row + j, first, &staged[j * width..j * width + n]) };
                }
            }
        });
    out
}

/// The `[rows, outs]` result that [`matmul`]'s tasks write into side by side.
struct Output {
    ptr: *mut f32,
    outs: usize,
}

// SAFETY: the tasks write disjoint elements (see `set`), and `matmul` reads the result only
// after every task has finished.
unsafe impl Sync for Output {}

impl Output {
    /// Writes `values` to row `r` from column `o` on.
    ///
    /// # Safety
    /// The elements are within the result, and no other thread accesses them meanwhile.
    unsafe fn set(&self, r: usize, o: usize, values: &[f32]) {
        // SAFETY: in bounds and unshared, by the caller's promise.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.add(r * self.outs + o),
                values.len(),
            )
        }
    }
}

/// The activations cut into tiles of batch rows, each tile's rows interleaved (`[inner, rows]`,
/// row-major), so that the kernel takes one tile's activations at an inner index from one
/// place.
struct Tiles {
    data: Vec<f32>,
    /// The tiles of each block of rows.
    blocks: Vec<Vec<Tile>>,
}

struct Tile {
    /// Its first batch row.
    row: usize,
    rows: usize,
    /// Where its activations start in `data`.
    at: usize,
}

impl Tiles {
    fn new(x: &[f32], rows: usize, inner: usize, tallest: usize) -> Self {
        let mut data = Vec::with_capacity(x.len());
        let mut blocks = Vec::with_capacity(rows.div_ceil(BLOCK_ROWS));
        for start in (0..rows).step_by(BLOCK_ROWS) {
            let end = rows.min(start + BLOCK_ROWS);
            let mut tiles = Vec::new();
            let mut row = start;
            while row < end {
                let n = tallest.min(end - row);
                tiles.push(Tile {
                    row,
                    rows: n,
                    at: data.len(),
                });
                let xs = &x[row * inner..(row + n) * inner];
                for k in 0..inner {
                    data.extend((0..n).map(|j| xs[j * inner + k]));
                }
                row += n;
            }
            blocks.push(tiles);
        }
        Self { data, blocks }
    }
}

/// `out[j * width + c] = xt[.., j] · panel[.., c]` for the tile's `rows` rows and every output
/// `c` of the panel.
fn run(path: Path, rows: usize, panel: &[f32], xt: &[f32], out: &mut [f32; MAX_WIDTH * MAX_TILE]) {
    macro_rules! tile {
        ($f:ident) => {
            match rows {
                1 => $f::<1>(panel, xt, out),
                2 => $f::<2>(panel, xt, out),
                3 => $f::<3>(panel, xt, out),
                4 => $f::<4>(panel, xt, out),
                5 => $f::<5>(panel, xt, out),
                6 => $f::<6>(panel, xt, out),
                7 => $f::<7>(panel, xt, out),
                8 => $f::<8>(panel, xt, out),
                _ => unreachable!("tiles are at most {MAX_TILE} rows"),
            }
        };
    }
    match path {
        // SAFETY: `path()` picks these only where the CPU has the features (and the tests
        // pass only paths from `paths()`).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { tile!(tile_avx512) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { tile!(tile_avx2) },
        _ => tile!(tile_portable),
    }
}

/// Output `c` of row `j` is `Σ_k panel[k, c] · xt[k, j]`, one fused multiply-add per `k`, in
/// order of `k`, from zero.
fn tile_portable<const T: usize>(panel: &[f32], xt: &[f32], out: &mut [f32]) {
    const W: usize = 8;
    let mut acc = [[0f32; W]; T];
    for (w, x) in panel.chunks_exact(W).zip(xt.chunks_exact(T)) {
        for j in 0..T {
            for c in 0..W {
                acc[j][c] = w[c].mul_add(x[j], acc[j][c]);
            }
        }
    }
    for j in 0..T {
        out[j * W..(j + 1) * W].copy_from_slice(&acc[j]);
    }
}

// The vector paths load and store through masks with every lane on (LLVM turns them into plain
// loads and stores) and step pointers with `wrapping_add`: `_mm*_loadu_ps` and `pointer::add`
// carry the standard library's debug-build precondition checks, which in the dev profile (the
// tests and the README's server) cost about four times the arithmetic of these loops.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const T: usize>(panel: &[f32], xt: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    const W: usize = 48;
    let mut acc = [[_mm512_setzero_ps(); 3]; T];
    for (w, x) in panel.chunks_exact(W).zip(xt.chunks_exact(T)) {
        let p = w.as_ptr();
        // SAFETY: `w` holds 48 floats.
        let wv: [__m512; 3] = std::array::from_fn(|v| unsafe {
            _mm512_maskz_loadu_ps(0xffff, p.wrapping_add(16 * v))
        });
        for j in 0..T {
            let xb = _mm512_set1_ps(x[j]);
            for v in 0..3 {
                acc[j][v] = _mm512_fmadd_ps(wv[v], xb, acc[j][v]);
            }
        }
    }
    assert!(out.len() >= T * W);
    for (j, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: within `out` (checked above).
            unsafe {
                _mm512_mask_storeu_ps(out.as_mut_ptr().wrapping_add(j * W + 16 * v), 0xffff, *a)
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const T: usize>(panel: &[f32], xt: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    const W: usize = 8 * AVX2_VECTORS;
    let all = _mm256_set1_epi32(-1);
    let mut acc = [[_mm256_setzero_ps(); AVX2_VECTORS]; T];
    for (w, x) in panel.chunks_exact(W).zip(xt.chunks_exact(T)) {
        let p = w.as_ptr();
        // SAFETY: `w` holds `W` floats.
        let wv: [__m256; AVX2_VECTORS] =
            std::array::from_fn(|v| unsafe { _mm256_maskload_ps(p.wrapping_add(8 * v), all) });
        for j in 0..T {
            let xb = _mm256_set1_ps(x[j]);
            for v in 0..AVX2_VECTORS {
                acc[j][v] = _mm256_fmadd_ps(wv[v], xb, acc[j][v]);
            }
        }
    }
    assert!(out.len() >= T * W);
    for (j, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: within `out` (checked above).
            unsafe { _mm256_maskstore_ps(out.as_mut_ptr().wrapping_add(j * W + 8 * v), all, *a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// The plain definition: one fused multiply-add per inner index, in order, from zero.
    fn chained(x: &[f32], w: &[f32], inner: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for x in x.chunks_exact(inner) {
            for w in w.chunks_exact(inner) {
                out.push(w.iter().zip(x).fold(0f32, |acc, (a, b)| a.mul_add(*b, acc)));
            }
        }
        out
    }

    #[test]
    fn every_path_gives_the_same_bits_as_the_plain_chain() {
        // Tiles of every height, a last panel that is not full, a second block of rows.
        for (rows, outs, inner) in [(7, 9, 600), (8, 50, 33), (130, 49, 17), (3, 1, 1)] {
            let w = random(outs * inner, 5);
            let x = random(rows * inner, 6);
            let want = chained(&x, &w, inner);
            for path in crate::engine::simd::paths() {
                let got = matmul(&x, rows, &Panels::for_path(path, &w, inner));
                assert_eq!(
                    got, want,
                    "{path:?}, [{rows}, {inner}] by [{outs}, {inner}]"
                );
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        // Shapes of the default model's products and its output layer, and an odd one.
        for (outs, inner) in [
            (960, 576),
            (576, 576),
            (3072, 576),
            (576, 1536),
            (49152, 576),
            (37, 21),
        ] {
            let w = Panels::new(&random(outs * inner, 1), inner);
            let x = random(17 * inner, 2);
            let alone: Vec<Vec<f32>> = x
                .chunks_exact(inner)
                .map(|row| matmul(row, 1, &w))
                .collect();
            for batch in 2..=17 {
                let all = matmul(&x[..batch * inner], batch, &w);
                for (r, row) in all.chunks_exact(outs).enumerate() {
                    assert_eq!(
                        row, alone[r],
                        "[{outs}, {inner}]: row {r} in a batch of {batch}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_a_double_precision_product() {
        let (rows, outs, inner) = (3, 45, 83);
        let w = random(outs * inner, 3);
        let x = random(rows * inner, 4);
        let got = matmul(&x, rows, &Panels::new(&w, inner));
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
    fn a_packed_row_reads_back() {
        let (outs, inner) = (53, 19);
        let w = random(outs * inner, 7);
        for path in crate::engine::simd::paths() {
            let packed = Panels::for_path(path, &w, inner);
            for o in 0..outs {
                let mut row = Vec::new();
                packed.row_into(o, &mut row);
                assert_eq!(row, w[o * inner..(o + 1) * inner], "{path:?}, row {o}");
            }
        }
    }

    #[test]
    fn no_rows_give_an_empty_product() {
        let w = Panels::new(&random(10 * 4, 8), 4);
        assert!(matmul(&[], 0, &w).is_empty());
    }
}
