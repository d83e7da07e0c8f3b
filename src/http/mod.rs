//! HTTP surface: one module per resource, each exposing `routes()`; routes and their OpenAPI
//! entries are registered together (utoipa_axum).
//!
//! Teacher routes (/v1) sit behind [`gate::teacher_gate`] (scope `teacher`, per-client limits),
//! admin routes behind [`gate::admin_gate`] (scope `admin`); /healthz, /readyz, /openapi.json
//! and /docs are open; /console (when enabled) is [`crate::console`]'s.

pub mod access;
pub mod admin;
pub mod chat;
pub mod completions;
pub mod extract;
pub mod gate;
mod generation;
pub mod health;
pub mod input;
pub mod judgments;
pub mod ledger_layer;
pub mod logprobs;
pub mod metrics;
pub mod models;
pub mod sse;
mod tokenize;
pub mod tos;
pub mod transparency;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
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
        .merge(tos::routes())
        .merge(crate::batch::routes());
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

/// The transparency log's reads (teacher or admin scope), behind their gate when `state` is
/// given.
fn ledger_routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    match state {
        Some(state) => {
            transparency::routes().route_layer(from_fn_with_state(state.clone(), gate::ledger_gate))
        }
        None => transparency::routes(),
    }
}

fn api_routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(teacher_routes(state))
        .merge(ledger_routes(state))
        .merge(admin_routes(state))
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
    router_with(state, Router::new())
}

/// [`router`] with more routes of the caller's, which get the same outer layers (request ids,
/// metrics, panics caught, sensitive headers).
pub fn router_with(state: AppState, extra: Router<AppState>) -> Router {
    let (api, mut spec) = api_routes(Some(&state)).split_for_parts();
    document_layer_errors(&mut spec);
    let spec = Arc::new(spec);
    let spec_json = serde_json::to_string_pretty(&*spec).unwrap_or_default();
    Router::new()
        .merge(api)
        .merge(crate::console::routes(&state))
        .merge(extra)
        .merge(health::routes(&state))
        .route(
            "/openapi.json",
            axum::routing::get(move || async move {
                ([("content-type", "application/json")], spec_json)
            }),
        )
        // Swagger UI's files are embedded (vendored); its online validator badge, which would
        // send the spec's URL to validator.swagger.io, is off: /docs works air-gapped.
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .url("/docs/openapi.json", (*spec).clone())
                .config(utoipa_swagger_ui::Config::default().validator_url("none")),
        )
        // Every matched route labels its metrics with its template (never the raw path).
        .route_layer(middleware::from_fn(label_route))
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
        // Bodies are read (bounded in size and time) by the gate; this bounds the extractors
        // of the open routes too.
        .layer(DefaultBodyLimit::max(state.config.server.body_limit_bytes))
        // A panic anywhere outside the gate (which records its own) is still a 500 envelope.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal(anyhow::anyhow!("panic outside a handler")).into_response()
            },
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

/// The id of the request, echoed from the caller when valid.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Present when the caller chose the request id (`x-request-id`): the gate then checks that the
/// client has not used it before.
#[derive(Clone, Debug)]
pub struct CallerRequestId(pub String);

/// The route template a request matched, filled in by [`label_route`] for the metrics.
#[derive(Clone, Default)]
struct RouteLabel(Arc<std::sync::OnceLock<String>>);

async fn label_route(req: Request, next: Next) -> Response {
    if let (Some(label), Some(path)) = (
        req.extensions().get::<RouteLabel>(),
        req.extensions().get::<axum::extract::MatchedPath>(),
    ) {
        let _ = label.0.set(path.as_str().to_string());
    }
    next.run(req).await
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Echo a valid caller `x-request-id`, else mint a UUID; every response carries it, and errors
/// built below see it through the task-local. Counts the request in the metrics under its route
/// template (`unmatched` for any path no route matched, so the label set stays bounded).
async fn request_id(
    State(metrics): State<Arc<metrics::Metrics>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let caller = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_string);
    let id = caller
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    if let Some(caller) = caller {
        req.extensions_mut().insert(CallerRequestId(caller));
    }
    let label = RouteLabel::default();
    req.extensions_mut().insert(label.clone());
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path(), client_id = tracing::field::Empty);
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
    let route = label.0.get().map_or("unmatched", String::as_str);
    metrics.observe(route, resp.status().as_u16(), started.elapsed());
    resp
}
