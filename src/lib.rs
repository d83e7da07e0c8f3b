//! teachd: hosts teacher LLMs for distillation behind keys, limits and a usage ledger.
//!
//! Data flows one way: http -> auth/limits -> engine -> ledger -> response. The engine knows
//! nothing of HTTP, clients or Postgres; the ledger knows nothing of models.
//!
//! # Module map (one line per module: what it owns)
//!
//! - `main.rs` (bin `teachd`): the CLI; parses arguments and calls into this library.
//! - [`config`]: the typed configuration; its `default.toml` is the embedded base layer and the
//!   one place every default lives.
//! - [`state`]: `AppState`, the parts wired together.
//! - [`error`]: `ApiError` and the one mapping of every error to the wire (JSON and SSE).
//! - [`usage`]: the typed hand-off from handlers to the gate: `Meter` (what a request served and
//!   reserved) and its `Closed` record.
//! - [`store`]: clients and their API keys: the key format (generation, checksum, hash), the
//!   rules for what is stored, the reserved clients (bootstrap admin, anonymous), and every
//!   query on the `clients` and `api_keys` tables, as typed functions returning domain types
//!   (`Client`, `Key`, `Credential`).
//! - [`auth`]: authentication of a request: Bearer key -> checks (revoked, expired, suspended,
//!   scope) -> `ClientCtx`; reads keys through `store`, holds no SQL.
//! - [`limits`]: per-client rpm, tpm, concurrency and the daily quota (client id + `Limits` in).
//! - [`tos`]: ToS versions, acceptances, licence policy.
//! - [`db`]: pool, migrations, outage classification and the database circuit breaker.
//! - [`engine`]: the teacher: model registry, mistralrs backend, logprob math, judge prompts.
//! - [`ledger`]: usage rows: the group-committing writer, the hash chain, bounded refusal
//!   rows, audit queries and verification, hourly rollups (`rollups`: kept by a trigger in the
//!   writer's INSERT; `/admin/usage` and the console read them), and the transparency log:
//!   the Merkle tree (`tree`), the signing key, checkpoints and receipts (`signing`), the
//!   checkpointer and the audit against saved checkpoints (`transparency`).
//! - [`http`]: the HTTP surface: the router and its outer layers (`mod.rs`), the gate (order of
//!   checks), the row of a request (`ledger_layer`), extractors (`extract`), request input and
//!   validators (`input`), teacher lookup and provenance (`access`), SSE streams (`sse`),
//!   generation driving (`generation`), one module per resource (`logprobs`, `completions`,
//!   `chat`, `judgments`, `tokenize`, `models`, `tos`, `admin`), health and metrics. The admin
//!   handlers for clients and keys are wire types around `store` calls.
//! - [`console`]: the admin console at `/console`: sessions (sign-in with an admin key, CSRF),
//!   server-rendered pages (askama templates and an embedded stylesheet under `console/`),
//!   plotters SVG charts; its actions call the admin handlers and are ledgered like them.
//! - [`batch`]: batch jobs in the OpenAI Batch API shape: `/v1/files` and `/v1/batches`, the
//!   up-front validation and quota reservation, the runner that resumes after a restart, the
//!   JSONL and Parquet outputs, and the `teachd batch` CLI.
//! - `bin/teachd-bench.rs`, `bin/bench-ledger.rs`, `bin/bench-auth.rs`: benchmarks that print
//!   tables.

pub mod auth;
pub mod batch;
pub mod config;
pub mod console;
pub mod db;
pub mod engine;
pub mod error;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod state;
pub mod store;
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
    AppState::new(config, models, db)
}

/// As [`build_state`], with models loaded elsewhere (tests and benchmarks pass
/// `ModelRegistry::empty()`).
pub async fn build_state_with_models(
    config: Config,
    models: engine::ModelRegistry,
) -> anyhow::Result<AppState> {
    let db = prepare_db(&config).await?;
    AppState::new(config, models, db)
}

async fn prepare_db(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    let db = db::connect(&config.database).await?;
    if config.database.migrate_on_start {
        db::migrate_as_owner(&config.database, &db).await?;
    }
    if let Some(role) = db::ledger_rewriter(&db).await? {
        let why = format!(
            "database.url logs in as {role}: that role can rewrite or truncate the usage ledger. \
             Serve as the runtime role teachd_app and run migrations through database.migrate_url \
             (README, \"Least privilege\")"
        );
        match config.database.privilege_check {
            config::PrivilegeCheck::Refuse => anyhow::bail!("refusing to serve: {why}"),
            config::PrivilegeCheck::Warn => tracing::warn!("{why}"),
        }
    }
    if config.server.disable_auth {
        tracing::warn!(
            "!!! server.disable_auth is set: teacher endpoints need NO API key and every request \
             runs as the `anonymous` client. For benchmarks and development only !!!"
        );
        store::ensure_anonymous_client(&db).await?;
    }
    Ok(db)
}

/// Serve until `shutdown` resolves, then let in-flight requests finish (at most
/// `server.shutdown_grace_secs`), cut the connections still open, and wait (at most
/// `server.ledger_drain_secs`) until the row of every request, cut ones included, is committed.
///
/// Connections are served by hyper directly (HTTP/1.1 and HTTP/2), so that a client that is
/// slow to send its headers is cut after `server.header_read_timeout_secs` instead of holding
/// its connection forever.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, state.clone(), http::router(state), shutdown).await
}

/// [`serve`] with the router given (the app's, possibly with routes of the caller's merged in).
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let grace = Duration::from_secs(state.config.server.shutdown_grace_secs);
    let drain = Duration::from_secs(state.config.server.ledger_drain_secs);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(
            state.config.server.header_read_timeout_secs.max(1),
        ));
    let builder = std::sync::Arc::new(builder);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = batch::runner::spawn(state.clone(), stop_rx.clone());
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    tracing::info!(
        connections = connections.len(),
        "shutting down: finishing in-flight requests"
    );
    let _ = stop_tx.send(true);
    let finished = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace period over; cutting the connections still open"
        );
        // Their requests' rows are written as they drop (status 499), before the drain ends.
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    // The batch runner stops after the line in progress (its row is recorded before the drain).
    if tokio::time::timeout(grace, runner).await.is_err() {
        tracing::warn!("the batch runner did not stop within the grace period");
    }
    if state.ledger.shutdown(drain).await {
        tracing::info!("ledger drained");
    } else {
        tracing::error!("ledger did not drain within server.ledger_drain_secs");
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
