//! HTTP surface: one module per resource, each exposing `routes()`.

pub mod admin;
pub mod health;
pub mod ledger_layer;
pub mod tos;

use axum::Router;
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

pub fn router(state: AppState) -> Router {
    let (api, _openapi) = ledger_routes().split_for_parts();
    Router::new()
        .merge(health::routes())
        .merge(api)
        .with_state(state)
}

/// The ToS, usage and audit routes. They need a `ClientCtx` (401 without one) and belong behind
/// the auth gate, which wraps them in `ledger_layer::record_usage`.
pub fn ledger_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(tos::routes())
        .merge(admin::usage::routes())
        .merge(admin::audit::routes())
}
