//! HTTP surface: one module per resource, each exposing `routes()`; routes and their OpenAPI
//! entries are registered together (utoipa_axum).
//!
//! Teacher routes (/v1) sit behind [`gate::teacher_gate`] (scope `teacher`, per-client limits),
//! admin routes behind [`gate::admin_gate`] (scope `admin`); /healthz, /readyz, /openapi.json
//! and /docs are open.

pub mod admin;
mod arrow;
mod chat;
pub mod common;
mod completions;
pub mod de;
pub mod gate;
mod generation;
pub mod health;
mod judgments;
pub mod ledger_layer;
pub mod logprobs;
pub mod metrics;
pub mod models;
mod tokenize;
pub mod tos;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::error::{ApiError, REQUEST_ID};
use crate::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "teachd",
        description = "Teacher LLMs for distillation: teacher-forced logprobs, generations with logprobs and LLM-as-a-judge scores, behind per-client keys, rate limits and a tamper-evident usage ledger.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    tags((name = "teacher", description = "Teacher endpoints (scope `teacher`)"),
         (name = "admin", description = "Admin endpoints (scope `admin`)"),
         (name = "ops", description = "Health and metrics"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tk_…")
                    .build(),
            ),
        );
    }
}

/// The teacher endpoints (scope `teacher`), behind their gate when `state` is given.
fn teacher_routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    let routes = OpenApiRouter::new()
        .merge(models::routes())
        .merge(logprobs::routes())
        .merge(tokenize::routes())
        .merge(completions::routes())
        .merge(chat::routes())
        .merge(judgments::routes())
        .merge(tos::routes());
    match state {
        Some(state) => routes.route_layer(from_fn_with_state(state.clone(), gate::teacher_gate)),
        None => routes,
    }
}

/// The admin endpoints (scope `admin`), behind their gate when `state` is given.
fn admin_routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    match state {
        Some(state) => {
            admin::routes().route_layer(from_fn_with_state(state.clone(), gate::admin_gate))
        }
        None => admin::routes(),
    }
}

fn api_routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(teacher_routes(state))
        .merge(admin_routes(state))
}

/// The ToS, usage and audit routes without any gate (the ledger tests wrap them in their own).
pub fn ledger_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(tos::routes())
        .merge(tos::admin_routes())
        .merge(admin::usage::routes())
        .merge(admin::audit::routes())
}

/// The OpenAPI document, as `teachd openapi` prints it and `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut spec = api_routes(None).split_for_parts().1;
    document_layer_errors(&mut spec);
    spec
}

/// Document, on every operation, the errors that the layers in front of its handler answer
/// (the handlers' own `responses` list what they add): the gate's 401/403 (and 429 on /v1
/// routes: rate limits, quota), admission's 503 (overloaded), and 413 where there is a body.
fn document_layer_errors(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                    .build(),
            )
            .build()
    };
    for (path, item) in spec.paths.paths.iter_mut() {
        let teacher = path.starts_with("/v1/");
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let mut add = vec![
                ("401", "Missing, malformed, unknown, revoked or expired key"),
                (
                    "403",
                    "Wrong scope, suspended client, ToS not accepted or licence forbids",
                ),
                ("503", "Overloaded, or the usage ledger is unavailable"),
            ];
            if teacher {
                add.push(("429", "Rate limit (retryable) or daily quota spent"));
            }
            if op.request_body.is_some() {
                add.push(("413", "Body over the size limit"));
            }
            for (status, description) in add {
                op.responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

pub fn router(state: AppState) -> Router {
    let (api, mut spec) = api_routes(Some(&state)).split_for_parts();
    document_layer_errors(&mut spec);
    let spec = Arc::new(spec);
    let spec_json = serde_json::to_string_pretty(&*spec).unwrap_or_default();
    let in_flight = Arc::new(Semaphore::new(state.config.server.max_in_flight));
    let timeout = Duration::from_secs(state.config.server.request_timeout_secs);
    Router::new()
        .merge(api)
        .merge(health::routes())
        .route(
            "/openapi.json",
            axum::routing::get(move || async move {
                ([("content-type", "application/json")], spec_json)
            }),
        )
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/docs/openapi.json", (*spec).clone()))
        .fallback(|| async { ApiError::not_found("no such route") })
        // 405 with the envelope; axum adds the `Allow` header.
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                ApiError::BadRequest {
                    message: "method not allowed on this route".into(),
                    param: None,
                    code: Some("method_not_allowed"),
                },
            )
        })
        .layer(DefaultBodyLimit::max(state.config.server.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            (in_flight, timeout),
            admission,
        ))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            request_id,
        ))
        // Keys must never reach a log line, whatever tracing layer is added around this.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .with_state(state)
}

/// Global load shedding and the per-request timeout (the handler, not a stream's body).
async fn admission(
    State((in_flight, timeout)): State<(Arc<Semaphore>, Duration)>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = in_flight.try_acquire() else {
        return ApiError::Overloaded("too many requests in flight; retry shortly".into())
            .into_response();
    };
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Overloaded(format!(
            "the request did not finish within {} s",
            timeout.as_secs()
        ))
        .into_response(),
    }
}

/// The id of the request, echoed from the caller when valid.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

fn valid_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Echo a valid caller `x-request-id`, else mint a UUID; every response carries it, and errors
/// built below see it through the task-local.
async fn request_id(
    State(metrics): State<Arc<metrics::Metrics>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = REQUEST_ID
        .scope(
            id.clone(),
            tracing::Instrument::instrument(next.run(req), span),
        )
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    metrics.observe(&path, resp.status().as_u16(), started.elapsed());
    resp
}
