use std::sync::Arc;

use sqlx::PgPool;

use crate::config::Config;
use crate::engine::ModelRegistry;
use crate::ledger::Ledger;
use crate::tos::TosStore;

/// Shared application state. Cheap to clone: everything inside is behind an `Arc` or a pool.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub models: Arc<ModelRegistry>,
    pub db: PgPool,
    /// The usage ledger's writer task.
    pub ledger: Ledger,
    pub tos: Arc<TosStore>,
}
