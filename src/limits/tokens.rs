//! Tokens per minute: a token bucket with reserve-then-settle.
//!
//! The bucket holds up to `tpm` tokens (the burst) and refills at `tpm` per minute. A request
//! takes its expected cost up front; when it ends, the unused part goes back (or an overrun is
//! taken as debt, which later requests wait out). Arithmetic is exact: the level is kept in
//! "token-nanoseconds per minute" so that refill needs no division and never drifts.

use std::time::Duration;

use dashmap::DashMap;
use uuid::Uuid;

const WINDOW_NS: i128 = 60_000_000_000;

/// Why a take was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDenial {
    /// The cost alone is over the burst (`tpm`): no amount of waiting admits it.
    TooLarge { cost: u64, burst: u64 },
    /// The bucket holds enough again after this long (exactly: not a nanosecond earlier).
    Wait(Duration),
}

#[derive(Clone, Debug)]
pub struct TokenBucket {
    tpm: u64,
    /// Tokens available, times `WINDOW_NS`. Negative while in debt.
    level: i128,
    /// Clock reading (ns) that `level` is current at.
    at: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(tpm: u64, now_ns: u64) -> Self {
        TokenBucket {
            tpm,
            level: tpm as i128 * WINDOW_NS,
            at: now_ns,
        }
    }

    pub fn tpm(&self) -> u64 {
        self.tpm
    }

    fn capacity(&self) -> i128 {
        self.tpm as i128 * WINDOW_NS
    }

    fn level_at(&self, now_ns: u64) -> i128 {
        let elapsed = now_ns.saturating_sub(self.at) as i128;
        (self.level + elapsed * self.tpm as i128).min(self.capacity())
    }

    fn refill(&mut self, now_ns: u64) {
        if now_ns > self.at {
            self.level = self.level_at(now_ns);
            self.at = now_ns;
        }
    }

    /// Changes the rate (a client's `tpm` was edited); tokens above the new burst are dropped.
    pub fn set_tpm(&mut self, tpm: u64, now_ns: u64) {
        self.refill(now_ns);
        self.tpm = tpm;
        self.level = self.level.min(self.capacity());
    }

    pub fn try_take(&mut self, cost: u64, now_ns: u64) -> Result<(), TokenDenial> {
        if cost > self.tpm {
            return Err(TokenDenial::TooLarge {
                cost,
                burst: self.tpm,
            });
        }
        self.refill(now_ns);
        let need = cost as i128 * WINDOW_NS;
        if self.level >= need {
            self.level -= need;
            return Ok(());
        }
        // tpm > 0 here: cost <= tpm and level < need imply need > 0.
        let missing = need - self.level;
        let rate = self.tpm as i128;
        let wait_ns = (missing + rate - 1) / rate;
        Err(TokenDenial::Wait(Duration::from_nanos(
            u64::try_from(wait_ns).unwrap_or(u64::MAX),
        )))
    }

    /// Takes `cost` even if that leaves the bucket in debt (an overrun past the reservation).
    pub fn take_unchecked(&mut self, cost: u64, now_ns: u64) {
        self.refill(now_ns);
        self.level -= cost as i128 * WINDOW_NS;
    }

    /// Returns unused tokens; never above the burst.
    pub fn give_back(&mut self, tokens: u64, now_ns: u64) {
        self.refill(now_ns);
        self.level = (self.level + tokens as i128 * WINDOW_NS).min(self.capacity());
    }

    /// Whole tokens available now.
    pub fn remaining(&self, now_ns: u64) -> u64 {
        (self.level_at(now_ns).max(0) / WINDOW_NS) as u64
    }

    /// Until the bucket is full again.
    pub fn time_to_full(&self, now_ns: u64) -> Duration {
        if self.tpm == 0 {
            return Duration::ZERO;
        }
        let missing = self.capacity() - self.level_at(now_ns);
        let rate = self.tpm as i128;
        Duration::from_nanos(u64::try_from((missing + rate - 1) / rate).unwrap_or(u64::MAX))
    }

    pub fn is_full(&self, now_ns: u64) -> bool {
        self.level_at(now_ns) >= self.capacity()
    }
}

/// One bucket per client. A full bucket is indistinguishable from a new one, so
/// [`TokenLimiter::sweep`] drops those and the map only holds recently active clients.
#[derive(Default)]
pub struct TokenLimiter {
    buckets: DashMap<Uuid, TokenBucket>,
}

impl TokenLimiter {
    pub fn with_bucket<R>(
        &self,
        client: Uuid,
        tpm: u32,
        now_ns: u64,
        f: impl FnOnce(&mut TokenBucket) -> R,
    ) -> R {
        let mut bucket = self
            .buckets
            .entry(client)
            .or_insert_with(|| TokenBucket::new(tpm as u64, now_ns));
        if bucket.tpm() != tpm as u64 {
            bucket.set_tpm(tpm as u64, now_ns);
        }
        f(&mut bucket)
    }

    /// (remaining, time to full) without creating state for an unseen client.
    pub fn peek(&self, client: Uuid, tpm: u32, now_ns: u64) -> (u64, Duration) {
        match self.buckets.get(&client) {
            Some(b) if b.tpm() == tpm as u64 => (b.remaining(now_ns), b.time_to_full(now_ns)),
            Some(b) => {
                let mut b = b.clone();
                b.set_tpm(tpm as u64, now_ns);
                (b.remaining(now_ns), b.time_to_full(now_ns))
            }
            None => (tpm as u64, Duration::ZERO),
        }
    }

    pub fn sweep(&self, now_ns: u64) {
        self.buckets.retain(|_, b| !b.is_full(now_ns));
        self.buckets.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn reserve_then_refund() {
        let mut b = TokenBucket::new(1000, 0);
        b.try_take(800, 0).unwrap();
        assert_eq!(b.remaining(0), 200);
        b.give_back(700, 0);
        assert_eq!(b.remaining(0), 900);
        b.give_back(10_000, 0);
        assert_eq!(b.remaining(0), 1000, "refunds never exceed the burst");
    }

    #[test]
    fn too_large_is_final() {
        let mut b = TokenBucket::new(100, 0);
        assert_eq!(
            b.try_take(101, 0),
            Err(TokenDenial::TooLarge {
                cost: 101,
                burst: 100
            })
        );
        assert_eq!(b.remaining(0), 100, "a refused take costs nothing");
    }

    #[test]
    fn wait_is_exact() {
        let mut b = TokenBucket::new(60, 0); // 1 token per second
        b.try_take(60, 0).unwrap();
        assert_eq!(
            b.try_take(2, 0),
            Err(TokenDenial::Wait(Duration::from_secs(2)))
        );
        assert!(b.try_take(2, 2 * S - 1).is_err());
        assert!(b.try_take(2, 2 * S).is_ok());
        assert_eq!(b.time_to_full(2 * S), Duration::from_secs(60));
    }

    #[test]
    fn debt_is_waited_out() {
        let mut b = TokenBucket::new(60, 0);
        b.try_take(60, 0).unwrap();
        b.take_unchecked(30, 0); // overran its reservation by 30
        assert_eq!(b.remaining(29 * S), 0);
        assert_eq!(
            b.try_take(1, 0),
            Err(TokenDenial::Wait(Duration::from_secs(31)))
        );
    }

    #[test]
    fn sweep_drops_only_full_buckets() {
        let l = TokenLimiter::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        l.with_bucket(a, 60, 0, |bk| bk.try_take(1, 0)).unwrap();
        l.with_bucket(b, 60, 0, |bk| bk.try_take(30, 0)).unwrap();
        l.sweep(S);
        assert_eq!(l.len(), 1, "a is full again after 1s, b is not");
        l.sweep(30 * S);
        assert!(l.is_empty());
    }

    /// (ms since previous op, cost)
    fn ops() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..5_000, 1u64..400), 1..200)
    }

    proptest! {
        /// Over any window [t0, t1], the tokens a client gets are at most burst + rate * (t1 - t0).
        #[test]
        fn never_more_than_rate_plus_burst(tpm in 1u64..2_000, ops in ops()) {
            let mut b = TokenBucket::new(tpm, 0);
            let mut now = 0u64;
            let mut granted: Vec<(u64, u64)> = Vec::new();
            for (gap_ms, cost) in ops {
                now += gap_ms * 1_000_000;
                if b.try_take(cost, now).is_ok() {
                    granted.push((now, cost));
                }
            }
            for i in 0..granted.len() {
                let mut sum = 0u128;
                for j in i..granted.len() {
                    sum += granted[j].1 as u128;
                    let window_ns = (granted[j].0 - granted[i].0) as u128;
                    let bound = tpm as u128 + window_ns * tpm as u128 / WINDOW_NS as u128;
                    prop_assert!(sum <= bound, "{} tokens in {} ns, bound {}", sum, window_ns, bound);
                }
            }
        }

        /// A refused take passes exactly when its wait is over (so a Retry-After that rounds the
        /// wait up is never early), and not a nanosecond before.
        #[test]
        fn wait_is_when_it_passes(tpm in 1u64..2_000, ops in ops(), cost in 1u64..2_000) {
            let mut b = TokenBucket::new(tpm, 0);
            let mut now = 0u64;
            for (gap_ms, c) in ops {
                now += gap_ms * 1_000_000;
                let _ = b.try_take(c, now);
            }
            match b.clone().try_take(cost, now) {
                Ok(()) => {}
                Err(TokenDenial::TooLarge { .. }) => prop_assert!(cost > tpm),
                Err(TokenDenial::Wait(wait)) => {
                    let wait = wait.as_nanos() as u64;
                    prop_assert!(wait > 0);
                    prop_assert!(b.clone().try_take(cost, now + wait - 1).is_err());
                    let retry_after_s = wait.div_ceil(S);
                    prop_assert!(b.clone().try_take(cost, now + wait).is_ok());
                    prop_assert!(b.clone().try_take(cost, now + retry_after_s * S).is_ok());
                }
            }
        }

        /// Net of refunds, a client still never gets more than burst + rate * elapsed since
        /// the start.
        #[test]
        fn refunds_do_not_mint_tokens(tpm in 1u64..2_000, ops in prop::collection::vec((0u64..5_000, 1u64..400, 0u64..400), 1..200)) {
            let mut b = TokenBucket::new(tpm, 0);
            let mut now = 0u64;
            let mut net: i128 = 0;
            for (gap_ms, cost, used) in ops {
                now += gap_ms * 1_000_000;
                if b.try_take(cost, now).is_ok() {
                    let used = used.min(cost);
                    b.give_back(cost - used, now);
                    net += used as i128;
                }
                let bound = tpm as i128 + now as i128 * tpm as i128 / WINDOW_NS;
                prop_assert!(net <= bound);
            }
        }
    }
}
