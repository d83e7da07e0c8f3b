//! Which vector instructions this CPU has, and the exponentials of teachd's hot loops, written
//! so that the compiler vectorises them on every path with the same bits.
//!
//! The softmax over the vocabulary (every scored position, every generated token), the decode
//! step's activation and its attention weights each take tens of thousands of exponentials per
//! sequence. One C library call per element cost ~3 ns (f64) / ~1.5 ns (f32) here; these are
//! plain IEEE multiplications and additions (Rust never fuses them), integer bit operations and
//! selects, element by element, so a loop of them compiled for AVX-512 or AVX2 gives exactly
//! the bits of the same loop compiled without (`tests::every_path_gives_the_same_bits`) and an
//! element's result never depends on its neighbours. Hand-written rather than taken from a
//! crate: `wide`'s VCL exponentials (already in the tree) are compiled for the baseline
//! instruction set here, and measured slower than the C library (f64: 444 µs against 173 µs for
//! a 49k log-softmax; f32: 6.2 µs against 2.3 µs for 1536 activations, in one process); `pulp`
//! (in the tree through gemm) picks instructions at run time but has no exponential.

/// How vector loops are compiled; every path gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Path {
    Avx512,
    Avx2,
    Portable,
}

/// The widest path this CPU has, or a narrower one named by the environment variable
/// `TEACHD_SIMD` (`avx2` or `portable`: to measure another path on one machine; every path gives
/// the same bits). Decided once per process.
pub fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        chosen(
            widest_detected(),
            std::env::var("TEACHD_SIMD").ok().as_deref(),
        )
    })
}

/// The path `requested` names if the CPU has it (`widest` is its widest), else `widest`. (Every
/// x86-64 CPU with AVX-512F also has AVX2 and FMA.)
fn chosen(widest: Path, requested: Option<&str>) -> Path {
    match requested {
        Some("portable") => Path::Portable,
        Some("avx2") if widest == Path::Avx512 => Path::Avx2,
        _ => widest,
    }
}

fn widest_detected() -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Path::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Path::Avx2;
        }
    }
    Path::Portable
}

/// The paths this CPU can run, the portable one first (for tests that compare them).
#[cfg(test)]
pub fn paths() -> Vec<Path> {
    let widest = widest_detected();
    let mut paths = vec![Path::Portable, chosen(widest, Some("avx2")), widest];
    paths.dedup();
    paths
}

/// `exp` of every element, in place (f64). Within 2 ulp of the C library's `exp` for
/// arguments from -708.39 to 709.43; 0 below (where exp is within 3e-308 of 0), infinity above
/// (exp there is within 30% of `f64::MAX`), NaN for NaN
/// (`tests::f64_exponentials_match_the_c_library`).
pub fn exp_f64(xs: &mut [f64]) {
    exp_f64_on(path(), xs)
}

fn exp_f64_on(path: Path, xs: &mut [f64]) {
    widest(path, || xs.iter_mut().for_each(|x| *x = exp1_f64(*x)))
}

/// `exp` of every element, in place (f32). Within 1 ulp of the C library's `expf` for arguments
/// from -87.33 to 88.37; 0 below (where exp is within 1.2e-38 of 0), infinity above (exp there
/// is within 30% of `f32::MAX`), NaN for NaN (`tests::f32_exponentials_match_the_c_library`).
pub fn exp_f32(xs: &mut [f32]) {
    exp_f32_on(path(), xs)
}

fn exp_f32_on(path: Path, xs: &mut [f32]) {
    widest(path, || xs.iter_mut().for_each(|x| *x = exp1_f32(*x)))
}

/// `exp(x_i * scale - shift)` of every logit into `out` (as long as `logits`): the shifted
/// softmax terms, in one pass.
pub fn shifted_exps(logits: &[f32], scale: f64, shift: f64, out: &mut [f64]) {
    assert_eq!(
        logits.len(),
        out.len(),
        "shifted_exps: one output per logit"
    );
    widest(path(), || {
        for (o, &x) in out.iter_mut().zip(logits) {
            *o = exp1_f64(x as f64 * scale - shift);
        }
    })
}

/// The largest element, NaN ignored (`f32::NEG_INFINITY` when there is none): what folding
/// `f32::max` over the slice gives, in sixteen lanes.
pub fn max_f32(xs: &[f32]) -> f32 {
    widest(path(), || {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let chunks = xs.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                lanes[i] = lanes[i].max(c[i]);
            }
        }
        lanes
            .iter()
            .chain(tail)
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    })
}

/// The sum in a fixed order: lane `l` of eight sums the elements `8m + l` in order of `m`, the
/// lanes are added pairwise (`l` with `l + 4`, then `l` with `l + 2`, then the two), then the
/// elements past the last whole eight, in order.
pub fn sum_f64(xs: &[f64]) -> f64 {
    widest(path(), || {
        let mut lanes = [0f64; 8];
        let chunks = xs.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                lanes[i] += c[i];
            }
        }
        let l = lanes;
        let s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
        tail.iter().fold(s, |s, x| s + x)
    })
}

/// Runs `f` in a function compiled for `path`: `f`'s loops, inlined there, vectorise for it.
/// The loops' operations are the same on every path, so are their results.
fn widest<R>(path: Path, f: impl FnOnce() -> R) -> R {
    match path {
        // SAFETY: `path()` picks these only where the CPU has the features (and the tests
        // pass only paths from `paths()`).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { avx512(f) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `exp(x) = 2^n e^r` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`: `n` by adding and
/// subtracting 1.5 * 2^52 (which leaves `n` in the low bits of the sum), `r` by Cody and Waite's
/// two-part `ln 2` (its high part has few enough bits that `n * LN2_HI` is exact), `e^r` by its
/// Taylor series to the 13th power (truncation error below 1e-17), `2^n` by writing `n` into an
/// exponent field.
#[inline(always)]
fn exp1_f64(x: f64) -> f64 {
    const SHIFT: f64 = 6755399441055744.0; // 1.5 * 2^52
    const LN2_HI: f64 = 0.693145751953125;
    const LN2_LO: f64 = 1.428_606_820_309_417_2e-6;
    let t = x * std::f64::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = INV_FACTORIAL_F64[13];
    for k in (0..13).rev() {
        p = p * r + INV_FACTORIAL_F64[k];
    }
    // `n` sits in the low bits of `t` (two's complement); its exponent field is `n + 1023`.
    let scale = f64::from_bits((t.to_bits().wrapping_add(1023)) << 52);
    let v = p * scale;
    if x < -708.39 {
        0.0
    } else if x > 709.43 {
        f64::INFINITY
    } else {
        v
    }
}

/// `1 / k!` for `k` in 0..=13, each rounded once (`k!` is exact in f64).
const INV_FACTORIAL_F64: [f64; 14] = {
    let (mut t, mut factorial, mut k) = ([1.0; 14], 1.0, 1);
    while k < 14 {
        factorial *= k as f64;
        t[k] = 1.0 / factorial;
        k += 1;
    }
    t
};

/// [`exp1_f64`] in f32: 1.5 * 2^23, Cody and Waite's f32 `ln 2`, Taylor to the 7th power
/// (truncation error below 6e-9).
#[inline(always)]
fn exp1_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12582912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 355.0 / 512.0; // 0.693359375, nine bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    const INV_FACTORIAL: [f32; 8] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = INV_FACTORIAL[7];
    for k in (0..7).rev() {
        p = p * r + INV_FACTORIAL[k];
    }
    let scale = f32::from_bits((t.to_bits().wrapping_add(127)) << 23);
    let v = p * scale;
    if x < -87.33 {
        0.0
    } else if x > 88.37 {
        f32::INFINITY
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps64(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    fn ulps32(a: f32, b: f32) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    /// Every `step`-th f32 from `lo` to `hi` (both of the same sign), as f32.
    fn floats(lo: f32, hi: f32, step: usize) -> Vec<f32> {
        let (a, b) = (
            lo.to_bits().min(hi.to_bits()),
            lo.to_bits().max(hi.to_bits()),
        );
        (a..=b).step_by(step).map(f32::from_bits).collect()
    }

    #[test]
    fn f64_exponentials_match_the_c_library() {
        let mut xs: Vec<f64> = floats(-0.0, -750.0, 499)
            .into_iter()
            .chain(floats(0.0, 709.0, 499))
            .map(f64::from)
            // Also values that are not f32s.
            .flat_map(|x| [x, x * (1.0 + 1e-12)])
            .collect();
        let want: Vec<f64> = xs.iter().map(|x| x.exp()).collect();
        let args = xs.clone();
        exp_f64(&mut xs);
        let mut worst = 0;
        for ((x, got), want) in args.iter().zip(&xs).zip(&want) {
            if *x < -708.39 {
                assert_eq!(*got, 0.0, "exp({x})");
            } else if want.is_finite() {
                worst = worst.max(ulps64(*got, *want));
            }
        }
        assert!(worst <= 2, "{worst} ulp");
        let mut special = [f64::NAN, f64::NEG_INFINITY, f64::INFINITY, 0.0, -0.0];
        exp_f64(&mut special);
        assert!(special[0].is_nan());
        assert_eq!(special[1..], [0.0, f64::INFINITY, 1.0, 1.0]);
    }

    #[test]
    fn f32_exponentials_match_the_c_library() {
        let mut xs: Vec<f32> = floats(-0.0, -100.0, 97)
            .into_iter()
            .chain(floats(0.0, 100.0, 97))
            .collect();
        let args = xs.clone();
        exp_f32(&mut xs);
        let mut worst = 0;
        for (x, got) in args.iter().zip(&xs) {
            if *x < -87.33 {
                assert_eq!(*got, 0.0, "exp({x})");
            } else if *x > 88.37 {
                assert_eq!(*got, f32::INFINITY, "exp({x})");
            } else {
                worst = worst.max(ulps32(*got, x.exp()));
            }
        }
        assert!(worst <= 1, "{worst} ulp");
        let mut special = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0];
        exp_f32(&mut special);
        assert!(special[0].is_nan());
        assert_eq!(special[1..], [0.0, f32::INFINITY, 1.0]);
    }

    #[test]
    fn a_requested_path_is_taken_only_where_the_cpu_has_it() {
        use Path::*;
        for (widest, requested, want) in [
            (Avx512, Some("avx2"), Avx2),
            (Avx512, Some("portable"), Portable),
            (Avx512, None, Avx512),
            (Avx2, Some("avx2"), Avx2),
            (Avx2, Some("avx512"), Avx2),
            (Portable, Some("avx2"), Portable),
            (Avx2, Some("fast"), Avx2),
        ] {
            assert_eq!(chosen(widest, requested), want, "{widest:?} {requested:?}");
        }
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let xs64: Vec<f64> = (0..1001).map(|i| -(i as f64) * 0.713 + 3.1).collect();
        let xs32: Vec<f32> = (0..1001).map(|i| i as f32 * 0.177 - 90.0).collect();
        let run64 = |p| {
            let mut v = xs64.clone();
            exp_f64_on(p, &mut v);
            v
        };
        let run32 = |p| {
            let mut v = xs32.clone();
            exp_f32_on(p, &mut v);
            v
        };
        let (want64, want32) = (run64(Path::Portable), run32(Path::Portable));
        for p in paths() {
            // Compared as bits (NaN-safe).
            let bits64 = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
            let bits32 = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits64(run64(p)), bits64(want64.clone()), "{p:?}");
            assert_eq!(bits32(run32(p)), bits32(want32.clone()), "{p:?}");
        }
    }
}
