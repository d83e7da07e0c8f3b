use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(super::metrics::metrics))
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok"
}

/// Models loaded, the ledger committing and its database reachable.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.models.iter().next().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no model loaded");
    }
    if !state.ledger.is_healthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "usage ledger cannot commit",
        );
    }
    match sqlx::query("SELECT 1").execute(&state.db).await {
        Ok(_) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}
