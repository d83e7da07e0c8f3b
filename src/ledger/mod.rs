//! The usage ledger: one hash-chained row per authenticated request, committed by a single
//! writer task per process with group commit.
//!
//! [`Ledger::record`] resolves only once the row is durably committed; callers hold back their
//! response until then (fail closed). The writer batches everything queued into one INSERT
//! (UNNEST of arrays, one round trip, one fsync), so throughput scales with load instead of
//! with fsyncs. The ledger knows nothing of models or HTTP.

pub mod chain;
pub mod queries;
pub mod refusals;
pub mod rollups;
pub mod signing;
pub mod transparency;
pub mod tree;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

pub use chain::{ChainedEvent, UsageEvent};

use crate::config::LedgerConfig;

/// Why a row was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The database could not be reached or refused the batch; retried for later rows.
    #[error("the ledger could not commit: {0}")]
    Unavailable(String),
    /// A row with this request id is already in the ledger.
    #[error("request id `{0}` is already in the ledger")]
    DuplicateRequestId(String),
    /// The writer has stopped (process shutting down).
    #[error("the ledger writer has stopped")]
    Closed,
}

/// A committed row: its id (leaf `id - 1` of the tree) and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub id: i64,
    pub row_hash: [u8; 32],
}

/// Full bodies, kept only when `ledger.store_bodies` is on.
#[derive(Clone, Debug)]
pub struct Bodies {
    pub request: Bytes,
    pub response: Bytes,
}

// Flushes are rare; boxing every row to shrink them would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    Record {
        event: UsageEvent,
        bodies: Option<Bodies>,
        done: oneshot::Sender<Result<Committed, LedgerError>>,
    },
    /// Answered once every row queued before it has been committed or refused.
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    store_bodies: bool,
    healthy: Arc<AtomicBool>,
    pool: PgPool,
    refusals: Arc<refusals::RefusalBook>,
    pending: Arc<Pending>,
    tlog: Arc<transparency::Tlog>,
}

/// Rows that exist (a request is being served, or its row waits for its work to end) but have
/// not reached the writer yet. Shutdown waits for them before it drains.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    zero: tokio::sync::Notify,
}

/// One row on its way to the writer; see [`Ledger::pending_row`].
pub struct PendingRow(Arc<Pending>);

impl Drop for PendingRow {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// How often aggregated refusal rows of past minutes are written.
const REFUSAL_FLUSH_EVERY: Duration = Duration::from_secs(5);

impl Ledger {
    /// Start the writer task. It opens its own connection (with the pool's options), so admin
    /// queries that exhaust the pool can never starve the ledger.
    pub fn start(pool: &PgPool, cfg: &LedgerConfig, tlog: Arc<transparency::Tlog>) -> Ledger {
        let (tx, rx) = mpsc::channel(cfg.max_batch.max(1) * 64);
        let healthy = Arc::new(AtomicBool::new(true));
        let opts = (*pool.connect_options()).clone();
        tokio::spawn(writer::run(rx, opts, cfg.clone(), healthy.clone()));
        let ledger = Ledger {
            tx,
            store_bodies: cfg.store_bodies,
            healthy,
            pool: pool.clone(),
            refusals: Arc::new(refusals::RefusalBook::new(cfg.max_refusal_rows_per_minute)),
            pending: Arc::default(),
            tlog,
        };
        // Writes the aggregates of past minutes; ends once every handle is gone.
        let weak = Arc::downgrade(&ledger.refusals);
        let tx = ledger.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFUSAL_FLUSH_EVERY);
            loop {
                tick.tick().await;
                let Some(book) = weak.upgrade() else { return };
                for event in book.take_due(chrono::Utc::now(), false) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = send(&tx, event, None).await {
                            tracing::warn!(error = %e, "could not record aggregated refusals");
                        }
                    });
                }
            }
        });
        ledger
    }

    /// Registers a row that will be handed to [`Ledger::record`]; hold it until then.
    pub fn pending_row(&self) -> PendingRow {
        self.pending.count.fetch_add(1, Ordering::AcqRel);
        PendingRow(self.pending.clone())
    }

    /// Records a refusal, within the per-client bound on refusal rows (see [`refusals`]).
    /// Resolves at once (with `None`) for a refusal that is only counted.
    pub async fn record_refusal(
        &self,
        event: UsageEvent,
    ) -> Result<Option<Committed>, LedgerError> {
        match self.refusals.admit(event) {
            refusals::Decision::Record(event) => self.record(*event, None).await.map(Some),
            refusals::Decision::Counted => Ok(None),
        }
    }

    /// The transparency log over this ledger (key, checkpoints).
    pub fn tlog(&self) -> &Arc<transparency::Tlog> {
        &self.tlog
    }

    /// Whether `client` already has a row under `request_id` (a caller-chosen id reused).
    pub async fn request_id_used(
        &self,
        client: uuid::Uuid,
        request_id: &str,
    ) -> Result<bool, LedgerError> {
        let found: Option<(i64,)> = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::query_as("SELECT id FROM usage_events WHERE client_id = $1 AND request_id = $2")
                .bind(client)
                .bind(request_id)
                .fetch_optional(&self.pool),
        )
        .await
        .map_err(|_| LedgerError::Unavailable("timed out checking the request id".into()))?
        .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
        Ok(found.is_some())
    }

    /// Whether full bodies should be handed to [`Ledger::record`].
    pub fn stores_bodies(&self) -> bool {
        self.store_bodies
    }

    /// Whether the last batch committed (for `/readyz`).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Append one row; resolves with its id and hash once it is committed.
    pub async fn record(
        &self,
        event: UsageEvent,
        bodies: Option<Bodies>,
    ) -> Result<Committed, LedgerError> {
        let bodies = if self.store_bodies { bodies } else { None };
        send(&self.tx, event, bodies).await
    }

    /// Wait until every row of every request (including rows still waiting for their work to
    /// end, and this minute's aggregated refusals) is committed or refused, at most `deadline`.
    /// Called on shutdown after the server stopped taking requests. Returns false on timeout.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let zero = self.pending.zero.notified();
            if self.pending.count.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(until, zero).await.is_err() {
                tracing::error!(
                    rows = self.pending.count.load(Ordering::Acquire),
                    "rows still pending at the end of the drain"
                );
                break;
            }
        }
        let aggregates = self.refusals.take_due(chrono::Utc::now(), true);
        let writes = aggregates.into_iter().map(|row| self.record(row, None));
        let _ = tokio::time::timeout_at(until, futures::future::join_all(writes)).await;
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_err() {
            return true;
        }
        tokio::time::timeout_at(until, rx).await.is_ok()
    }

    /// Rows not yet handed to the writer (for tests and metrics).
    pub fn pending_rows(&self) -> usize {
        self.pending.count.load(Ordering::Acquire)
    }
}

async fn send(
    tx: &mpsc::Sender<Msg>,
    event: UsageEvent,
    bodies: Option<Bodies>,
) -> Result<Committed, LedgerError> {
    let (done, rx) = oneshot::channel();
    tx.send(Msg::Record {
        event,
        bodies,
        done,
    })
    .await
    .map_err(|_| LedgerError::Closed)?;
    rx.await.map_err(|_| LedgerError::Closed)?
}

/// `teachd audit verify [--from --to]`: the bounds are RFC 3339 timestamps or dates.
pub async fn audit_verify(
    pool: &PgPool,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<queries::VerifyReport> {
    let range = queries::TimeRange::parse(from, to).map_err(|(_, msg)| anyhow::anyhow!(msg))?;
    let report = queries::verify(pool, range).await?;
    queries::record_verification(pool, range, &report).await?;
    Ok(report)
}
