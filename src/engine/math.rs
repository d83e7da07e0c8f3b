//! Logprob math over one position's full-vocabulary logits. Pure functions, natural logs.
//!
//! Everything is accumulated in f64 so that a 49k-entry softmax loses nothing measurable; the
//! results are reported as f32-precision numbers by callers. The full-vocabulary passes (max,
//! exponentials, sums) run on [`super::simd`]'s vectorised loops.

use super::simd;

/// `f(i, s_i, exp(s_i))` with `s_i = arg(values[i])`, in order. The exponentials are computed a
/// block at a time on the stack (no per-vocabulary buffer), vectorised.
fn for_each_exp<T: Copy>(values: &[T], arg: impl Fn(T) -> f64, mut f: impl FnMut(usize, f64, f64)) {
    const BLOCK: usize = 512;
    let (mut args, mut exps) = ([0f64; BLOCK], [0f64; BLOCK]);
    for (b, chunk) in values.chunks(BLOCK).enumerate() {
        let n = chunk.len();
        for (a, &v) in args.iter_mut().zip(chunk) {
            *a = arg(v);
        }
        exps[..n].copy_from_slice(&args[..n]);
        simd::exp_f64(&mut exps[..n]);
        for i in 0..n {
            f(b * BLOCK + i, args[i], exps[i]);
        }
    }
}

/// `log_softmax(logits / temperature)` over the whole vocabulary.
pub fn log_softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let mut dist = Softmax::default();
    softmax(logits, temperature, false, &mut dist);
    dist.logprobs
}

/// [`log_softmax`] and what it is computed from: `exps[i] = exp(x_i / T - max)` (kept only when
/// asked for) and their sum, so `logprobs[i] = x_i / T - (max + ln sum)`.
#[derive(Default)]
struct Softmax {
    logprobs: Vec<f64>,
    exps: Vec<f64>,
    sum: f64,
}

thread_local! {
    /// Each thread's buffers for [`pick`]: the step functions of every decode step reuse them,
    /// where two fresh 400 KB buffers per step would fault their pages in anew each time.
    static PICK_BUFFERS: std::cell::RefCell<Softmax> = std::cell::RefCell::default();
}

/// Fills `out` (its buffers reused) with the softmax of `logits / temperature`.
fn softmax(logits: &[f32], temperature: f64, keep_exps: bool, out: &mut Softmax) {
    let inv_t = 1.0 / temperature;
    // The largest x / T is the largest x over T: dividing by T > 0 keeps the order.
    let max = simd::max_f32(logits) as f64 * inv_t;
    let n = logits.len();
    // Without `keep_exps`, the exponentials go into the buffer that then takes the logprobs.
    let exps = if keep_exps {
        &mut out.exps
    } else {
        out.exps.clear();
        &mut out.logprobs
    };
    exps.resize(n, 0.0);
    simd::shifted_exps(logits, inv_t, max, exps);
    out.sum = simd::sum_f64(exps);
    let lse = max + out.sum.ln();
    out.logprobs.resize(n, 0.0);
    for (lp, &x) in out.logprobs.iter_mut().zip(logits) {
        *lp = x as f64 * inv_t - lse;
    }
}

/// [`nucleus`] first looks for the nucleus among this many most likely tokens.
const NUCLEUS_FIRST_K: usize = 64;

/// Up to this `k`, [`top_k`] scans once instead of selecting over an index of the vocabulary.
const SMALL_K: usize = 64;

/// Indices of the `k` largest values, sorted by value descending, ties by lower index first
/// (deterministic across runs and thread counts).
pub fn top_k(logprobs: &[f64], k: usize) -> Vec<u32> {
    let k = k.min(logprobs.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= SMALL_K && k < logprobs.len() {
        let cmp = likelier_first(logprobs);
        return one_pass_top_k(logprobs, k, |a, b| cmp(&a, &b).is_lt());
    }
    likeliest(logprobs, 0..logprobs.len() as u32, k)
}

/// The `k` best indices of `values` (`0 < k <= len`) in the order `beats(a, b)` (a strict order
/// in which, of two equal values, the lower index comes first), by one pass that keeps the best
/// so far, sorted: most entries lose to the bar at once, a block of them with one vector
/// comparison.
fn one_pass_top_k<T: PartialOrd + Copy>(
    values: &[T],
    k: usize,
    beats: impl Fn(u32, u32) -> bool,
) -> Vec<u32> {
    let mut best: Vec<u32> = Vec::with_capacity(k + 1);
    for (b, block) in values.chunks(SKIP_BLOCK).enumerate() {
        if best.len() == k && below(block, values[best[k - 1] as usize]) {
            continue;
        }
        for i in (b * SKIP_BLOCK) as u32..(b * SKIP_BLOCK + block.len()) as u32 {
            if best.len() == k && !beats(i, best[k - 1]) {
                continue;
            }
            let at = best.partition_point(|&b| beats(b, i));
            best.insert(at, i);
            best.truncate(k);
        }
    }
    best
}

/// The `k` first of `ids` in [`likelier_first`]'s order (all of them when `k` is larger),
/// sorted: by a key computed once per id, so a comparison reads no logprob.
fn likeliest(logprobs: &[f64], ids: impl Iterator<Item = u32>, k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let mut keyed: Vec<(u64, u32)> = ids.map(|i| (descending(logprobs[i as usize]), i)).collect();
    if k < keyed.len() {
        keyed.select_nth_unstable(k - 1);
        keyed.truncate(k);
    }
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// A key whose ascending order is the descending order of `f64::total_cmp` (NaN with the sign
/// bit clear above +inf, as there).
fn descending(x: f64) -> u64 {
    let b = x.to_bits();
    // `total_cmp`'s ascending key: negative values' bits reversed, positive ones' above them.
    let ascending = if b >> 63 == 1 { !b } else { b | 1 << 63 };
    !ascending
}

/// Values a one-pass top-k checks at once against its bar.
const SKIP_BLOCK: usize = 16;

/// Whether every value is strictly below `bar` (false if any is NaN): then none of them can
/// enter a top-k whose last member, of a lower index, holds `bar`, in [`one_pass_top_k`]'s
/// orders. One branch-free pass, which vectorises.
fn below<T: PartialOrd + Copy>(block: &[T], bar: T) -> bool {
    block.iter().fold(true, |all, &v| all & (v < bar))
}

/// The order of [`top_k`] over indices of `logprobs`: larger values first, ties by lower index.
fn likelier_first(logprobs: &[f64]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy + '_ {
    |a, b| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    }
}

/// 1-based rank of `token`: one plus the number of tokens strictly more likely.
pub fn rank_of(logprobs: &[f64], token: u32) -> u32 {
    let lp = logprobs[token as usize];
    1 + logprobs.iter().filter(|&&x| x > lp).count() as u32
}

/// Shannon entropy (nats) of the distribution given by `logprobs`.
pub fn entropy(logprobs: &[f64]) -> f64 {
    -logprobs
        .iter()
        .filter(|x| x.is_finite())
        .map(|&lp| lp.exp() * lp)
        .sum::<f64>()
}

/// `log(1 - sum(exp(top)))`: the log of the probability mass outside the top-k, computed as a
/// log-sum-exp over the entries outside the top-k, which keeps full precision when the tail is
/// tiny. `None` when the top-k covers the whole vocabulary (the tail is empty: log 0).
pub fn tail_logmass(logprobs: &[f64], top: &[u32]) -> Option<f64> {
    if top.len() >= logprobs.len() {
        return None;
    }
    if top.is_empty() {
        return Some(0.0);
    }
    let mut in_top = vec![false; logprobs.len()];
    for &t in top {
        in_top[t as usize] = true;
    }
    let rest = logprobs
        .iter()
        .zip(&in_top)
        .filter(|(_, &inside)| !inside)
        .map(|(&lp, _)| lp);
    let max = rest.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return None;
    }
    Some(max + rest.map(|lp| (lp - max).exp()).sum::<f64>().ln())
}

/// Everything reported for one scored position.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionStats {
    pub token_logprob: f64,
    pub token_rank: u32,
    pub top_ids: Vec<u32>,
    pub top_logprobs: Vec<f64>,
    pub tail_logmass: Option<f64>,
    pub entropy: f64,
}

/// Stats for the position whose logits are `logits`, the actual next token being `target`.
///
/// The hot path of teacher forcing (one call per scored position over the full vocabulary), so
/// it makes three passes without allocating per-vocabulary buffers: max; normaliser, entropy
/// and rank together; the tail mass outside the top-k. It equals [`stats_from_logprobs`] of
/// [`log_softmax`] (a unit test holds them together).
pub fn score_position(logits: &[f32], target: u32, k: usize, temperature: f64) -> PositionStats {
    if k >= logits.len() / 4 {
        // Large k: the sort dominates anyway; take the simple route.
        return stats_from_logprobs(&log_softmax(logits, temperature), target, k);
    }
    let inv_t = 1.0 / temperature;
    let max = simd::max_f32(logits) as f64 * inv_t;
    let target_logit = logits[target as usize];
    let (mut z, mut weighted, mut better) = (0.0f64, 0.0f64, 0u32);
    let shifted = |x: f32| x as f64 * inv_t - max;
    for_each_exp(logits, shifted, |i, xs, e| {
        z += e;
        weighted += e * xs;
        better += u32::from(logits[i] > target_logit);
    });
    let log_z = z.ln();
    // log p_i = x_i / T - max - log Z; entropy = log Z - E[x/T - max].
    let lp = |x: f32| x as f64 * inv_t - max - log_z;
    let top_ids = top_k_logits(logits, k);
    let tail_logmass = if k == 0 {
        Some(0.0)
    } else {
        let mut in_top = vec![0u64; logits.len().div_ceil(64)];
        for &t in &top_ids {
            in_top[t as usize / 64] |= 1 << (t % 64);
        }
        let mut rest = 0.0f64;
        for_each_exp(logits, shifted, |i, _, e| {
            if in_top[i / 64] & (1 << (i % 64)) == 0 {
                rest += e;
            }
        });
        (rest > 0.0).then(|| rest.ln() - log_z)
    };
    PositionStats {
        token_logprob: lp(target_logit),
        token_rank: 1 + better,
        top_logprobs: top_ids.iter().map(|&i| lp(logits[i as usize])).collect(),
        top_ids,
        tail_logmass,
        entropy: log_z - weighted / z,
    }
}

/// The `k` largest logits' indices, descending, ties by lower index (same order as [`top_k`],
/// since dividing by a positive temperature keeps the order). One pass with a bounded buffer.
pub fn top_k_logits(logits: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    one_pass_top_k(logits, k, |a, b| {
        let (x, y) = (logits[a as usize], logits[b as usize]);
        x > y || (x == y && a < b)
    })
}

pub fn stats_from_logprobs(lp: &[f64], target: u32, k: usize) -> PositionStats {
    let top_ids = top_k(lp, k);
    let top_logprobs = top_ids.iter().map(|&i| lp[i as usize]).collect();
    PositionStats {
        token_logprob: lp[target as usize],
        token_rank: rank_of(lp, target),
        tail_logmass: tail_logmass(lp, &top_ids),
        entropy: entropy(lp),
        top_ids,
        top_logprobs,
    }
}

/// Smallest set of most likely tokens whose mass reaches `top_p` (nucleus), in descending order.
/// Returns the whole vocabulary order-free when `top_p >= 1`.
pub fn nucleus(logprobs: &[f64], top_p: f64) -> Vec<u32> {
    if top_p >= 1.0 {
        return (0..logprobs.len() as u32).collect();
    }
    // The nucleus is a prefix of the order of the whole vocabulary. Every attempt below sorts
    // a set that holds all tokens above some value (so its order is a prefix of the whole
    // order) and cuts it where the mass is reached; a peaked distribution's nucleus is a
    // handful of tokens, so the whole vocabulary is sorted only as the last resort.
    let mut first = top_k(logprobs, NUCLEUS_FIRST_K);
    let Some(&top) = first.first() else {
        return first;
    };
    if let Some(n) = reaching(logprobs, &first, top_p) {
        first.truncate(n);
        return first;
    }
    if let Some(within) = nucleus_by_value(logprobs, logprobs[top as usize], top_p) {
        return within;
    }
    // All of the order when rounding keeps its mass short of `top_p`.
    let mut all = top_k(logprobs, logprobs.len());
    all.truncate(reaching(logprobs, &all, top_p).unwrap_or(all.len()));
    all
}

/// How many tokens from the front of `order` first reach `top_p` of the mass, if they do.
fn reaching(logprobs: &[f64], order: &[u32], top_p: f64) -> Option<usize> {
    let mut mass = 0.0;
    let at = order.iter().position(|&id| {
        mass += logprobs[id as usize].exp();
        mass >= top_p
    })?;
    Some(at + 1)
}

/// Width (nats below the most likely token) of [`nucleus_by_value`]'s bands.
const NUCLEUS_BAND: f64 = 0.25;
/// Bands; everything further below the most likely token shares the last one.
const NUCLEUS_BANDS: usize = 128;

/// The nucleus found among the bands of logprob just below `top` (the largest) that hold
/// `top_p` of the mass: those tokens sorted like [`top_k`], then cut. A band is all the tokens
/// within a range of values, so the set is all tokens above a value and its order a prefix of
/// the whole order. `None` when the mass needs the last band, on a NaN, or when rounding keeps
/// the sorted set's mass short.
fn nucleus_by_value(logprobs: &[f64], top: f64, top_p: f64) -> Option<Vec<u32>> {
    let band = |lp: f64| (((top - lp) / NUCLEUS_BAND) as usize).min(NUCLEUS_BANDS - 1);
    let mut mass = [0f64; NUCLEUS_BANDS];
    if logprobs.iter().any(|lp| lp.is_nan()) {
        return None;
    }
    // The probabilities through the vector exponential (the bands only need to hold the mass,
    // within the margin below).
    for_each_exp(logprobs, |lp| lp, |_, lp, p| mass[band(lp)] += p);
    let mut total = 0.0;
    // A margin over `top_p`: these sums run in another order, and with other exponentials,
    // than the final cut's.
    let last = mass[..NUCLEUS_BANDS - 1].iter().position(|m| {
        total += m;
        total >= top_p + 1e-9
    })?;
    let within = (0..logprobs.len() as u32).filter(|&i| band(logprobs[i as usize]) <= last);
    let mut within = likeliest(logprobs, within, usize::MAX);
    within.truncate(reaching(logprobs, &within, top_p)?);
    Some(within)
}

/// Sample one token from `logprobs` restricted to `candidates`, with a uniform draw `u` in [0,1).
pub fn sample_from(logprobs: &[f64], candidates: &[u32], u: f64) -> u32 {
    // Each probability computed once, summed in candidate order both times.
    let probs: Vec<f64> = candidates
        .iter()
        .map(|&i| logprobs[i as usize].exp())
        .collect();
    candidates[sample_weights(&probs, probs.iter().sum(), u) as usize]
}

/// One generation step's choice: the token, its logprob and the `top_n` most likely tokens with
/// theirs, all from `log_softmax(logits / T)` (T = 1 under greedy decoding).
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// Picks the next token: the argmax when `temperature` is 0, else a sample within the `top_p`
/// nucleus, drawn with `draw()` (uniform in [0, 1); called only when sampling).
pub fn pick(
    logits: &[f32],
    temperature: f64,
    top_p: f64,
    top_n: usize,
    draw: impl FnOnce() -> f64,
) -> Pick {
    let greedy = temperature <= 0.0;
    // Sampling from the whole vocabulary draws in proportion to the exponentials.
    let whole = !greedy && top_p >= 1.0;
    PICK_BUFFERS.with_borrow_mut(|dist| {
        softmax(logits, if greedy { 1.0 } else { temperature }, whole, dist);
        let lp = &dist.logprobs;
        let token = if greedy {
            argmax(logits)
        } else if whole {
            sample_weights(&dist.exps, dist.sum, draw())
        } else {
            let candidates = nucleus(lp, top_p);
            sample_from(lp, &candidates, draw())
        };
        let top = top_k(lp, top_n)
            .into_iter()
            .map(|id| (id, lp[id as usize]))
            .collect();
        Pick {
            token,
            logprob: lp[token as usize],
            top,
        }
    })
}

/// The first index at which the running sum of `weights` (summing to `total`) passes
/// `u * total`, for a uniform `u` in [0, 1); never an index of weight 0 (the sum only passes
/// the target by adding a weight).
fn sample_weights(weights: &[f64], total: f64, u: f64) -> u32 {
    let target = u * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if acc > target {
            return i as u32;
        }
    }
    // `u * total` rounded up to the whole sum: the last token that can be drawn.
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0) as u32
}

/// Index of the largest value, lowest index on ties; NaN is never the largest (0 when every
/// value is NaN). The vectorised max, then the first place that holds it.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = simd::max_f32(logits);
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn log_softmax_sums_to_one_and_matches_definition() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let lp = log_softmax(&logits, 1.0);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (l, &x) in lp.iter().zip(&logits) {
            assert!(close(*l, x as f64 - z.ln(), 1e-12));
        }
        assert!(close(lp.iter().map(|x| x.exp()).sum(), 1.0, 1e-12));
    }

    #[test]
    fn temperature_divides_logits() {
        let logits = [1.0f32, 2.0, 4.0];
        let a = log_softmax(&logits, 2.0);
        let b = log_softmax(&[0.5, 1.0, 2.0], 1.0);
        for (x, y) in a.iter().zip(&b) {
            assert!(close(*x, *y, 1e-12));
        }
    }

    #[test]
    fn huge_logits_do_not_overflow() {
        let lp = log_softmax(&[1e30, 0.0], 1.0);
        assert_eq!(lp[0], 0.0);
        assert!(lp[1] < -1e29);
    }

    #[test]
    fn top_k_sorted_desc_with_deterministic_ties() {
        let lp = [-1.0, -0.5, -1.0, -3.0, -0.5];
        assert_eq!(top_k(&lp, 3), vec![1, 4, 0]);
        assert_eq!(top_k(&lp, 0), Vec::<u32>::new());
        assert_eq!(top_k(&lp, 10), vec![1, 4, 0, 2, 3]);
    }

    #[test]
    fn top_k_one_pass_agrees_with_the_full_order() {
        // Few distinct values (many ties), signed zeros and infinities.
        let lp: Vec<f64> = (0..5000u64)
            .map(|i| match (i * 2_654_435_761) % 23 {
                0 => f64::NEG_INFINITY,
                1 => -0.0,
                2 => 0.0,
                v => -(v as f64) / 4.0,
            })
            .collect();
        let full = top_k(&lp, lp.len());
        for k in [1, 2, 5, 20, SMALL_K] {
            assert_eq!(top_k(&lp, k), full[..k], "k = {k}");
        }
    }

    #[test]
    fn rank_is_one_based_and_counts_strictly_better() {
        let lp = [-1.0, -0.5, -1.0, -3.0];
        assert_eq!(rank_of(&lp, 1), 1);
        assert_eq!(rank_of(&lp, 0), 2);
        assert_eq!(rank_of(&lp, 2), 2);
        assert_eq!(rank_of(&lp, 3), 4);
    }

    #[test]
    fn tail_logmass_is_log_of_remaining_mass() {
        let lp = log_softmax(&[3.0, 2.0, 1.0, 0.0], 1.0);
        let top = top_k(&lp, 2);
        let expect = (1.0 - lp[0].exp() - lp[1].exp()).ln();
        assert!(close(tail_logmass(&lp, &top).unwrap(), expect, 1e-12));
        assert_eq!(tail_logmass(&lp, &[]), Some(0.0));
        assert_eq!(tail_logmass(&lp, &top_k(&lp, 4)), None);
    }

    #[test]
    fn entropy_of_uniform_is_log_n() {
        let lp = log_softmax(&[0.0; 8], 1.0);
        assert!(close(entropy(&lp), (8f64).ln(), 1e-12));
    }

    #[test]
    fn score_position_is_consistent() {
        let logits = [0.1f32, 2.0, -1.0, 0.5];
        let s = score_position(&logits, 3, 2, 1.0);
        assert_eq!(s.top_ids, vec![1, 3]);
        assert_eq!(s.token_rank, 2);
        assert!(close(s.token_logprob, s.top_logprobs[1], 0.0));
    }

    #[test]
    fn fast_path_equals_the_reference() {
        // Deterministic pseudo-random logits with ties and a spread like a real model's.
        let mut state = 12345u64;
        let logits: Vec<f32> = (0..5000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((state >> 33) % 2000) as f32 - 1000.0) / 97.0
            })
            .collect();
        for (target, k, t) in [
            (0u32, 20usize, 1.0),
            (4999, 5, 0.7),
            (123, 0, 2.0),
            (77, 1, 1.0),
        ] {
            let fast = score_position(&logits, target, k, t);
            let slow = stats_from_logprobs(&log_softmax(&logits, t), target, k);
            assert_eq!(fast.top_ids, slow.top_ids);
            assert_eq!(fast.token_rank, slow.token_rank);
            assert!(close(fast.token_logprob, slow.token_logprob, 1e-9));
            assert!(close(fast.entropy, slow.entropy, 1e-9));
            for (a, b) in fast.top_logprobs.iter().zip(&slow.top_logprobs) {
                assert!(close(*a, *b, 1e-9));
            }
            match (fast.tail_logmass, slow.tail_logmass) {
                (Some(a), Some(b)) => assert!(close(a, b, 1e-9), "{a} vs {b}"),
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn nucleus_equals_the_cut_of_the_whole_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (n, spread) in [(50usize, 1.0f32), (5000, 0.1), (5000, 3.0), (5000, 30.0)] {
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.gen::<f32>() * spread).round() / 4.0)
                .collect();
            let lp = log_softmax(&logits, 1.0);
            for top_p in [0.0, 0.3, 0.9, 0.999, 0.999_999_9] {
                // The nucleus as a prefix of the whole vocabulary's order.
                let order = top_k(&lp, n);
                let mut mass = 0.0;
                let cut = order
                    .iter()
                    .position(|&id| {
                        mass += lp[id as usize].exp();
                        mass >= top_p
                    })
                    .map_or(n, |at| at + 1);
                assert_eq!(nucleus(&lp, top_p), order[..cut], "{n} {spread} {top_p}");
            }
        }
        // A NaN (a broken model's logits) never reaches the mass: the whole order, as before.
        let lp = [-1.0, f64::NAN, -0.5, -2.0];
        assert_eq!(nucleus(&lp, 0.5), top_k(&lp, 4));
    }

    #[test]
    fn sampling_the_whole_vocabulary_follows_the_probabilities() {
        // Probabilities 0.1, 0, 0.2, 0.3, 0.4 at T = 1, and 0.2 / 0.8 of the two at T = 0.5.
        let logits = [
            0.1f32.ln(),
            f32::NEG_INFINITY,
            0.2f32.ln(),
            0.3f32.ln(),
            0.4f32.ln(),
        ];
        let n = 1000;
        let lp = log_softmax(&logits, 1.0);
        let mut counts = [0usize; 5];
        for i in 0..n {
            let u = (i as f64 + 0.5) / n as f64;
            let p = pick(&logits, 1.0, 1.0, 2, || u);
            assert_eq!(p.logprob, lp[p.token as usize]);
            assert_eq!(p.top, vec![(4, lp[4]), (3, lp[3])]);
            counts[p.token as usize] += 1;
        }
        assert_eq!(counts, [100, 0, 200, 300, 400]);
        // The draw at the very top never lands on a token of probability 0.
        assert_eq!(sample_weights(&[0.5, 0.5, 0.0], 1.0, 1.0), 1);
        let two = [0.0f32, 2.0f32.ln()];
        let at = |u: f64| pick(&two, 0.5, 1.0, 0, || u).token;
        assert_eq!((at(0.19), at(0.21)), (0, 1));
        // Greedy takes the argmax without drawing.
        let greedy = pick(&logits, 0.0, 1.0, 0, || {
            unreachable!("no draw under greedy")
        });
        assert_eq!(greedy.token, 4);
    }

    #[test]
    fn the_sort_key_orders_like_likelier_first() {
        let values = [
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            1.5,
            -1.5,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
            f64::MAX,
            f64::MIN,
            1.5,
        ];
        let mut by_cmp: Vec<u32> = (0..values.len() as u32).collect();
        by_cmp.sort_by(likelier_first(&values));
        assert_eq!(
            likeliest(&values, 0..values.len() as u32, usize::MAX),
            by_cmp
        );
        assert_eq!(likeliest(&values, 0..values.len() as u32, 4), by_cmp[..4]);
        assert_eq!(
            likeliest(&values, 0..values.len() as u32, 0),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn nucleus_and_sampling() {
        let lp = log_softmax(&[2.0, 1.0, 0.0, -5.0], 1.0);
        let n = nucleus(&lp, 0.7);
        assert_eq!(n, vec![0, 1]);
        assert_eq!(sample_from(&lp, &n, 0.0), 0);
        assert_eq!(sample_from(&lp, &n, 0.999), 1);
        assert_eq!(argmax(&[0.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 2.0, f32::NAN, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
