//! Admin endpoints (scope `admin`, enforced by the auth gate): clients and their keys, ToS
//! publication, usage and audits.

pub mod audit;
pub mod clients;
pub mod keys;
pub mod usage;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
pub(crate) use crate::http::extract::{double_option, parse_id, Query};
use crate::ledger::queries::TimeRange;
use crate::AppState;

/// Routes under /admin; the caller adds the admin gate.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(clients::create_client, clients::list_clients))
        .routes(routes!(clients::get_client, clients::patch_client))
        .routes(routes!(keys::issue_key))
        .routes(routes!(keys::revoke_key))
        .merge(crate::http::tos::admin_routes())
        .merge(usage::routes())
        .merge(audit::routes())
}

/// `{"object": "list", "data": [...]}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
}

impl<T> List<T> {
    pub fn new(data: Vec<T>) -> Self {
        List {
            object: "list",
            data,
        }
    }
}

/// `from` (inclusive) and `to` (exclusive), as 400s when malformed.
#[allow(clippy::result_large_err)] // ApiError carries rate-limit headers; fine off the hot path
pub(crate) fn parse_range(from: Option<&str>, to: Option<&str>) -> Result<TimeRange, ApiError> {
    TimeRange::parse(from, to).map_err(|(param, msg)| ApiError::bad_param(param, msg))
}
