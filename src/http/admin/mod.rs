//! Admin endpoints (scope `admin`, enforced by the auth gate): clients and their keys, ToS
//! publication, usage and audits.

pub mod audit;
pub mod clients;
pub mod keys;
pub mod usage;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::ApiError;
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

/// A path id, or 400 naming the parameter. (axum's `Path<Uuid>` would reject in plain text.)
pub(crate) fn parse_id(param: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_param(param, format!("`{param}` must be a UUID")))
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

/// Deserializes a present field as `Some(value)`, `null` included, so that PATCH can tell
/// "set to null" (`Some(None)`) from "absent" (`None`).
pub(crate) fn double_option<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(de).map(Some)
}

/// Query-string extractor whose rejections use the error envelope (400), like `error::Json`.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|rej| ApiError::BadRequest {
                message: rej.body_text(),
                param: None,
                code: Some("invalid_query"),
            })
    }
}

/// `from` (inclusive) and `to` (exclusive), as 400s when malformed.
#[allow(clippy::result_large_err)] // ApiError carries rate-limit headers; fine off the hot path
pub(crate) fn parse_range(from: Option<&str>, to: Option<&str>) -> Result<TimeRange, ApiError> {
    TimeRange::parse(from, to).map_err(|(param, msg)| ApiError::bad_param(param, msg))
}
