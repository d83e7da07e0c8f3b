//! HTTP surface: one module per resource, each exposing `routes()`.
//!
//! Teacher routes (/v1) sit behind [`gate::teacher_gate`] (scope `teacher`, per-client limits),
//! admin routes behind [`gate::admin_gate`] (scope `admin`); /healthz and /readyz are open.

pub mod admin;
pub mod gate;
pub mod health;
pub mod models;

use axum::http::header;
use axum::middleware::from_fn_with_state;
use axum::Router;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

pub fn router(state: AppState) -> Router {
    let (api, _openapi) = api(state.clone()).split_for_parts();
    api.merge(health::routes())
        // Keys must never reach a log line, whatever tracing layer is added around this.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .with_state(state)
}

/// Every documented route, with its gate.
pub fn api(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(teacher_routes(state.clone()))
        .merge(admin_routes(state))
}

/// Routes that need scope `teacher` and count against the client's limits.
/// New /v1 resources are merged here, before the gate's `route_layer`.
pub fn teacher_routes(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(models::routes())
        .route_layer(from_fn_with_state(state, gate::teacher_gate))
}

/// Routes that need scope `admin`.
pub fn admin_routes(state: AppState) -> OpenApiRouter<AppState> {
    admin::routes().route_layer(from_fn_with_state(state, gate::admin_gate))
}
