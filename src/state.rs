use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::engine::ModelRegistry;
use crate::ledger::Ledger;
use crate::limits::{Limiter, Limits};
use crate::tos::TosStore;

/// Shared application state. Cheap to clone: everything inside is behind an `Arc` or a pool.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub models: Arc<ModelRegistry>,
    pub db: PgPool,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<Limiter>,
    /// The usage ledger's writer task.
    pub ledger: Ledger,
    pub tos: Arc<TosStore>,
    pub metrics: Arc<crate::http::metrics::Metrics>,
    /// Requests being served across all clients (`server.max_in_flight`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Fails database-bound requests fast while Postgres is down.
    pub db_health: Arc<crate::db::DbHealth>,
    /// Wakes the batch runner when a batch is created or cancelled.
    pub batch_wake: Arc<tokio::sync::Notify>,
}

/// How often idle clients are dropped from the limiters' maps.
const LIMITER_SWEEP_EVERY: Duration = Duration::from_secs(60);

impl AppState {
    /// Wires the parts together. Call inside a Tokio runtime (it starts the limiter sweeper
    /// and the ledger's writer task).
    pub fn new(config: Config, models: ModelRegistry, db: PgPool) -> anyhow::Result<Self> {
        let defaults = Limits::from(&config.limits);
        let auth = Arc::new(Authenticator::new(
            db.clone(),
            defaults,
            config.server.disable_auth,
        ));
        let limits = Arc::new(Limiter::new(db.clone()));
        if tokio::runtime::Handle::try_current().is_ok() {
            limits.spawn_sweeper(LIMITER_SWEEP_EVERY);
        }
        let key = crate::ledger::signing::LogKey::load(&config.tlog)?;
        let tlog = Arc::new(crate::ledger::transparency::Tlog::new(
            Arc::new(key),
            db.clone(),
            &config.tlog,
        ));
        if tokio::runtime::Handle::try_current().is_ok() {
            tlog.spawn_checkpointer();
        }
        let ledger = Ledger::start(&db, &config.ledger, tlog);
        let tos = Arc::new(TosStore::new(db.clone()));
        let in_flight = Arc::new(tokio::sync::Semaphore::new(config.server.max_in_flight));
        let db_health = Arc::new(crate::db::DbHealth::new(Duration::from_millis(
            config.database.outage_backoff_ms,
        )));
        Ok(AppState {
            config: Arc::new(config),
            models: Arc::new(models),
            db,
            auth,
            limits,
            ledger,
            tos,
            metrics: Default::default(),
            in_flight,
            db_health,
            batch_wake: Default::default(),
        })
    }
}
