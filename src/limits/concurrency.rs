//! Requests in flight per client. A permit is held until the response body is finished (so a
//! streamed generation counts until its last event), and released on drop.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use uuid::Uuid;

#[derive(Default)]
pub struct ConcurrencyLimiter {
    in_flight: DashMap<Uuid, Arc<AtomicU32>>,
}

/// One request in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    counter: Arc<AtomicU32>,
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConcurrencyLimiter {
    /// A slot if fewer than `max` requests of `client` are in flight; `None` otherwise.
    pub fn try_acquire(&self, client: Uuid, max: u32) -> Option<ConcurrencyPermit> {
        let counter = self.in_flight.entry(client).or_default().clone();
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConcurrencyPermit { counter })
    }

    pub fn in_flight(&self, client: Uuid) -> u32 {
        self.in_flight
            .get(&client)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Drops counters of clients with nothing in flight. A counter some request still holds a
    /// handle to is kept even at zero, so no permit ever decrements a forgotten counter.
    pub fn sweep(&self) {
        self.in_flight
            .retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
        self.in_flight.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_releases() {
        let l = ConcurrencyLimiter::default();
        let c = Uuid::new_v4();
        let a = l.try_acquire(c, 2).unwrap();
        let _b = l.try_acquire(c, 2).unwrap();
        assert!(l.try_acquire(c, 2).is_none());
        assert!(l.try_acquire(Uuid::new_v4(), 2).is_some());
        drop(a);
        assert!(l.try_acquire(c, 2).is_some());
    }

    #[test]
    fn sweep_keeps_busy_clients() {
        let l = ConcurrencyLimiter::default();
        let busy = Uuid::new_v4();
        let permit = l.try_acquire(busy, 1).unwrap();
        drop(l.try_acquire(Uuid::new_v4(), 1).unwrap());
        l.sweep();
        assert_eq!(l.len(), 1);
        drop(permit);
        l.sweep();
        assert!(l.is_empty());
    }
}
