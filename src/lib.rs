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
pub mod ledger;
pub mod limits;
pub mod state;
pub mod tos;
pub mod usage;

use std::future::Future;
use std::time::Duration;

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

/// Serve until `shutdown` resolves, then let in-flight requests finish (at most
/// `server.shutdown_grace_secs`) and drain every buffered ledger row before returning.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_router(listener, state.clone(), http::router(state), shutdown).await
}

/// [`serve`] with a router built by the caller (tests wrap the routes in their own gate).
pub async fn serve_router(
    listener: TcpListener,
    state: AppState,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(state.config.server.shutdown_grace_secs);
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    let deadline = async move {
        let _ = stopping_rx.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result.context("server error")?,
        _ = deadline => tracing::warn!("shutdown grace period over; dropping open connections"),
    }
    if state.ledger.shutdown(grace).await {
        tracing::info!("ledger drained");
    } else {
        tracing::error!("ledger did not drain within the grace period");
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}
