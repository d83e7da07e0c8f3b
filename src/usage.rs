//! What a request served, for billing and the ledger: the one typed hand-off between the
//! handlers (and every task they spawn) and the gate.
//!
//! The gate opens a [`Meter`] for every authenticated request before its handler runs and keeps
//! the matching [`MeterWatch`]. Handlers take the `Meter` as an extractor argument, say which
//! teacher serves the request ([`Meter::serve`]), reserve the tokens the request may cost
//! ([`Meter::reserve`], 429 before any work) and record what they produced as they produce it
//! ([`Meter::record`]). Streaming producers, spawned engine work and the handler hold clones; the
//! meter closes when the last clone is dropped, on every exit path (done, error, client gone,
//! panic), and hands its [`Closed`] record — usage, outcome, reservation — to the watch. The
//! ledger layer reads exactly that record for the request's row and then settles the bill:
//! charge what was produced, or refund it all when the response was not delivered (the row
//! could not be committed). Nothing travels through untyped response extensions.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::auth::ClientCtx;
use crate::engine::Teacher;
use crate::error::ApiError;
use crate::limits::{Limiter, TokenReservation};

/// What one request served.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// The model that served the request, if any.
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub scored_tokens: u64,
    pub generated_tokens: u64,
    pub top_k: Option<u32>,
    pub judgments: u64,
    /// Weights digest of the model that served the request.
    pub weights_sha256: Option<String>,
}

impl Usage {
    /// Tokens this request costs against tpm and the daily quota: every token run through the
    /// teacher (scored tokens are a subset of the prompt) plus every token generated.
    pub fn billable_tokens(&self) -> u64 {
        self.prompt_tokens + self.generated_tokens
    }
}

/// How the work behind a response ended, when the response status alone cannot tell (a stream
/// is `200` from its first byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The producer finished normally.
    Completed,
    /// The producer failed after the response had started: the status and error code its
    /// error would have had.
    Failed { status: u16, code: Option<String> },
    /// The meter closed without either (a buffered response: its status says it all; or a
    /// producer that vanished, e.g. panicked).
    Unknown,
}

/// The final record of a request, handed to the gate when the last [`Meter`] clone drops.
pub struct Closed {
    pub usage: Usage,
    pub outcome: Outcome,
    /// The response holds a secret (a newly issued API key): its body must never be stored.
    pub sensitive: bool,
    /// The tokens held for the request; `None` when nothing was reserved. Dropped unsettled it
    /// charges what was produced (see [`TokenReservation`]).
    pub reservation: Option<TokenReservation>,
}

impl Closed {
    /// Charge what was produced (at most what was reserved: estimates are upper bounds, and a
    /// charge is never taken past the client's limits unchecked).
    pub async fn settle(&mut self) {
        if let Some(r) = self.reservation.take() {
            let (billable, reserved) = (self.usage.billable_tokens(), r.reserved());
            if billable > reserved {
                tracing::error!(
                    billable,
                    reserved,
                    "a request produced more than it reserved; charging the reservation"
                );
            }
            r.settle(billable.min(reserved)).await;
        }
    }

    /// The response was not delivered: charge nothing.
    pub async fn refund(&mut self) {
        if let Some(r) = self.reservation.take() {
            r.settle(0).await;
        }
    }
}

struct State {
    usage: Usage,
    outcome: Outcome,
    sensitive: bool,
    reservation: Option<TokenReservation>,
}

struct Inner {
    state: Mutex<State>,
    ctx: Option<ClientCtx>,
    limiter: Option<Arc<Limiter>>,
    closed: Mutex<Option<oneshot::Sender<Closed>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = std::mem::replace(
            &mut *self.state.lock(),
            State {
                usage: Usage::default(),
                outcome: Outcome::Unknown,
                sensitive: false,
                reservation: None,
            },
        );
        let mut closed = Closed {
            usage: state.usage,
            outcome: state.outcome,
            sensitive: state.sensitive,
            reservation: state.reservation,
        };
        if let Some(r) = closed.reservation.as_mut() {
            // If nobody receives this record, the reservation's Drop charges what was produced.
            r.set_produced(closed.usage.billable_tokens());
        }
        if let Some(tx) = self.closed.lock().take() {
            let _ = tx.send(closed);
        }
    }
}

/// The meter of one request. Cheap to clone; see the module docs.
#[derive(Clone)]
pub struct Meter(Arc<Inner>);

/// The gate's side of a [`Meter`]: resolves with the final record once every clone is gone.
pub struct MeterWatch {
    rx: oneshot::Receiver<Closed>,
    inner: Weak<Inner>,
}

impl Meter {
    /// A meter for `ctx`'s request; `limiter` takes its reservations.
    pub fn open(ctx: ClientCtx, limiter: Arc<Limiter>) -> (Meter, MeterWatch) {
        Self::build(Some(ctx), Some(limiter))
    }

    /// A meter that can record but not reserve (work outside any client's request).
    pub fn detached() -> (Meter, MeterWatch) {
        Self::build(None, None)
    }

    fn build(ctx: Option<ClientCtx>, limiter: Option<Arc<Limiter>>) -> (Meter, MeterWatch) {
        let (tx, rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                usage: Usage::default(),
                outcome: Outcome::Unknown,
                sensitive: false,
                reservation: None,
            }),
            ctx,
            limiter,
            closed: Mutex::new(Some(tx)),
        });
        let watch = MeterWatch {
            rx,
            inner: Arc::downgrade(&inner),
        };
        (Meter(inner), watch)
    }

    /// The request is served by `teacher`: its id and weights digest go into the row.
    pub fn serve(&self, teacher: &Teacher) {
        let mut s = self.0.state.lock();
        s.usage.model = Some(teacher.info.id.clone());
        s.usage.weights_sha256 = Some(teacher.info.weights_sha256.clone());
    }

    /// Reserves `tokens` against the client's tpm and daily quota (429 otherwise). Call it
    /// before any engine work with an upper bound of what the request can cost; what it does
    /// not produce is refunded when the request ends. A second call adds to the reservation.
    pub async fn reserve(&self, tokens: u64) -> Result<(), ApiError> {
        let (Some(ctx), Some(limiter)) = (&self.0.ctx, &self.0.limiter) else {
            return Ok(());
        };
        let reservation = limiter
            .reserve_tokens(ctx.client_id, &ctx.limits, tokens)
            .await?;
        let mut s = self.0.state.lock();
        match s.reservation.as_mut() {
            Some(held) => held.absorb(reservation),
            None => s.reservation = Some(reservation),
        }
        Ok(())
    }

    /// Tokens reserved so far.
    pub fn reserved(&self) -> u64 {
        self.0
            .state
            .lock()
            .reservation
            .as_ref()
            .map_or(0, |r| r.reserved())
    }

    /// Record what was produced (add to the counts as work completes, so that every exit path
    /// bills exactly what was served).
    pub fn record(&self, f: impl FnOnce(&mut Usage)) {
        f(&mut self.0.state.lock().usage);
    }

    pub fn usage(&self) -> Usage {
        self.0.state.lock().usage.clone()
    }

    /// The producer finished normally.
    pub fn complete(&self) {
        self.0.state.lock().outcome = Outcome::Completed;
    }

    /// The producer failed after the response started.
    pub fn fail(&self, err: &ApiError) {
        self.0.state.lock().outcome = Outcome::Failed {
            status: err.status().as_u16(),
            code: err.code().map(str::to_string),
        };
    }

    /// The response holds a secret: store its hash, never its body.
    pub fn sensitive(&self) {
        self.0.state.lock().sensitive = true;
    }
}

impl MeterWatch {
    /// The final record, once every clone of the meter is gone.
    pub async fn closed(self) -> Closed {
        match self.rx.await {
            Ok(c) => c,
            // Unreachable: `Inner::drop` always sends. Be safe anyway.
            Err(_) => Closed {
                usage: Usage::default(),
                outcome: Outcome::Unknown,
                sensitive: false,
                reservation: None,
            },
        }
    }

    /// The usage recorded so far, while the meter is still open.
    pub fn snapshot(&self) -> Option<Usage> {
        self.inner.upgrade().map(|i| i.state.lock().usage.clone())
    }

    /// Whether the meter is still open (some clone is alive).
    pub fn is_open(&self) -> bool {
        self.inner.strong_count() > 0
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Meter {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        // The gate opens one for every request it admits; a route outside the gate is a bug.
        parts.extensions.remove::<Meter>().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("no usage meter: route outside the gate"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closes_when_the_last_clone_drops_with_everything_recorded() {
        let (meter, watch) = Meter::detached();
        let producer = meter.clone();
        drop(meter);
        assert!(watch.is_open());
        let task = tokio::spawn(async move {
            producer.record(|u| u.generated_tokens += 5);
            producer.complete();
        });
        task.await.unwrap();
        let closed = watch.closed().await;
        assert_eq!(closed.usage.generated_tokens, 5);
        assert_eq!(closed.outcome, Outcome::Completed);
    }

    #[tokio::test]
    async fn a_panicking_producer_still_closes_the_meter() {
        let (meter, watch) = Meter::detached();
        let task = tokio::spawn(async move {
            meter.record(|u| u.prompt_tokens = 3);
            panic!("producer died");
        });
        assert!(task.await.is_err());
        let closed = watch.closed().await;
        assert_eq!(closed.usage.prompt_tokens, 3);
        assert_eq!(closed.outcome, Outcome::Unknown);
    }
}
