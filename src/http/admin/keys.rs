//! `POST /admin/clients/{id}/keys` (the key is shown once), `DELETE /admin/keys/{id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{parse_id, KeyView};
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::Json;
use crate::store::{self, NewKey, Scope};
use crate::usage::Meter;
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// `teacher` (the /v1 endpoints) and/or `admin` (everything under /admin).
    #[schema(value_type = Vec<Scope>)]
    pub scopes: Vec<String>,
    /// When the key stops working; must be in the future. Absent: never.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A new key. `key` is shown here once and stored nowhere.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    pub id: Uuid,
    pub key: String,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub client_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The scopes named in a request; an empty list is the store's to refuse.
fn parse_scopes(raw: &[String]) -> Result<Vec<Scope>> {
    raw.iter()
        .map(|s| {
            Scope::parse(s).ok_or_else(|| {
                ApiError::bad_param(
                    "scopes",
                    format!("unknown scope `{s}`; expected `teacher` or `admin`"),
                )
            })
        })
        .collect()
}

/// Issue a key for a client. The response is the only place the key ever appears.
#[utoipa::path(
    post, path = "/admin/clients/{id}/keys", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")),
    request_body = CreateKey,
    responses(
        (status = 201, description = "Created; `key` is shown only now", body = CreatedKey),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
    ),
    security(("bearer" = ["admin"]))
)]
#[tracing::instrument(skip_all)]
pub async fn issue_key(
    State(state): State<AppState>,
    meter: Meter,
    Path(id): Path<String>,
    Json(req): Json<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>)> {
    // The response holds the plaintext key: the ledger stores its hash, never its body.
    meter.sensitive();
    let client_id = parse_id("id", &id)?;
    let new = NewKey {
        scopes: parse_scopes(&req.scopes)?,
        expires_at: req.expires_at,
    };
    let (record, key) = store::issue_key(&state.db, client_id, &new).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: record.id,
            key: key.expose_secret().to_string(),
            prefix: record.prefix,
            scopes: record.scopes,
            client_id,
            created_at: record.created_at,
            expires_at: record.expires_at,
        }),
    ))
}

/// Revoke a key. The next request made with it gets 401. Revoking twice is harmless.
#[utoipa::path(
    delete, path = "/admin/keys/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "Key id")),
    responses(
        (status = 200, description = "Revoked", body = KeyView),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
    ),
    security(("bearer" = ["admin"]))
)]
#[tracing::instrument(skip_all)]
pub async fn revoke_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>> {
    let id = parse_id("id", &id)?;
    let key = store::revoke_key(&state.db, id).await?;
    Ok(Json(key.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_parsed() {
        assert!(parse_scopes(&["root".into()]).is_err());
        assert!(parse_scopes(&["teacher".into(), "Admin".into()]).is_err());
        assert_eq!(
            parse_scopes(&["teacher".into(), "admin".into(), "teacher".into()]).unwrap(),
            vec![Scope::Teacher, Scope::Admin, Scope::Teacher]
        );
    }
}
