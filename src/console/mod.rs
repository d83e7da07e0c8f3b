//! The admin console at `/console` (issue 15): server-rendered pages (askama templates in
//! `templates/`, the stylesheet embedded with `include_str!`), charts as server-side SVG
//! (plotters), nothing loaded from another host (the pages' Content-Security-Policy forbids it).
//!
//! Sign-in takes an admin key and starts a server-side session ([`session`]). Every console
//! request after that goes through [`gate`]: the session is looked up with its key and client
//! (so a revocation or suspension ends it at once), then the request runs through the same
//! steps as an admin API request ([`crate::http::gate::run_admitted`]): one ledger row per
//! request, bounded body, timeout, panics caught. Actions call the admin API's own handlers
//! ([`actions`]), so validation, effects and logging are the API's.
//!
//! Files: `session` (cookie, session table, CSRF), `pages` (overview, audit) and `clients`
//! (the clients list, a client), `actions`
//! (the forms), `data` and `lists` (the queries behind the pages: rollups for ranges, raw rows
//! for recent events), `charts` (plotters SVG).

mod actions;
mod charts;
mod clients;
mod data;
mod lists;
mod pages;
pub mod session;

use askama::Template;
use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};

use crate::error::ApiError;
use crate::AppState;

const CSS: &str = include_str!("assets/console.css");

/// Nothing but this server: no script at all, styles and images from here only.
const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (empty when `console.enabled` is off).
pub fn routes(state: &AppState) -> Router<AppState> {
    if !state.config.console.enabled {
        return Router::new();
    }
    let signed_in = Router::new()
        .route("/console", get(pages::overview))
        .route(
            "/console/clients",
            get(clients::clients).post(actions::create_client),
        )
        .route("/console/clients/{id}", get(clients::client))
        .route("/console/clients/{id}/keys", post(actions::issue_key))
        .route("/console/clients/{id}/limits", post(actions::limits))
        .route(
            "/console/clients/{id}/suspension",
            post(actions::suspension),
        )
        .route("/console/keys/{id}/revoke", post(actions::revoke_key))
        .route("/console/audit", get(pages::audit))
        .route("/console/audit/verify", post(actions::verify))
        .route("/console/audit/export", get(actions::export))
        .route("/console/tos", post(actions::publish_tos))
        .route("/console/logout", post(actions::logout))
        .route_layer(from_fn_with_state(state.clone(), gate));
    Router::new()
        .route(
            "/console/login",
            get(login_page)
                .post(actions::login.layer(from_fn_with_state(state.clone(), login_gate))),
        )
        .route("/console/assets/console.css", get(css))
        .merge(signed_in)
        .layer(axum::middleware::map_response(secure_headers))
}

async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// Signed-in routes: the session, then the admin API's steps (ledger row included).
async fn gate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let session = match session::lookup(&state, req.headers()).await {
        Ok(Some(s)) => s,
        Ok(None) if req.method() == Method::GET => {
            return Redirect::to("/console/login").into_response()
        }
        Ok(None) => {
            return ConsoleError::Api(ApiError::Unauthorized(
                "not signed in, or the session has ended".into(),
            ))
            .into_response()
        }
        Err(e) => return ConsoleError::Api(e).into_response(),
    };
    let ctx = session.ctx.clone();
    req.extensions_mut().insert(session);
    crate::http::gate::run_admitted(&state, &ctx, req, next).await
}

#[derive(serde::Deserialize)]
struct LoginForm {
    key: String,
}

/// Sign-in: the key is authenticated exactly as the admin API does; a signed-in request then
/// runs (and is recorded) like every other console request. The handler gets an empty body:
/// the key never reaches the ledger row's body hash or the stored bodies.
async fn login_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let probe = Request::from_parts(parts.clone(), body);
    let form = match Form::<LoginForm>::from_request(probe, &state).await {
        Ok(Form(f)) => f,
        Err(_) => return login_failed(StatusCode::BAD_REQUEST, "enter an admin key"),
    };
    let ctx = match session::authenticate_key(&state, &form.key).await {
        Ok(ctx) => ctx,
        Err(e) if e.status().is_server_error() => return ConsoleError::Api(e).into_response(),
        Err(e) => return login_failed(e.status(), &e.to_string()),
    };
    let req = Request::from_parts(parts, Body::empty());
    crate::http::gate::run_admitted(&state, &ctx, req, next).await
}

#[derive(Template)]
#[template(path = "login.html", config = "src/console/askama.toml")]
struct LoginPage<'a> {
    error: Option<&'a str>,
}

async fn login_page() -> Response {
    render(LoginPage { error: None }).into_response()
}

fn login_failed(status: StatusCode, why: &str) -> Response {
    (status, render(LoginPage { error: Some(why) })).into_response()
}

/// The header of every signed-in page.
pub struct Nav {
    pub csrf: String,
    pub admin: String,
    pub active: &'static str,
}

impl Nav {
    pub fn new(session: &session::Session, active: &'static str) -> Nav {
        Nav {
            csrf: session.csrf.clone(),
            admin: session.ctx.client_name.clone(),
            active,
        }
    }
}

/// A page, or the error page.
pub fn render<T: Template>(page: T) -> Result<Html<String>, ConsoleError> {
    page.render()
        .map(Html)
        .map_err(|e| ConsoleError::Api(ApiError::Internal(anyhow::anyhow!("template: {e}"))))
}

#[derive(Template)]
#[template(path = "error.html", config = "src/console/askama.toml")]
struct ErrorPage {
    status: u16,
    message: String,
}

/// An error as a page: the API's status and message (opaque for 5xx, as in the API).
#[derive(Debug)]
pub enum ConsoleError {
    Api(ApiError),
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        ConsoleError::Api(e)
    }
}

impl From<sqlx::Error> for ConsoleError {
    fn from(e: sqlx::Error) -> Self {
        ConsoleError::Api(e.into())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let ConsoleError::Api(err) = self;
        let status = err.status();
        let message = if status.is_server_error() {
            tracing::error!(error = ?err, "console request failed");
            let id = crate::error::current_request_id().unwrap_or_default();
            format!("the server could not complete this request (request id {id})")
        } else {
            err.to_string()
        };
        let page = ErrorPage {
            status: status.as_u16(),
            message,
        };
        let body = page.render().unwrap_or_else(|_| "error".into());
        (status, Html(body)).into_response()
    }
}
