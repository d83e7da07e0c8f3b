//! Terms of Service over HTTP, plus the checks and headers the teacher handlers need:
//! [`check_tos_and_licence`] before serving, [`provenance_headers`] on every teacher response.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::input;
use crate::auth::ClientCtx;
use crate::engine::ModelInfo;
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::Json;
use crate::tos::{self, Acceptance, TosStore, TosVersion};
use crate::AppState;

/// `GET /v1/tos`, `POST /v1/tos/accept` (scope `teacher`; not behind the ToS check itself).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_tos))
        .routes(routes!(accept_tos))
}

/// `POST /admin/tos` (scope `admin`).
pub fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(publish_tos))
}

/// Refuse a teacher request unless the client accepted the current ToS and the model's licence
/// allows this client to distil from it. Returns the acceptance in force.
///
/// 403 `tos_not_accepted` (also while no ToS is published: nothing can have been accepted),
/// 403 `licence_forbids` for `prohibited` models, and for `non_commercial` models when the
/// client declared commercial use.
pub async fn check_tos_and_licence(
    tos: &TosStore,
    ctx: &ClientCtx,
    model: &ModelInfo,
) -> Result<Acceptance> {
    let Some(current) = tos.current().await? else {
        return Err(ApiError::forbidden(
            "tos_not_accepted",
            "no Terms of Service have been published yet, so none can have been accepted",
        ));
    };
    let Some(acceptance) = tos.acceptance(ctx.client_id, &current.version).await? else {
        return Err(ApiError::forbidden(
            "tos_not_accepted",
            format!(
                "accept the Terms of Service version `{}` first (GET /v1/tos, then POST /v1/tos/accept)",
                current.version
            ),
        ));
    };
    if let Some(why) = tos::licence_refusal(&model.licence, acceptance.commercial) {
        return Err(ApiError::forbidden("licence_forbids", why));
    }
    Ok(acceptance)
}

/// `x-teacher-model`, `x-teacher-weights-sha256`, and `x-teacher-attribution` when the licence
/// requires attribution. Values that cannot be header values are left out (logged).
pub fn provenance_headers(model: &ModelInfo) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| match HeaderValue::from_bytes(value.as_bytes())
    {
        Ok(v) => {
            headers.insert(HeaderName::from_static(name), v);
        }
        Err(_) => tracing::warn!(header = name, "value is not a valid header value"),
    };
    put("x-teacher-model", &model.id);
    put("x-teacher-weights-sha256", &model.weights_sha256);
    if let Some(text) = tos::attribution(&model.licence) {
        put("x-teacher-attribution", &text);
    }
    headers
}

/// The Terms of Service in force.
#[utoipa::path(get, path = "/v1/tos", tag = "tos",
    responses(
        (status = 200, description = "The current version", body = TosVersion),
        (status = 404, description = "Nothing published yet", body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn get_tos(State(state): State<AppState>, _ctx: ClientCtx) -> Result<Json<TosVersion>> {
    match state.tos.current().await? {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::not_found(
            "no Terms of Service have been published yet",
        )),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptRequest {
    /// Must be the current version.
    pub version: String,
    /// What the distillation is for.
    pub purpose: String,
    /// The student model being trained.
    pub student_model: String,
    /// Whether the student will be used commercially.
    pub commercial: bool,
}

/// Accept the current Terms of Service for the calling client.
#[utoipa::path(post, path = "/v1/tos/accept", tag = "tos",
    request_body = AcceptRequest,
    responses(
        (status = 200, description = "The stored acceptance", body = Acceptance),
        (status = 400, description = "Not the current version", body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn accept_tos(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Json(req): Json<AcceptRequest>,
) -> Result<Json<Acceptance>> {
    input::stored_text("purpose", &req.purpose, 2000)?;
    input::stored_text("student_model", &req.student_model, 200)?;
    input::stored_text("version", &req.version, 100)?;
    let acceptance = state
        .tos
        .accept(
            ctx.client_id,
            ctx.key_id,
            &req.version,
            &req.purpose,
            &req.student_model,
            req.commercial,
        )
        .await?;
    Ok(Json(acceptance))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// A new, unique version label (e.g. `2025-01`). Published versions are immutable.
    pub version: String,
    pub text: String,
}

/// Publish a new ToS version; every client must accept it before further teacher requests.
#[utoipa::path(post, path = "/admin/tos", tag = "admin",
    request_body = PublishRequest,
    responses(
        (status = 201, description = "Published", body = TosVersion),
        (status = 400, description = "Version exists or empty", body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub(crate) async fn publish_tos(
    State(state): State<AppState>,
    _ctx: ClientCtx,
    Json(req): Json<PublishRequest>,
) -> Result<(StatusCode, Json<TosVersion>)> {
    input::stored_text("version", &req.version, 100)?;
    input::stored_text("text", &req.text, 1_000_000)?;
    let v = state.tos.publish(&req.version, &req.text).await?;
    Ok((StatusCode::CREATED, Json(v)))
}
