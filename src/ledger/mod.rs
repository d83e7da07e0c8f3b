//! The usage ledger: one hash-chained row per authenticated request, committed by a single
//! writer task per process with group commit.
//!
//! [`Ledger::record`] resolves only once the row is durably committed; callers hold back their
//! response until then (fail closed). The writer batches everything queued into one INSERT
//! (UNNEST of arrays, one round trip, one fsync), so throughput scales with load instead of
//! with fsyncs. The ledger knows nothing of models or HTTP.

pub mod chain;
pub mod queries;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
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
        done: oneshot::Sender<Result<i64, LedgerError>>,
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
}

impl Ledger {
    /// Start the writer task. It opens its own connection (with the pool's options), so admin
    /// queries that exhaust the pool can never starve the ledger.
    pub fn start(pool: &PgPool, cfg: &LedgerConfig) -> Ledger {
        let (tx, rx) = mpsc::channel(cfg.max_batch.max(1) * 64);
        let healthy = Arc::new(AtomicBool::new(true));
        let opts = (*pool.connect_options()).clone();
        tokio::spawn(writer::run(rx, opts, cfg.clone(), healthy.clone()));
        Ledger {
            tx,
            store_bodies: cfg.store_bodies,
            healthy,
        }
    }

    /// Whether full bodies should be handed to [`Ledger::record`].
    pub fn stores_bodies(&self) -> bool {
        self.store_bodies
    }

    /// Whether the last batch committed (for `/readyz`).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Append one row; resolves with its id once it is committed.
    pub async fn record(
        &self,
        event: UsageEvent,
        bodies: Option<Bodies>,
    ) -> Result<i64, LedgerError> {
        let (done, rx) = oneshot::channel();
        let bodies = if self.store_bodies { bodies } else { None };
        self.tx
            .send(Msg::Record {
                event,
                bodies,
                done,
            })
            .await
            .map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Wait until every row queued so far is committed (or refused), at most `deadline`.
    /// Called on shutdown after the server stopped taking requests. Returns false on timeout.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_err() {
            return true;
        }
        tokio::time::timeout(deadline, rx).await.is_ok()
    }
}

/// `teachd audit verify [--from --to]`: the bounds are RFC 3339 timestamps or dates.
pub async fn audit_verify(
    pool: &PgPool,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<queries::VerifyReport> {
    let range = queries::TimeRange::parse(from, to).map_err(|(_, msg)| anyhow::anyhow!(msg))?;
    Ok(queries::verify(pool, range).await?)
}
