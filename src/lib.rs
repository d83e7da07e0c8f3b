//! teachd: hosts teacher LLMs for distillation behind keys, limits and a usage ledger.
//!
//! Data flows one way: http -> auth/limits -> engine -> ledger -> response. The engine knows
//! nothing of HTTP, clients or Postgres; the ledger knows nothing of models.

pub mod auth;
pub mod config;
pub mod db;
pub mod engine;
pub mod error;
pub mod http;
pub mod limits;
pub mod state;
pub mod usage;

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;

pub use state::AppState;

use crate::config::Config;

/// Connect to Postgres, run migrations (if configured), load every configured model.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    let db = prepare_db(&config).await?;
    let models = engine::ModelRegistry::load(&config.models, &config.engine)
        .await
        .context("loading teacher models")?;
    Ok(AppState::new(config, models, db))
}

/// As [`build_state`], with models loaded elsewhere (tests and benchmarks pass
/// `ModelRegistry::empty()`).
pub async fn build_state_with_models(
    config: Config,
    models: engine::ModelRegistry,
) -> anyhow::Result<AppState> {
    let db = prepare_db(&config).await?;
    Ok(AppState::new(config, models, db))
}

async fn prepare_db(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    let db = db::connect(&config.database).await?;
    if config.database.migrate_on_start {
        db::migrate(&db).await?;
    }
    if config.server.disable_auth {
        tracing::warn!(
            "!!! server.disable_auth is set: teacher endpoints need NO API key and every request \
             runs as the `anonymous` client. For benchmarks and development only !!!"
        );
        auth::ensure_anonymous_client(&db).await?;
    }
    Ok(db)
}

/// Serve until `shutdown` resolves, then drain in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = http::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("server error")
}
