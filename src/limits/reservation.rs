//! [`TokenReservation`]: tokens held for a request between `reserve_tokens` and `settle`.

use std::sync::{Arc, Weak};

use chrono::NaiveDate;
use uuid::Uuid;

use super::{LimitClock, Limiter, MonoClock};

/// Tokens held for a request until it settles. Dropping it unsettled refunds everything.
#[must_use = "settle the reservation with the tokens actually used; dropping it refunds them all"]
pub struct TokenReservation<C: LimitClock = MonoClock> {
    pub(super) limiter: Weak<Limiter<C>>,
    pub(super) client_id: Uuid,
    pub(super) tpm: u32,
    pub(super) day: NaiveDate,
    pub(super) reserved: u64,
    /// Whether `reserved` was added to the persisted daily quota.
    pub(super) in_quota: bool,
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

    /// Settles at `actual` tokens: refunds the unused part of the reservation to the tpm
    /// bucket and the daily quota, or charges an overrun. Database errors are logged, not
    /// returned: the work is done by now, and the reservation already counted it.
    pub async fn settle(mut self, actual: u64) {
        let (reserved, in_quota) = (self.reserved, self.in_quota);
        self.reserved = 0; // disarm the refund in Drop
        let Some(limiter) = self.limiter.upgrade() else {
            return;
        };
        if actual < reserved {
            limiter.give_back(self.client_id, self.tpm, reserved - actual);
        } else if actual > reserved {
            limiter.take_extra(self.client_id, self.tpm, actual - reserved);
        }
        let delta = if in_quota {
            actual as i64 - reserved as i64
        } else {
            actual as i64
        };
        if let (Some(quota), true) = (&limiter.quota, delta != 0) {
            if let Err(err) = quota.adjust(self.client_id, self.day, delta).await {
                tracing::error!(client_id = %self.client_id, error = ?err, "could not settle daily tokens");
            }
        }
    }

    /// Wraps the reservation for a response extension; the gate settles it with the
    /// response's `Usage::billable_tokens()` (or refunds it if there is no `Usage`).
    pub fn defer(self) -> DeferredSettlement<C> {
        DeferredSettlement(Arc::new(parking_lot::Mutex::new(Some(self))))
    }
}

impl<C: LimitClock> Drop for TokenReservation<C> {
    fn drop(&mut self) {
        if self.reserved == 0 {
            return;
        }
        let Some(limiter) = self.limiter.upgrade() else {
            return;
        };
        limiter.give_back(self.client_id, self.tpm, self.reserved);
        if self.in_quota {
            let (client_id, day, tokens) = (self.client_id, self.day, self.reserved as i64);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Some(quota) = &limiter.quota {
                        if let Err(err) = quota.adjust(client_id, day, -tokens).await {
                            tracing::warn!(%client_id, error = ?err, "could not refund daily tokens");
                        }
                    }
                });
            }
        }
    }
}

/// A reservation handed to the gate through response extensions (see the module docs).
pub struct DeferredSettlement<C: LimitClock = MonoClock>(
    Arc<parking_lot::Mutex<Option<TokenReservation<C>>>>,
);

impl<C: LimitClock> Clone for DeferredSettlement<C> {
    fn clone(&self) -> Self {
        DeferredSettlement(self.0.clone())
    }
}

impl<C: LimitClock> DeferredSettlement<C> {
    pub fn take(&self) -> Option<TokenReservation<C>> {
        self.0.lock().take()
    }
}
