//! `/healthz`, `/readyz` and `/metrics`: outside the gate (no key, no ledger row, no admission
//! slot), except `/metrics` with `server.metrics = "admin"`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;

use crate::config::MetricsAccess;
use crate::AppState;

pub fn routes(state: &AppState) -> Router<AppState> {
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let metrics = Router::new().route("/metrics", get(super::metrics::metrics));
    match state.config.server.metrics {
        MetricsAccess::Open => open.merge(metrics),
        MetricsAccess::Admin => open
            .merge(metrics.route_layer(from_fn_with_state(state.clone(), super::gate::admin_gate))),
        MetricsAccess::Off => open,
    }
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok"
}

/// Models loaded, the database reachable and the ledger committing.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.models.iter().next().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no model loaded");
    }
    if state.db_health.is_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "database unreachable: database-bound requests answer 503",
        );
    }
    if !state.ledger.is_healthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "usage ledger cannot commit",
        );
    }
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.db),
    )
    .await;
    match probe {
        Ok(Ok(_)) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}
