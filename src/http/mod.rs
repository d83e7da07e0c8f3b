//! HTTP surface: one module per resource, each exposing `routes()`.

pub mod health;

use axum::Router;

use crate::AppState;

pub fn router(state: AppState) -> Router {
    Router::new().merge(health::routes()).with_state(state)
}
