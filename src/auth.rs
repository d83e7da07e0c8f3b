//! Authentication: `Authorization: Bearer tk_…` -> [`ClientCtx`].
//!
//! SKELETON (issue 3 fills this in): key format with checksum, hashed lookup, scopes,
//! revocation/suspension, and the `require_scope` middleware that inserts `ClientCtx`
//! into request extensions.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use uuid::Uuid;

use crate::error::ApiError;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Teacher,
    Admin,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct ClientCtx {
    pub client_id: Uuid,
    pub key_id: Uuid,
    pub scopes: Vec<Scope>,
}

impl<S: Send + Sync> FromRequestParts<S> for ClientCtx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ClientCtx>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("missing API key".into()))
    }
}
