//! `POST/GET /admin/clients`, `GET/PATCH /admin/clients/{id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::keys::KeyView;
use super::{double_option, parse_id, List};
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::Json;
use crate::http::input::no_nul;
use crate::limits::Limits;
use crate::AppState;

/// Per-client limits; an absent or null field uses the configured default.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    #[schema(minimum = 1, maximum = 2147483647)]
    pub rpm: Option<i64>,
    #[schema(minimum = 1, maximum = 2147483647)]
    pub tpm: Option<i64>,
    #[schema(minimum = 1, maximum = 2147483647)]
    pub max_concurrent: Option<i64>,
    #[schema(minimum = 1, maximum = 4503599627370496.0)]
    pub daily_tokens: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    /// Unique, 1 to 200 characters (not all blank, no NUL).
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// Who to call about this client (at most 320 characters).
    #[serde(default)]
    #[schema(max_length = 320)]
    pub contact: Option<String>,
    #[serde(default, deserialize_with = "crate::http::extract::object")]
    pub limits: LimitOverrides,
}

/// Fields to change; absent fields stay as they are, `null` clears an optional one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchClient {
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 320)]
    pub contact: Option<Option<String>>,
    /// A suspended client gets 403 on its very next request.
    pub suspended: Option<bool>,
    #[serde(default, deserialize_with = "crate::http::extract::opt_object")]
    pub limits: Option<PatchLimits>,
}

/// Limit overrides to change; `null` goes back to the configured default.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchLimits {
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 2147483647)]
    pub rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 2147483647)]
    pub tpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 2147483647)]
    pub max_concurrent: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4503599627370496.0)]
    pub daily_tokens: Option<Option<i64>>,
}

/// The overrides stored for a client (`null`: the default applies).
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredOverrides {
    pub rpm: Option<i32>,
    pub tpm: Option<i32>,
    pub max_concurrent: Option<i32>,
    pub daily_tokens: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientView {
    pub id: Uuid,
    pub name: String,
    pub contact: Option<String>,
    pub suspended: bool,
    /// Effective limits: overrides over the configured defaults.
    pub limits: Limits,
    pub overrides: StoredOverrides,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// `GET /admin/clients/{id}` only: the client's keys (never their secrets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<KeyView>>,
    /// `GET /admin/clients/{id}` only: tokens spent today (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_today: Option<i64>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ClientRow {
    id: Uuid,
    name: String,
    contact: Option<String>,
    suspended: bool,
    rpm: Option<i32>,
    tpm: Option<i32>,
    max_concurrent: Option<i32>,
    daily_tokens: Option<i64>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const CLIENT_COLUMNS: &str =
    "id, name, contact, suspended, rpm, tpm, max_concurrent, daily_tokens, created_at, updated_at";

impl ClientRow {
    fn view(self, defaults: &Limits) -> ClientView {
        ClientView {
            limits: Limits {
                rpm: self.rpm.map_or(defaults.rpm, |v| v as u32),
                tpm: self.tpm.map_or(defaults.tpm, |v| v as u32),
                max_concurrent: self
                    .max_concurrent
                    .map_or(defaults.max_concurrent, |v| v as u32),
                daily_tokens: self.daily_tokens.unwrap_or(defaults.daily_tokens),
            },
            overrides: StoredOverrides {
                rpm: self.rpm,
                tpm: self.tpm,
                max_concurrent: self.max_concurrent,
                daily_tokens: self.daily_tokens,
            },
            id: self.id,
            name: self.name,
            contact: self.contact,
            suspended: self.suspended,
            created_at: self.created_at,
            updated_at: self.updated_at,
            keys: None,
            tokens_today: None,
        }
    }
}

// --- validation ------------------------------------------------------------------------------

fn valid_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad_param(
            "name",
            "`name` must be 1 to 200 characters",
        ));
    }
    no_nul("name", name)?;
    Ok(name.to_string())
}

fn valid_contact(contact: Option<&str>) -> Result<Option<String>> {
    if let Some(c) = contact {
        no_nul("contact", c)?;
    }
    match contact.map(str::trim) {
        Some(c) if c.chars().count() > 320 => Err(ApiError::bad_param(
            "contact",
            "`contact` must be at most 320 characters",
        )),
        Some("") | None => Ok(None),
        Some(c) => Ok(Some(c.to_string())),
    }
}

/// A limit in 1..=`max` (the i32 columns cap rpm, tpm and max_concurrent).
fn valid_limit(field: &str, value: Option<i64>, max: i64) -> Result<Option<i64>> {
    match value {
        Some(v) if !(1..=max).contains(&v) => Err(ApiError::bad_param(
            &format!("limits.{field}"),
            format!("`limits.{field}` must be between 1 and {max}"),
        )),
        other => Ok(other),
    }
}

const MAX_I32: i64 = i32::MAX as i64;
const MAX_DAILY: i64 = 1 << 52;

fn name_taken(err: &sqlx::Error, name: &str) -> Option<ApiError> {
    match err {
        sqlx::Error::Database(db) if db.constraint() == Some("clients_name_key") => Some(
            ApiError::bad_param("name", format!("a client named `{name}` already exists")),
        ),
        _ => None,
    }
}

pub(crate) async fn fetch_client(state: &AppState, id: Uuid) -> Result<ClientRow> {
    sqlx::query_as::<_, ClientRow>(&format!(
        "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no client with id `{id}`")))
}

// --- handlers --------------------------------------------------------------------------------

/// Create a client.
#[utoipa::path(
    post, path = "/admin/clients", tag = "admin",
    request_body = CreateClient,
    responses(
        (status = 201, description = "Created", body = ClientView),
        (status = 400, description = "Invalid field (`param` names it)", body = ErrorEnvelope),
    ),
    security(("bearer" = ["admin"]))
)]
#[tracing::instrument(skip_all)]
pub async fn create_client(
    State(state): State<AppState>,
    Json(req): Json<CreateClient>,
) -> Result<(StatusCode, Json<ClientView>)> {
    let name = valid_name(&req.name)?;
    let contact = valid_contact(req.contact.as_deref())?;
    let l = &req.limits;
    let rpm = valid_limit("rpm", l.rpm, MAX_I32)?;
    let tpm = valid_limit("tpm", l.tpm, MAX_I32)?;
    let max_concurrent = valid_limit("max_concurrent", l.max_concurrent, MAX_I32)?;
    let daily_tokens = valid_limit("daily_tokens", l.daily_tokens, MAX_DAILY)?;
    let row = sqlx::query_as::<_, ClientRow>(&format!(
        "INSERT INTO clients (id, name, contact, rpm, tpm, max_concurrent, daily_tokens)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {CLIENT_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(&name)
    .bind(contact)
    .bind(rpm.map(|v| v as i32))
    .bind(tpm.map(|v| v as i32))
    .bind(max_concurrent.map(|v| v as i32))
    .bind(daily_tokens)
    .fetch_one(&state.db)
    .await
    .map_err(|e| name_taken(&e, &name).unwrap_or_else(|| e.into()))?;
    tracing::info!(client_id = %row.id, "client created");
    Ok((StatusCode::CREATED, Json(row.view(state.auth.defaults()))))
}

/// List clients, oldest first.
#[utoipa::path(
    get, path = "/admin/clients", tag = "admin",
    responses(
        (status = 200, body = List<ClientView>),
    ),
    security(("bearer" = ["admin"]))
)]
#[tracing::instrument(skip_all)]
pub async fn list_clients(State(state): State<AppState>) -> Result<Json<List<ClientView>>> {
    let rows = sqlx::query_as::<_, ClientRow>(&format!(
        "SELECT {CLIENT_COLUMNS} FROM clients ORDER BY created_at, id"
    ))
    .fetch_all(&state.db)
    .await?;
    let defaults = state.auth.defaults();
    Ok(Json(List::new(
        rows.into_iter().map(|r| r.view(defaults)).collect(),
    )))
}

/// A client, with its keys and today's token count.
#[utoipa::path(
    get, path = "/admin/clients/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")),
    responses(
        (status = 200, body = ClientView),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
    ),
    security(("bearer" = ["admin"]))
)]
#[tracing::instrument(skip_all)]
pub async fn get_client(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ClientView>> {
    let id = parse_id("id", &id)?;
    let mut view = fetch_client(&state, id).await?.view(state.auth.defaults());
    view.keys = Some(super::keys::list_for_client(&state, id).await?);
    view.tokens_today = Some(state.limits.daily_tokens_used(id).await?);
    Ok(Json(view))
}

/// Change a client: name, contact, limits, `suspended`. Takes effect on the next request.
#[utoipa::path(
    patch, path = "/admin/clients/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")),
    request_body = PatchClient,
    responses(
        (status = 200, body = ClientView),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
    ),
    security(("bearer" = ["admin"]))
)]
#[tracing::instrument(skip_all)]
pub async fn patch_client(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<PatchClient>,
) -> Result<Json<ClientView>> {
    let id = parse_id("id", &id)?;
    let name = req.name.as_deref().map(valid_name).transpose()?;
    let contact = req
        .contact
        .as_ref()
        .map(|c| valid_contact(c.as_deref()))
        .transpose()?;
    let none = PatchLimits {
        rpm: None,
        tpm: None,
        max_concurrent: None,
        daily_tokens: None,
    };
    let l = req.limits.as_ref().unwrap_or(&none);
    // (set?, value) per limit: `set` false keeps the column as it is.
    let lim = |field: &str, v: Option<Option<i64>>, max: i64| -> Result<(bool, Option<i64>)> {
        match v {
            None => Ok((false, None)),
            Some(v) => Ok((true, valid_limit(field, v, max)?)),
        }
    };
    let rpm = lim("rpm", l.rpm, MAX_I32)?;
    let tpm = lim("tpm", l.tpm, MAX_I32)?;
    let max_concurrent = lim("max_concurrent", l.max_concurrent, MAX_I32)?;
    let daily_tokens = lim("daily_tokens", l.daily_tokens, MAX_DAILY)?;
    let row = sqlx::query_as::<_, ClientRow>(&format!(
        "UPDATE clients SET
            name = COALESCE($2, name),
            contact = CASE WHEN $3 THEN $4 ELSE contact END,
            suspended = COALESCE($5, suspended),
            rpm = CASE WHEN $6 THEN $7 ELSE rpm END,
            tpm = CASE WHEN $8 THEN $9 ELSE tpm END,
            max_concurrent = CASE WHEN $10 THEN $11 ELSE max_concurrent END,
            daily_tokens = CASE WHEN $12 THEN $13 ELSE daily_tokens END,
            updated_at = now()
         WHERE id = $1 RETURNING {CLIENT_COLUMNS}"
    ))
    .bind(id)
    .bind(name.as_deref())
    .bind(contact.is_some())
    .bind(contact.flatten())
    .bind(req.suspended)
    .bind(rpm.0)
    .bind(rpm.1.map(|v| v as i32))
    .bind(tpm.0)
    .bind(tpm.1.map(|v| v as i32))
    .bind(max_concurrent.0)
    .bind(max_concurrent.1.map(|v| v as i32))
    .bind(daily_tokens.0)
    .bind(daily_tokens.1)
    .fetch_optional(&state.db)
    .await
    .map_err(|e| name_taken(&e, name.as_deref().unwrap_or_default()).unwrap_or_else(|| e.into()))?
    .ok_or_else(|| ApiError::not_found(format!("no client with id `{id}`")))?;
    tracing::info!(client_id = %id, suspended = row.suspended, "client updated");
    Ok(Json(row.view(state.auth.defaults())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_tells_null_from_absent() {
        let p: PatchClient =
            serde_json::from_str(r#"{"contact": null, "limits": {"rpm": null, "tpm": 5}}"#)
                .unwrap();
        assert_eq!(p.contact, Some(None));
        let l = p.limits.unwrap();
        assert_eq!(l.rpm, Some(None));
        assert_eq!(l.tpm, Some(Some(5)));
        assert_eq!(l.max_concurrent, None);
        assert!(serde_json::from_str::<PatchClient>(r#"{"bogus": 1}"#).is_err());
    }

    #[test]
    fn limits_are_range_checked_with_their_name() {
        let err = valid_limit("rpm", Some(0), MAX_I32).unwrap_err();
        assert!(
            matches!(err, ApiError::BadRequest { param: Some(ref p), .. } if p == "limits.rpm")
        );
        assert!(valid_limit("tpm", Some(MAX_I32 + 1), MAX_I32).is_err());
        assert_eq!(valid_limit("tpm", None, MAX_I32).unwrap(), None);
        assert!(valid_name("   ").is_err());
        assert!(valid_name("a\0b").is_err());
        assert!(valid_contact(Some("x\0")).is_err());
        assert_eq!(valid_contact(Some("  ")).unwrap(), None);
    }
}
