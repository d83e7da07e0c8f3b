//! `POST /admin/clients/{id}/keys` (the key is shown once), `DELETE /admin/keys/{id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::clients::fetch_client;
use super::parse_id;
use crate::auth::{self, KeyRecord, Scope};
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::Json;
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

impl From<KeyRecord> for KeyView {
    fn from(k: KeyRecord) -> Self {
        KeyView {
            id: k.id,
            client_id: k.client_id,
            prefix: k.prefix,
            scopes: k.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            last_used_at: k.last_used_at,
        }
    }
}

const KEY_COLUMNS: &str =
    "id, client_id, prefix, scopes, created_at, expires_at, revoked_at, last_used_at";

pub(crate) async fn list_for_client(state: &AppState, client_id: Uuid) -> Result<Vec<KeyView>> {
    let rows = sqlx::query_as::<_, KeyRecord>(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE client_id = $1 ORDER BY created_at, id"
    ))
    .bind(client_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows.into_iter().map(KeyView::from).collect())
}

fn valid_scopes(raw: &[String]) -> Result<Vec<Scope>> {
    if raw.is_empty() {
        return Err(ApiError::bad_param(
            "scopes",
            "`scopes` must name at least one scope",
        ));
    }
    let mut scopes = Vec::new();
    for s in raw {
        let scope = Scope::parse(s).ok_or_else(|| {
            ApiError::bad_param(
                "scopes",
                format!("unknown scope `{s}`; expected `teacher` or `admin`"),
            )
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(scopes)
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
    let scopes = valid_scopes(&req.scopes)?;
    if req.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(ApiError::bad_param(
            "expires_at",
            "`expires_at` must be in the future",
        ));
    }
    fetch_client(&state, client_id).await?;
    let (record, key) = auth::issue_key(&state.db, client_id, &scopes, req.expires_at).await?;
    tracing::info!(%client_id, key_id = %record.id, prefix = %record.prefix, "API key issued");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: record.id,
            key: key.expose_secret().to_string(),
            prefix: record.prefix,
            scopes,
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
    let record = sqlx::query_as::<_, KeyRecord>(&format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING {KEY_COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no API key with id `{id}`")))?;
    tracing::info!(key_id = %id, "API key revoked");
    Ok(Json(record.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_validated() {
        assert!(valid_scopes(&[]).is_err());
        assert!(valid_scopes(&["root".into()]).is_err());
        assert_eq!(
            valid_scopes(&["teacher".into(), "admin".into(), "teacher".into()]).unwrap(),
            vec![Scope::Teacher, Scope::Admin]
        );
    }
}
