//! [`TokenReservation`]: tokens held for a request between `reserve_tokens` and `settle`.

use std::sync::Weak;

use chrono::NaiveDate;
use uuid::Uuid;

use super::{LimitClock, Limiter, MonoClock};

/// Tokens held for a request until it settles. Dropped unsettled, it charges what was produced
/// ([`TokenReservation::set_produced`], 0 unless set) and refunds the rest: the safe default is
/// that a client pays for what it was served on every exit path, and for nothing more.
#[must_use = "settle the reservation with the tokens actually used"]
pub struct TokenReservation<C: LimitClock = MonoClock> {
    pub(super) limiter: Weak<Limiter<C>>,
    pub(super) client_id: Uuid,
    pub(super) tpm: u32,
    pub(super) day: NaiveDate,
    pub(super) reserved: u64,
    /// Whether `reserved` was added to the persisted daily quota.
    pub(super) in_quota: bool,
    /// What an unsettled drop charges (at most `reserved`).
    pub(super) produced: u64,
}

impl<C: LimitClock> std::fmt::Debug for TokenReservation<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReservation")
            .field("client_id", &self.client_id)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl<C: LimitClock> TokenReservation<C> {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// What dropping the reservation unsettled charges.
    pub fn set_produced(&mut self, tokens: u64) {
        self.produced = tokens.min(self.reserved);
    }

    /// Takes `other` (a further reservation of the same client and day) into this one.
    pub fn absorb(&mut self, mut other: TokenReservation<C>) {
        if other.client_id != self.client_id
            || other.day != self.day
            || other.in_quota != self.in_quota
        {
            // Different books: keep them apart by settling the other at what it produced.
            tracing::error!("absorbing a reservation of another client or day");
            return;
        }
        self.reserved += other.reserved;
        self.produced += other.produced;
        other.reserved = 0; // disarm its Drop
    }

    /// Settles at `actual` tokens: refunds the unused part of the reservation to the tpm
    /// bucket and the daily quota. Never charges more than was reserved (reservations are
    /// upper bounds; an overrun is a bug, logged, and not taken past the client's limits).
    /// Database errors are logged, not returned: the work is done by now, and the reservation
    /// already counted it.
    pub async fn settle(mut self, actual: u64) {
        let (reserved, in_quota) = (self.reserved, self.in_quota);
        self.reserved = 0; // disarm Drop
        if actual > reserved {
            tracing::error!(actual, reserved, client_id = %self.client_id, "settling more than was reserved; charging the reservation only");
        }
        let actual = actual.min(reserved);
        let Some(limiter) = self.limiter.upgrade() else {
            return;
        };
        if actual < reserved {
            limiter.give_back(self.client_id, self.tpm, reserved - actual);
        }
        let delta = actual as i64 - reserved as i64;
        if let (Some(quota), true, true) = (&limiter.quota, in_quota, delta != 0) {
            quota.adjust_durably(self.client_id, self.day, delta).await;
        }
    }
}

impl<C: LimitClock> Drop for TokenReservation<C> {
    fn drop(&mut self) {
        let unused = self.reserved - self.produced.min(self.reserved);
        if unused == 0 {
            return;
        }
        let Some(limiter) = self.limiter.upgrade() else {
            return;
        };
        limiter.give_back(self.client_id, self.tpm, unused);
        if self.in_quota {
            let (client_id, day, tokens) = (self.client_id, self.day, unused as i64);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Some(quota) = &limiter.quota {
                        quota.adjust_durably(client_id, day, -tokens).await;
                    }
                });
            }
        }
    }
}
