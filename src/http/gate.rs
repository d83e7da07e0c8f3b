//! The gate in front of teacher and admin routes. Cheap checks first, so that a refused request
//! costs the server almost nothing:
//!
//! 1. authenticate from the headers (401/403; 503 `service_unavailable` while the database is
//!    down) — the body has not been read;
//! 2. open the request's ledger [`Row`] and usage [`Meter`];
//! 3. per-client limits: rpm and `max_concurrent` (teacher scope; 429);
//! 4. the ledger must be committing (503 `ledger_unavailable`, before any work);
//! 5. a caller-chosen `x-request-id` must be new for this client (400 `duplicate_request_id`);
//! 6. read the body, bounded in size (413) and time (`server.body_read_timeout_secs`: 408);
//! 7. a server-wide slot (`server.max_in_flight`; 503 `overloaded`);
//! 8. the handler, under `server.request_timeout_secs`, with panics caught (500 with a row);
//! 9. rate-limit headers, then the row is committed (see [`crate::http::ledger_layer`]). The
//!    client's concurrency slot and the server slot are held until the body has been sent.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{ClientCtx, Scope};
use crate::db::DbAdmit;
use crate::error::ApiError;
use crate::http::ledger_layer::Row;
use crate::http::CallerRequestId;
use crate::limits::Admission;
use crate::usage::Meter;
use crate::AppState;

/// Middleware for /v1 teacher routes (scope `teacher`).
pub async fn teacher_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    gate(state, &[Scope::Teacher], req, next).await
}

/// Middleware for /admin routes (scope `admin`). No rate limits: admins are few and trusted.
pub async fn admin_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    gate(state, &[Scope::Admin], req, next).await
}

/// Middleware for the transparency log's reads (/v1/ledger): scope `teacher` (with its
/// per-client limits) or `admin` (without, as on /admin).
pub async fn ledger_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    gate(state, &[Scope::Teacher, Scope::Admin], req, next).await
}

/// The gate for a key holding one of `scopes`. Per-client limits apply to teacher keys on
/// routes open to the teacher scope.
async fn gate(state: AppState, scopes: &[Scope], req: Request, next: Next) -> Response {
    let probing = match state.db_health.admit() {
        DbAdmit::Go => false,
        DbAdmit::Probe => true,
        DbAdmit::Down => return database_down().into_response(),
    };
    let ctx = match authenticate(&state, req.headers(), scopes).await {
        Ok(ctx) => {
            state.db_health.up();
            ctx
        }
        Err(err) => {
            if matches!(err, ApiError::ServiceUnavailable(_)) {
                state.db_health.down();
            } else if probing {
                state.db_health.release_probe();
            }
            return err.into_response();
        }
    };
    let (row, meter) = Row::open(&state, &ctx, &req).await;
    let admission = if scopes.contains(&Scope::Teacher) && ctx.has_scope(Scope::Teacher) {
        match state.limits.admit(ctx.client_id, &ctx.limits) {
            Ok(admission) => Some(admission),
            Err(err) => return row.refuse(err).await,
        }
    } else {
        None
    };
    admitted(&state, &ctx, (row, meter), req, next, admission).await
}

/// The caller, holding one of `scopes`. With `server.disable_auth`, teacher requests run as
/// the anonymous client.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    scopes: &[Scope],
) -> Result<ClientCtx, ApiError> {
    let ctx = state.auth.authenticate(headers, scopes).await?;
    tracing::Span::current().record("client_id", tracing::field::display(ctx.client_id));
    Ok(ctx)
}

/// Steps 2 and 4-9 of the module docs for a caller authenticated elsewhere (e.g. a console
/// session), admin-style: no per-client limits.
pub async fn run_admitted(state: &AppState, ctx: &ClientCtx, req: Request, next: Next) -> Response {
    let opened = Row::open(state, ctx, &req).await;
    admitted(state, ctx, opened, req, next, None).await
}

/// Steps 4-9 of the module docs for a request whose caller passed its per-client checks.
async fn admitted(
    state: &AppState,
    ctx: &ClientCtx,
    (mut row, meter): (Row, Meter),
    mut req: Request,
    next: Next,
    admission: Option<Admission>,
) -> Response {
    req.extensions_mut().insert(ctx.clone());
    if !state.ledger.is_healthy() {
        // Refusing costs one attempted row, which also probes whether the ledger is back.
        return row.refuse(ApiError::LedgerUnavailable).await;
    }
    if let Some(CallerRequestId(id)) = req.extensions().get::<CallerRequestId>().cloned() {
        match state.ledger.request_id_used(ctx.client_id, &id).await {
            Ok(false) => {}
            // No row: the ledger already holds one under this id, and a second cannot exist.
            Ok(true) => return duplicate_request_id(&id),
            Err(err) => return row.refuse(err.into()).await,
        }
    }
    let (parts, body) = req.into_parts();
    let limit = body_limit(state, &parts);
    let bytes = match read_body(state, limit, &parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(err) => return row.refuse(err).await,
    };
    row.set_request_body(&bytes);
    let Ok(slot) = state.in_flight.clone().try_acquire_owned() else {
        return row
            .refuse(ApiError::Overloaded(
                "too many requests in flight; retry shortly".into(),
            ))
            .await;
    };
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(meter);

    let timeout = Duration::from_secs(state.config.server.request_timeout_secs);
    let handler = std::panic::AssertUnwindSafe(next.run(req)).catch_unwind();
    let response = match tokio::time::timeout(timeout, handler).await {
        Ok(Ok(response)) => response,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ApiError::Internal(anyhow::anyhow!("handler panicked: {what}")).into_response()
        }
        Err(_) => {
            // Answer now; the row is written once the work that was running has ended.
            let err = ApiError::Overloaded(format!(
                "the request did not finish within {} s",
                timeout.as_secs()
            ));
            row.abandon(err.status().as_u16() as i16, "request_timeout");
            return err.into_response();
        }
    };
    if crate::error::code_of(&response) == Some("service_unavailable") {
        state.db_health.down();
    }
    // After the row: a buffered response's bill is settled by now, so the headers show what
    // is really left (a stream's show the reservation, settled when it ends).
    let mut response = row.finish(response).await;
    if let Some(admission) = &admission {
        state.limits.write_headers(
            ctx.client_id,
            &ctx.limits,
            admission,
            response.headers_mut(),
        );
    }
    hold_until_body_ends(response, (admission, slot))
}

fn database_down() -> ApiError {
    ApiError::ServiceUnavailable("the database is unavailable; retry shortly".into())
}

fn duplicate_request_id(id: &str) -> Response {
    ApiError::BadRequest {
        message: format!("the request id `{id}` was already used; send a new x-request-id"),
        param: None,
        code: Some("duplicate_request_id"),
    }
    .into_response()
}

/// The body size limit of a request: `server.body_limit_bytes`, except for file uploads
/// (`batch.max_file_bytes`).
fn body_limit(state: &AppState, parts: &axum::http::request::Parts) -> usize {
    let upload = parts.method == axum::http::Method::POST
        && parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .is_some_and(|p| p.as_str() == crate::batch::files::UPLOAD_ROUTE);
    if upload {
        state.config.batch.max_file_bytes
    } else {
        state.config.server.body_limit_bytes
    }
}

/// How much of an oversized body is read and thrown away before the 413 is sent (see
/// [`read_body`]): at least this much, or the limit itself when that is larger.
const DRAIN_MIN_BYTES: usize = 16 * 1024 * 1024;

/// The body, bounded in size and in time (a slow upload cannot hold a slot for long).
///
/// An oversized body is refused with 413 without being kept, but its remaining bytes are
/// still read and thrown away (up to `max(limit, 16 MiB)`, within the same time limit) before
/// the answer goes out. Otherwise the server would close the connection with the client's
/// bytes unread, the kernel would answer them with a reset, and a client still writing its
/// body would see a broken pipe instead of the 413 (the lingering close that nginx does for the
/// same reason). A body past the drain cap still ends in a closed connection.
async fn read_body(
    state: &AppState,
    limit: usize,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::PayloadTooLarge {
        message: format!("request body is over the size limit of {limit} bytes"),
        code: Some("body_too_large"),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let timeout = Duration::from_secs(state.config.server.body_read_timeout_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let drain_cap = limit.max(DRAIN_MIN_BYTES);
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > limit as u64) {
        drain(&mut stream, drain_cap, deadline).await;
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(chunk)) => {
                chunk.map_err(|_| ApiError::bad_request("could not read the request body"))?
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body was not received within {} s",
                    timeout.as_secs()
                )))
            }
        };
        if buf.len() + chunk.len() > limit {
            drain(&mut stream, drain_cap, deadline).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
}

/// Reads and discards what is left of a body, up to `cap` bytes or until `deadline`.
async fn drain(
    stream: &mut axum::body::BodyDataStream,
    cap: usize,
    deadline: tokio::time::Instant,
) {
    let mut seen = 0usize;
    while seen < cap {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => seen += chunk.len(),
            _ => break,
        }
    }
}

/// Keeps the client's concurrency slot and the server slot until the body is sent: a streamed
/// generation is in flight until its last event, not until its headers leave.
fn hold_until_body_ends(
    response: Response,
    slots: (Option<Admission>, OwnedSemaphorePermit),
) -> Response {
    if response.body().size_hint().exact().is_some() {
        return response; // a buffered body: the work is done, the slots drop here
    }
    let (parts, body) = response.into_parts();
    let slots = Arc::new(slots);
    let stream = body.into_data_stream().map(move |chunk| {
        let _held = &slots;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Runs engine work for `meter`'s request to its end even if the request is dropped meanwhile
/// (the client went away, or the request timed out): started work is finished, recorded and
/// paid for, never silently wasted. `work` gets a meter clone to record what it produced.
pub async fn detached<T, F, Fut>(meter: &Meter, work: F) -> Result<T, ApiError>
where
    F: FnOnce(Meter) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    T: Send + 'static,
{
    let handle = tokio::spawn(crate::error::in_request_scope(work(meter.clone())));
    match handle.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ApiError::Internal(anyhow::anyhow!(
            "engine work cancelled: {e}"
        ))),
    }
}

/// A signal that fires when the future awaiting it is dropped: work spawned for a request (a
/// generation) watches it to stop once nobody waits for its result any more.
pub struct Abandoned(tokio::sync::watch::Receiver<()>);

impl Abandoned {
    /// True once the request that started the work is gone.
    pub fn is_set(&self) -> bool {
        self.0.has_changed().is_err()
    }
}

/// The sender half: dropping it sets the [`Abandoned`] signal.
pub struct AbandonOnDrop(#[allow(dead_code)] tokio::sync::watch::Sender<()>);

pub fn abandon_signal() -> (AbandonOnDrop, Abandoned) {
    let (tx, rx) = tokio::sync::watch::channel(());
    (AbandonOnDrop(tx), Abandoned(rx))
}

/// Compile-time check: the gate's future is `Send` (axum needs it; the error otherwise points
/// at the router, far from the cause).
#[allow(dead_code)]
fn _gate_is_send(state: AppState, req: Request, next: Next) {
    fn s<T: Send>(_: &T) {}
    let f = gate(state, &[Scope::Teacher], req, next);
    s(&f);
}
