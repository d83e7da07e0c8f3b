//! `POST/GET /admin/clients`, `GET/PATCH /admin/clients/{id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{double_option, parse_id, KeyView, List};
use crate::error::{ErrorEnvelope, Result};
use crate::http::extract::Json;
use crate::limits::Limits;
use crate::store::{self, Client, ClientPatch, LimitsPatch, NewClient, NewLimits, Page};
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

impl ClientView {
    fn of(client: Client, defaults: &Limits) -> ClientView {
        ClientView {
            limits: client.limits(defaults),
            overrides: StoredOverrides {
                rpm: client.overrides.rpm,
                tpm: client.overrides.tpm,
                max_concurrent: client.overrides.max_concurrent,
                daily_tokens: client.overrides.daily_tokens,
            },
            id: client.id,
            name: client.name,
            contact: client.contact,
            suspended: client.suspended,
            created_at: client.created_at,
            updated_at: client.updated_at,
            keys: None,
            tokens_today: None,
        }
    }
}

impl From<&LimitOverrides> for NewLimits {
    fn from(l: &LimitOverrides) -> Self {
        NewLimits {
            rpm: l.rpm,
            tpm: l.tpm,
            max_concurrent: l.max_concurrent,
            daily_tokens: l.daily_tokens,
        }
    }
}

impl From<&PatchLimits> for LimitsPatch {
    fn from(l: &PatchLimits) -> Self {
        LimitsPatch {
            rpm: l.rpm,
            tpm: l.tpm,
            max_concurrent: l.max_concurrent,
            daily_tokens: l.daily_tokens,
        }
    }
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
    let new = NewClient {
        name: req.name,
        contact: req.contact,
        limits: (&req.limits).into(),
    };
    let client = store::create_client(&state.db, &new).await?;
    Ok((
        StatusCode::CREATED,
        Json(ClientView::of(client, state.auth.defaults())),
    ))
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
    let page = store::list_clients(&state.db, Page::ALL).await?;
    let defaults = state.auth.defaults();
    Ok(Json(List::new(
        page.clients
            .into_iter()
            .map(|c| ClientView::of(c, defaults))
            .collect(),
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
    let detail = store::client_detail(&state.db, id).await?;
    let mut view = ClientView::of(detail.client, state.auth.defaults());
    view.keys = Some(detail.keys.into_iter().map(KeyView::from).collect());
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
    let patch = ClientPatch {
        name: req.name,
        contact: req.contact,
        suspended: req.suspended,
        limits: req
            .limits
            .as_ref()
            .map(LimitsPatch::from)
            .unwrap_or_default(),
    };
    let client = store::update_client(&state.db, id, &patch).await?;
    Ok(Json(ClientView::of(client, state.auth.defaults())))
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
}
