//! The console's forms. Each checks the session's CSRF token, then calls the admin API's own
//! handler with the same input the API would get, so validation, effects and logs are the
//! API's; the console gate has already opened the request's ledger row, like the admin gate.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::clients::client_page;
use super::pages::audit_page;
use super::session::{self, Session};
use super::ConsoleError;
use crate::auth::ClientCtx;
use crate::error::ApiError;
use crate::http::admin::audit::{self, ExportFormat, ExportParams, VerifyParams};
use crate::http::admin::clients::{self, CreateClient, PatchClient, PatchLimits};
use crate::http::admin::keys::{self, CreateKey};
use crate::http::extract::{Json, Query};
use crate::http::tos::{self, PublishRequest};
use crate::usage::Meter;
use crate::AppState;

type Done = Result<Response, ConsoleError>;

fn see_other(to: &str, cookie: Option<HeaderValue>) -> Response {
    let mut r = Redirect::to(to).into_response();
    if let Some(c) = cookie {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// After the login gate authenticated the key: start the session.
pub async fn login(State(state): State<AppState>, ctx: ClientCtx, headers: HeaderMap) -> Done {
    let cookie = session::start(&state, &ctx, &headers).await?;
    tracing::info!(client_id = %ctx.client_id, key_id = %ctx.key_id, "console sign-in");
    Ok(see_other("/console", Some(cookie)))
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

pub async fn logout(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let cookie = session::end(&state, &session, &headers).await?;
    Ok(see_other("/console/login", Some(cookie)))
}

#[derive(Deserialize)]
pub struct NewClient {
    csrf: String,
    name: String,
    #[serde(default)]
    contact: String,
}

pub async fn create_client(
    State(state): State<AppState>,
    session: Session,
    Form(f): Form<NewClient>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let req = CreateClient {
        name: f.name,
        contact: Some(f.contact),
        limits: Default::default(),
    };
    let (_, Json(view)) = clients::create_client(State(state), Json(req)).await?;
    Ok(see_other(&format!("/console/clients/{}", view.id), None))
}

#[derive(Deserialize)]
pub struct NewKey {
    csrf: String,
    teacher: Option<String>,
    admin: Option<String>,
}

/// Issues a key and shows it on this one response (never again: only its hash is stored, and
/// the ledger keeps no body of this response).
pub async fn issue_key(
    State(state): State<AppState>,
    session: Session,
    meter: Meter,
    Path(id): Path<String>,
    Form(f): Form<NewKey>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let mut scopes = Vec::new();
    if f.teacher.is_some() {
        scopes.push("teacher".to_string());
    }
    if f.admin.is_some() {
        scopes.push("admin".to_string());
    }
    let req = CreateKey {
        scopes,
        expires_at: None,
    };
    let (_, Json(created)) =
        keys::issue_key(State(state.clone()), meter, Path(id.clone()), Json(req)).await?;
    Ok(client_page(&state, &session, id, None, Some(created.key))
        .await?
        .into_response())
}

pub async fn revoke_key(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let Json(key) = keys::revoke_key(State(state), Path(id)).await?;
    Ok(see_other(
        &format!("/console/clients/{}", key.client_id),
        None,
    ))
}

#[derive(Deserialize)]
pub struct LimitsForm {
    csrf: String,
    rpm: String,
    tpm: String,
    max_concurrent: String,
    daily_tokens: String,
}

/// A limit field: blank goes back to the configured default, a number overrides it.
fn limit_field(name: &str, raw: &str) -> Result<Option<Option<i64>>, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(Some(None));
    }
    raw.parse::<i64>().map(|v| Some(Some(v))).map_err(|_| {
        ApiError::bad_param(
            &format!("limits.{name}"),
            format!("`{name}` must be a whole number, or blank for the default"),
        )
    })
}

fn patch(limits: Option<PatchLimits>, suspended: Option<bool>) -> PatchClient {
    PatchClient {
        name: None,
        contact: None,
        suspended,
        limits,
    }
}

pub async fn limits(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(f): Form<LimitsForm>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let limits = PatchLimits {
        rpm: limit_field("rpm", &f.rpm)?,
        tpm: limit_field("tpm", &f.tpm)?,
        max_concurrent: limit_field("max_concurrent", &f.max_concurrent)?,
        daily_tokens: limit_field("daily_tokens", &f.daily_tokens)?,
    };
    let req = patch(Some(limits), None);
    clients::patch_client(State(state), Path(id.clone()), Json(req)).await?;
    Ok(see_other(&format!("/console/clients/{id}"), None))
}

#[derive(Deserialize)]
pub struct SuspensionForm {
    csrf: String,
    suspended: bool,
}

/// Suspend or resume: effective on the client's next request (the API's own PATCH).
pub async fn suspension(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(f): Form<SuspensionForm>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let req = patch(None, Some(f.suspended));
    clients::patch_client(State(state), Path(id.clone()), Json(req)).await?;
    Ok(see_other(&format!("/console/clients/{id}"), None))
}

#[derive(Deserialize)]
pub struct RangeForm {
    csrf: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

fn some(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

pub async fn verify(
    State(state): State<AppState>,
    session: Session,
    Form(f): Form<RangeForm>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let params = VerifyParams {
        from: some(f.from),
        to: some(f.to),
    };
    let label = match (&params.from, &params.to) {
        (None, None) => "the whole ledger".to_string(),
        (a, b) => format!(
            "{} to {}",
            a.as_deref().unwrap_or("the start"),
            b.as_deref().unwrap_or("now")
        ),
    };
    let ctx = session.ctx.clone();
    let Json(report) = audit::verify(State(state.clone()), ctx, Query(params)).await?;
    Ok(audit_page(&state, &session, Some((report, label)))
        .await?
        .into_response())
}

#[derive(Deserialize)]
pub struct ExportForm {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    format: Option<ExportFormat>,
}

/// The API's streamed export, as a download.
pub async fn export(
    State(state): State<AppState>,
    session: Session,
    Query(f): Query<ExportForm>,
) -> Done {
    let format = f.format.unwrap_or_default();
    let params = ExportParams {
        from: some(f.from),
        to: some(f.to),
        format: Some(format),
    };
    let mut response = audit::export(State(state), session.ctx.clone(), Query(params)).await?;
    let name = match format {
        ExportFormat::Jsonl => "attachment; filename=\"teachd-ledger.jsonl\"",
        ExportFormat::Csv => "attachment; filename=\"teachd-ledger.csv\"",
    };
    response
        .headers_mut()
        .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
    Ok(response)
}

#[derive(Deserialize)]
pub struct TosForm {
    csrf: String,
    version: String,
    text: String,
}

pub async fn publish_tos(
    State(state): State<AppState>,
    session: Session,
    Form(f): Form<TosForm>,
) -> Done {
    session.check_csrf(&f.csrf)?;
    let req = PublishRequest {
        version: f.version,
        text: f.text,
    };
    tos::publish_tos(State(state), session.ctx.clone(), Json(req)).await?;
    Ok(see_other("/console/audit", None))
}
