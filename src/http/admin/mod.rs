//! Admin endpoints (scope `admin`, enforced by the auth gate): clients and their keys, ToS
//! publication, usage and audits.

pub mod audit;
pub mod clients;
pub mod keys;
pub mod usage;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::ApiError;
pub(crate) use crate::http::extract::{double_option, parse_id, Query};
use crate::ledger::queries::TimeRange;
use crate::store::{Key, Scope};
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

/// A key without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub client_id: Uuid,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<Key> for KeyView {
    fn from(k: Key) -> Self {
        KeyView {
            id: k.id,
            client_id: k.client_id,
            prefix: k.prefix,
            scopes: k.scopes,
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            last_used_at: k.last_used_at,
        }
    }
}

/// `from` (inclusive) and `to` (exclusive), as 400s when malformed.
#[allow(clippy::result_large_err)] // ApiError carries rate-limit headers; fine off the hot path
pub(crate) fn parse_range(from: Option<&str>, to: Option<&str>) -> Result<TimeRange, ApiError> {
    TimeRange::parse(from, to).map_err(|(param, msg)| ApiError::bad_param(param, msg))
}
