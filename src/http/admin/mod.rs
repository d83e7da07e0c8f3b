//! Admin endpoints (scope `admin`): clients and their keys.

pub mod clients;
pub mod keys;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

/// Routes under /admin; the caller adds the admin gate.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(clients::create_client, clients::list_clients))
        .routes(routes!(clients::get_client, clients::patch_client))
        .routes(routes!(keys::issue_key))
        .routes(routes!(keys::revoke_key))
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
