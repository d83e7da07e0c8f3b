//! Per-client limits: requests per minute, tokens per minute, requests in flight, and a daily
//! token quota persisted in Postgres.
//!
//! # What the gate does (`http::gate`)
//! For every teacher request, after authentication: [`Limiter::admit`] counts the request
//! against `rpm` and takes a `max_concurrent` slot (429 `rate_limit_exceeded` with
//! `Retry-After` otherwise). The slot is held until the response body ends. After the
//! handler, the gate writes the rate-limit headers on the response, whatever its status.
//!
//! # Token limits: reserve, run, settle
//! Token limits (`tpm` and `daily_tokens`) need the cost of the request, which only the
//! handler knows, and must be checked *before* the model runs. Handlers reserve through the
//! request's [`crate::usage::Meter`] (`meter.reserve(upper_bound).await?`: 429 before any
//! work) and record what they produce; the gate settles when the request ends.
//!
//! - [`Limiter::reserve_tokens`] takes `n` from the client's tpm bucket and adds `n` to its
//!   row for today in `client_daily_usage`. Errors: 429 `rate_limit_exceeded` with
//!   `Retry-After` (bucket short), 429 `rate_limit_exceeded` without `Retry-After` when `n`
//!   alone is over the client's tpm burst (waiting cannot help), 429 `insufficient_quota`
//!   (today's quota spent; `Retry-After` = next UTC midnight). `n = 0` never fails.
//! - [`TokenReservation::settle`]`(actual)` refunds `reserved - actual` to both; it never
//!   charges past the reservation. Dropped unsettled, a reservation charges what was produced
//!   ([`TokenReservation::set_produced`]) and refunds the rest.
//!
//! All state here is keyed by client and evicted when idle ([`Limiter::sweep`], run every
//! minute by [`Limiter::spawn_sweeper`]): a client with no state left is exactly a client
//! whose budget is full, so eviction never makes anyone's limit more lenient.

pub mod concurrency;
pub mod headers;
pub mod quota;
mod reservation;
pub mod rpm;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::Clock;
use governor::nanos::Nanos;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::DefaultLimits;
use crate::error::ApiError;
use concurrency::{ConcurrencyLimiter, ConcurrencyPermit};
use headers::{DailyState, RateState};
use quota::DailyQuota;
use rpm::{RequestsState, RpmLimiter};
use tokens::{TokenDenial, TokenLimiter};

pub use reservation::TokenReservation;

/// A client's effective limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Limits {
    /// Requests per minute (also the burst).
    pub rpm: u32,
    /// Tokens per minute (also the burst: the most one request may cost).
    pub tpm: u32,
    /// Requests in flight at once.
    pub max_concurrent: u32,
    /// Tokens per UTC day.
    pub daily_tokens: i64,
}

impl From<&DefaultLimits> for Limits {
    fn from(d: &DefaultLimits) -> Self {
        Limits {
            rpm: d.rpm,
            tpm: d.tpm,
            max_concurrent: d.max_concurrent,
            daily_tokens: d.daily_tokens,
        }
    }
}

/// The limiters' clock: nanoseconds on a monotonic clock. Tests use governor's
/// `FakeRelativeClock` to move time by hand.
pub trait LimitClock: Clock<Instant = Nanos> + Clone + Send + Sync + 'static {}
impl<T: Clock<Instant = Nanos> + Clone + Send + Sync + 'static> LimitClock for T {}

/// Monotonic time since the limiter was built.
#[derive(Clone, Debug)]
pub struct MonoClock {
    origin: std::time::Instant,
}

impl Default for MonoClock {
    fn default() -> Self {
        MonoClock {
            origin: std::time::Instant::now(),
        }
    }
}

impl Clock for MonoClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

pub struct Limiter<C: LimitClock = MonoClock> {
    clock: C,
    rpm: RpmLimiter<C>,
    tokens: TokenLimiter,
    concurrency: ConcurrencyLimiter,
    /// `None` only in unit tests without a database.
    quota: Option<DailyQuota>,
}

/// An admitted request: its rpm standing and its concurrency slot (freed on drop).
#[derive(Debug)]
pub struct Admission {
    pub requests: RequestsState,
    pub permit: ConcurrencyPermit,
}

/// How many clients each limiter holds state for (to check eviction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedClients {
    pub rpm: usize,
    pub tokens: usize,
    pub concurrency: usize,
}

fn too_many(message: String, state: &RateState, retry_after: Option<Duration>) -> ApiError {
    let mut h = HeaderMap::new();
    headers::write(&mut h, state, retry_after);
    ApiError::TooManyRequests {
        message,
        kind: "rate_limit_exceeded",
        headers: Box::new(h),
    }
}

impl Limiter<MonoClock> {
    pub fn new(db: sqlx::PgPool) -> Self {
        Self::with_clock(Some(db), MonoClock::default())
    }
}

impl<C: LimitClock> Limiter<C> {
    pub fn with_clock(db: Option<sqlx::PgPool>, clock: C) -> Self {
        Limiter {
            rpm: RpmLimiter::new(clock.clone()),
            clock,
            tokens: TokenLimiter::default(),
            concurrency: ConcurrencyLimiter::default(),
            quota: db.map(DailyQuota::new),
        }
    }

    fn now_ns(&self) -> u64 {
        self.clock.now().as_u64()
    }

    /// Counts the request against `rpm`, then takes a concurrency slot. A request refused for
    /// concurrency still counts as a request.
    pub fn admit(&self, client: Uuid, limits: &Limits) -> Result<Admission, ApiError> {
        let l = limits;
        let requests = match self.rpm.check(client, l.rpm) {
            Ok(requests) => requests,
            Err(wait) => {
                let state = self.rate_state(
                    client,
                    limits,
                    &RequestsState {
                        limit: l.rpm,
                        remaining: 0,
                        reset: wait,
                    },
                );
                return Err(too_many(
                    format!(
                        "Rate limit reached for requests per minute (limit {}); retry in {}s",
                        l.rpm,
                        headers::ceil_secs(wait).max(1)
                    ),
                    &state,
                    Some(wait),
                ));
            }
        };
        match self.concurrency.try_acquire(client, l.max_concurrent) {
            Some(permit) => Ok(Admission { requests, permit }),
            None => Err(too_many(
                format!(
                    "Too many requests in flight (limit {}); retry when one finishes",
                    l.max_concurrent
                ),
                &self.rate_state(client, limits, &requests),
                // A slot frees when some request ends: unknown, so suggest a short pause.
                Some(Duration::from_secs(1)),
            )),
        }
    }

    /// The client's standing, for the response headers.
    pub fn rate_state(&self, client: Uuid, limits: &Limits, requests: &RequestsState) -> RateState {
        let (tokens_remaining, tokens_reset) = self.tokens.peek(client, limits.tpm, self.now_ns());
        RateState {
            limits: limits.clone(),
            requests_remaining: requests.remaining,
            requests_reset: requests.reset,
            tokens_remaining,
            tokens_reset,
            daily: None,
        }
    }

    /// Writes the rate-limit headers of an admitted request onto its response.
    pub fn write_headers(
        &self,
        client: Uuid,
        limits: &Limits,
        admission: &Admission,
        out: &mut HeaderMap,
    ) {
        headers::write(
            out,
            &self.rate_state(client, limits, &admission.requests),
            None,
        );
    }

    /// Reserves `n` tokens against tpm and today's quota. See the module docs.
    pub async fn reserve_tokens(
        self: &Arc<Self>,
        client: Uuid,
        limits: &Limits,
        n: u64,
    ) -> Result<TokenReservation<C>, ApiError> {
        let day = quota::today();
        let mut reservation = TokenReservation {
            limiter: Arc::downgrade(self),
            client_id: client,
            tpm: limits.tpm,
            day,
            reserved: 0,
            in_quota: false,
            produced: 0,
        };
        if n == 0 {
            return Ok(reservation);
        }
        let now = self.now_ns();
        let taken = self
            .tokens
            .with_bucket(client, limits.tpm, now, |b| b.try_take(n, now));
        if let Err(denial) = taken {
            let none = RequestsState {
                limit: limits.rpm,
                remaining: 0,
                reset: Duration::ZERO,
            };
            let mut state = self.rate_state(client, limits, &none);
            state.requests_remaining = limits.rpm; // unknown here; the gate overwrites it
            return Err(match denial {
                TokenDenial::TooLarge { cost, burst } => too_many(
                    format!(
                        "This request needs {cost} tokens, more than this client's limit of {burst} tokens per minute; it can never be admitted: make it smaller (fewer tokens or a lower max_tokens)"
                    ),
                    &state,
                    None,
                ),
                TokenDenial::Wait(wait) => too_many(
                    format!(
                        "Rate limit reached for tokens per minute (limit {}, requested {n}); retry in {}s",
                        limits.tpm,
                        headers::ceil_secs(wait).max(1)
                    ),
                    &state,
                    Some(wait),
                ),
            });
        }
        reservation.reserved = n;
        // On refusal `reservation` drops: its tpm is refunded.
        reservation.in_quota = self.spend_daily(client, limits, day, n).await?;
        Ok(reservation)
    }

    /// Reserves `n` tokens against today's quota only, for work whose cost is known up front
    /// but which is not one request (a batch job: its lines are not held to tpm). Returns the
    /// quota day to settle against with [`Limiter::adjust_daily`]. 429 `insufficient_quota`
    /// when it does not fit.
    pub async fn reserve_daily(
        &self,
        client: Uuid,
        limits: &Limits,
        n: u64,
    ) -> Result<chrono::NaiveDate, ApiError> {
        let day = quota::today();
        self.spend_daily(client, limits, day, n).await?;
        Ok(day)
    }

    /// Adds `delta` tokens (negative: a refund) to the client's `day`, retried through an
    /// outage (see [`quota::DailyQuota::adjust_durably`]).
    pub async fn adjust_daily(&self, client: Uuid, day: chrono::NaiveDate, delta: i64) {
        if let (Some(quota), true) = (&self.quota, delta != 0) {
            quota.adjust_durably(client, day, delta).await;
        }
    }

    /// Adds `n` to the client's `day` if it fits (true), or nothing without a database (false).
    async fn spend_daily(
        &self,
        client: Uuid,
        limits: &Limits,
        day: chrono::NaiveDate,
        n: u64,
    ) -> Result<bool, ApiError> {
        let Some(quota) = &self.quota else {
            return Ok(false);
        };
        if n == 0 {
            return Ok(true);
        }
        let limit = limits.daily_tokens;
        let spent = quota
            .try_spend(client, day, n as i64, limit)
            .await
            .map_err(|e| {
                // A database outage is a 503.
                if crate::db::is_outage_chain(&e) {
                    ApiError::ServiceUnavailable(
                        "the database is unavailable; retry shortly".into(),
                    )
                } else {
                    ApiError::Internal(e)
                }
            })?;
        match spent {
            Ok(_) => Ok(true),
            Err(exceeded) => {
                let until_midnight = until_next_utc_day();
                let mut state = self.rate_state(
                    client,
                    limits,
                    &RequestsState {
                        limit: limits.rpm,
                        remaining: limits.rpm,
                        reset: Duration::ZERO,
                    },
                );
                let remaining = (limit - exceeded.used).max(0);
                state.daily = Some(DailyState {
                    remaining,
                    reset: until_midnight,
                });
                let mut h = HeaderMap::new();
                headers::write(&mut h, &state, Some(until_midnight));
                Err(ApiError::TooManyRequests {
                    message: format!(
                        "Daily token quota exhausted: {} of {limit} tokens used today (UTC), this request needs {n}; the quota resets at 00:00 UTC",
                        exceeded.used
                    ),
                    kind: "insufficient_quota",
                    headers: Box::new(h),
                })
            }
        }
    }

    /// Forgets idle clients (full budgets, nothing in flight).
    pub fn sweep(&self) {
        self.rpm.sweep();
        self.tokens.sweep(self.now_ns());
        self.concurrency.sweep();
    }

    pub fn tracked_clients(&self) -> TrackedClients {
        TrackedClients {
            rpm: self.rpm.len(),
            tokens: self.tokens.len(),
            concurrency: self.concurrency.len(),
        }
    }

    /// Sweeps every `every` until the limiter is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limiter) => limiter.sweep(),
                    None => return,
                }
            }
        })
    }

    /// Tokens the client could take now.
    pub fn tokens_remaining(&self, client: Uuid, limits: &Limits) -> u64 {
        self.tokens.peek(client, limits.tpm, self.now_ns()).0
    }

    /// Tokens spent by the client today (UTC), from the database.
    pub async fn daily_tokens_used(&self, client_id: Uuid) -> anyhow::Result<i64> {
        match &self.quota {
            Some(q) => q.used(client_id, quota::today()).await,
            None => Ok(0),
        }
    }

    pub fn in_flight(&self, client_id: Uuid) -> u32 {
        self.concurrency.in_flight(client_id)
    }

    fn give_back(&self, client_id: Uuid, tpm: u32, tokens: u64) {
        let now = self.now_ns();
        self.tokens
            .with_bucket(client_id, tpm, now, |b| b.give_back(tokens, now));
    }
}

fn until_next_utc_day() -> Duration {
    let now = chrono::Utc::now();
    let tomorrow = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    (tomorrow - now).to_std().unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn ctx(limits: Limits) -> (Uuid, Limits) {
        (Uuid::new_v4(), limits)
    }

    fn limits() -> Limits {
        Limits {
            rpm: 2,
            tpm: 100,
            max_concurrent: 1,
            daily_tokens: 1000,
        }
    }

    fn status_and_headers(err: ApiError) -> (&'static str, HeaderMap) {
        match err {
            ApiError::TooManyRequests { kind, headers, .. } => (kind, *headers),
            other => panic!("expected 429, got {other:?}"),
        }
    }

    #[test]
    fn admit_enforces_rpm_and_concurrency() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(None, clock.clone());
        let c = ctx(limits());
        let first = l.admit(c.0, &c.1).unwrap();
        assert_eq!(first.requests.remaining, 1);
        let (kind, h) = status_and_headers(l.admit(c.0, &c.1).unwrap_err());
        assert_eq!(kind, "rate_limit_exceeded");
        assert_eq!(h["retry-after"], "1");
        drop(first);
        let (_, h) = status_and_headers(l.admit(c.0, &c.1).unwrap_err());
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["retry-after"], "30", "2 rpm: one request per 30 s");
        clock.advance(Duration::from_secs(30));
        assert!(l.admit(c.0, &c.1).is_ok());
    }

    #[tokio::test]
    async fn reservation_refunds_on_settle_and_on_drop() {
        let clock = FakeRelativeClock::default();
        let l = Arc::new(Limiter::with_clock(None, clock));
        let c = ctx(limits());
        let r = l.reserve_tokens(c.0, &c.1, 80).await.unwrap();
        assert_eq!(l.tokens_remaining(c.0, &c.1), 20);
        let err = l.reserve_tokens(c.0, &c.1, 30).await.unwrap_err();
        let (_, h) = status_and_headers(err);
        assert!(h.contains_key("retry-after"));
        r.settle(10).await;
        assert_eq!(l.tokens_remaining(c.0, &c.1), 90);
        let r = l.reserve_tokens(c.0, &c.1, 50).await.unwrap();
        drop(r);
        assert_eq!(l.tokens_remaining(c.0, &c.1), 90);
        // Dropped unsettled, a reservation charges what was produced and refunds the rest.
        let mut r = l.reserve_tokens(c.0, &c.1, 50).await.unwrap();
        assert_eq!(l.tokens_remaining(c.0, &c.1), 40);
        r.set_produced(20);
        drop(r);
        assert_eq!(l.tokens_remaining(c.0, &c.1), 70);
        // Settling past the reservation charges the reservation only.
        let r = l.reserve_tokens(c.0, &c.1, 10).await.unwrap();
        r.settle(1000).await;
        assert_eq!(l.tokens_remaining(c.0, &c.1), 60);
    }

    #[tokio::test]
    async fn cost_over_the_burst_is_refused_without_retry_after() {
        let l = Arc::new(Limiter::with_clock(None, FakeRelativeClock::default()));
        let c = ctx(limits());
        let err = l.reserve_tokens(c.0, &c.1, 101).await.unwrap_err();
        assert!(err.to_string().contains("can never be admitted"), "{err}");
        let (kind, h) = status_and_headers(err);
        assert_eq!(kind, "rate_limit_exceeded");
        assert!(!h.contains_key("retry-after"));
        assert_eq!(l.tokens_remaining(c.0, &c.1), 100);
    }

    #[tokio::test]
    async fn sweep_forgets_idle_clients_only() {
        let clock = FakeRelativeClock::default();
        let l = Arc::new(Limiter::with_clock(None, clock.clone()));
        let idle = ctx(limits());
        let busy = ctx(limits());
        drop(l.admit(idle.0, &idle.1).unwrap());
        l.reserve_tokens(idle.0, &idle.1, 10)
            .await
            .unwrap()
            .settle(10)
            .await;
        let _held = l.admit(busy.0, &busy.1).unwrap();
        let _reserved = l.reserve_tokens(busy.0, &busy.1, 100).await.unwrap();
        clock.advance(Duration::from_secs(10));
        l.sweep();
        let t = l.tracked_clients();
        assert_eq!((t.rpm, t.tokens, t.concurrency), (2, 1, 1));
        clock.advance(Duration::from_secs(60));
        l.sweep();
        let t = l.tracked_clients();
        assert_eq!(
            (t.rpm, t.tokens, t.concurrency),
            (0, 0, 1),
            "busy still holds a slot"
        );
    }
}
