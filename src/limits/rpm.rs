//! Requests per minute: governor's keyed GCRA limiter.
//!
//! A governor limiter has one quota for all its keys, but clients have their own `rpm`. So there
//! is one keyed limiter per distinct `rpm` value, keyed by client id; clients that share a value
//! share a limiter (and a dashmap), but never state. A client whose `rpm` is edited moves to
//! another limiter and starts there with a full burst.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use uuid::Uuid;

use super::LimitClock;

type KeyedGcra<C> = RateLimiter<Uuid, DashMapStateStore<Uuid>, C, StateInformationMiddleware>;

/// The request budget after an admitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestsState {
    pub limit: u32,
    pub remaining: u32,
    /// Until the budget is full again (an upper bound, off by less than one request's worth).
    pub reset: Duration,
}

pub struct RpmLimiter<C: LimitClock> {
    clock: C,
    groups: DashMap<u32, Arc<KeyedGcra<C>>>,
}

/// `rpm` requests per minute with a burst of `rpm`. Zero is treated as one: the database and
/// the admin API refuse zero, so this only guards against a broken config.
fn quota(rpm: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(rpm).unwrap_or(NonZeroU32::MIN))
}

impl<C: LimitClock> RpmLimiter<C> {
    pub fn new(clock: C) -> Self {
        RpmLimiter {
            clock,
            groups: DashMap::new(),
        }
    }

    /// Counts one request, or says how long until one would pass.
    pub fn check(&self, client: Uuid, rpm: u32) -> Result<RequestsState, Duration> {
        // Check under the map's read guard so that `sweep` cannot drop the group in between.
        let group = match self.groups.get(&rpm) {
            Some(group) => group,
            None => self
                .groups
                .entry(rpm)
                .or_insert_with(|| {
                    Arc::new(
                        RateLimiter::dashmap_with_clock(quota(rpm), self.clock.clone())
                            .with_middleware(),
                    )
                })
                .downgrade(),
        };
        match group.check_key(&client) {
            Ok(snapshot) => {
                let q = snapshot.quota();
                let limit = q.burst_size().get();
                let remaining = snapshot.remaining_burst_capacity();
                Ok(RequestsState {
                    limit,
                    remaining,
                    reset: q.replenish_interval() * (limit - remaining.min(limit)),
                })
            }
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Drops every client whose state is the same as a fresh one.
    pub fn sweep(&self) {
        for group in self.groups.iter() {
            group.retain_recent();
            group.shrink_to_fit();
        }
        self.groups.retain(|_, group| !group.is_empty());
        self.groups.shrink_to_fit();
    }

    /// Clients with live state, over all groups.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_one_per_interval() {
        let clock = FakeRelativeClock::default();
        let l = RpmLimiter::new(clock.clone());
        let c = Uuid::new_v4();
        for i in 0..60 {
            let st = l.check(c, 60).unwrap();
            assert_eq!(st.remaining, 59 - i);
        }
        let wait = l.check(c, 60).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        assert!(l.check(c, 60).is_ok());
        assert!(
            l.check(Uuid::new_v4(), 60).is_ok(),
            "clients do not share state"
        );
    }

    #[test]
    fn idle_clients_are_evicted() {
        let clock = FakeRelativeClock::default();
        let l = RpmLimiter::new(clock.clone());
        for _ in 0..1000 {
            l.check(Uuid::new_v4(), 60).unwrap();
        }
        l.check(Uuid::new_v4(), 7).unwrap();
        assert_eq!(l.len(), 1001);
        clock.advance(Duration::from_millis(500));
        l.sweep();
        assert_eq!(l.len(), 1001, "not yet replenished");
        // governor keeps a key one interval past full (rpm 7: ~8.6 s + ~8.6 s).
        clock.advance(Duration::from_secs(19));
        l.sweep();
        assert_eq!(l.len(), 0);
        assert!(l.groups.is_empty());
    }

    proptest! {
        /// Over any window, a client gets at most burst + window / interval requests: for a
        /// window of one minute that is `rpm` + burst.
        #[test]
        fn never_more_than_limit_plus_burst(rpm in 1u32..300, gaps in prop::collection::vec(0u64..3_000, 1..400)) {
            let clock = FakeRelativeClock::default();
            let l = RpmLimiter::new(clock.clone());
            let c = Uuid::new_v4();
            let mut now = 0u64;
            let mut granted = Vec::new();
            for gap in gaps {
                clock.advance(Duration::from_millis(gap));
                now += gap * 1_000_000;
                if l.check(c, rpm).is_ok() {
                    granted.push(now);
                }
            }
            let interval_ns = 60 * S / rpm as u64; // governor rounds the interval down to whole ns
            for i in 0..granted.len() {
                for j in i..granted.len() {
                    let window = granted[j] - granted[i];
                    let n = (j - i + 1) as u64;
                    let bound = rpm as u64 + window / interval_ns;
                    prop_assert!(n <= bound, "{} requests in {} ns (bound {})", n, window, bound);
                    if window <= 60 * S {
                        prop_assert!(n <= 2 * rpm as u64);
                    }
                }
            }
        }

        /// After a refusal, the request passes once Retry-After (the wait rounded up to whole
        /// seconds) has elapsed, and not before the exact wait.
        #[test]
        fn retry_after_is_never_early(rpm in 1u32..300, gaps in prop::collection::vec(0u64..1_000, 1..300)) {
            let clock = FakeRelativeClock::default();
            let l = RpmLimiter::new(clock.clone());
            let c = Uuid::new_v4();
            for gap in gaps {
                clock.advance(Duration::from_millis(gap));
                if let Err(wait) = l.check(c, rpm) {
                    prop_assert!(wait > Duration::ZERO);
                    if wait > Duration::from_nanos(1) {
                        clock.advance(wait - Duration::from_nanos(1));
                        prop_assert!(l.check(c, rpm).is_err(), "passed before the wait was over");
                        clock.advance(Duration::from_nanos(1));
                    } else {
                        clock.advance(wait);
                    }
                    let retry_after = Duration::from_secs(wait.as_nanos().div_ceil(S as u128) as u64);
                    prop_assert!(retry_after >= wait);
                    prop_assert!(l.check(c, rpm).is_ok(), "refused after its wait");
                }
            }
        }
    }
}
