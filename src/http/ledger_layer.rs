//! The ledger wrapper: every authenticated request leaves exactly one ledger row.
//!
//! The auth gate calls [`record_usage`] (or [`record_with`], to also log its own refusals such
//! as 429s) once it knows the [`ClientCtx`]. The wrapper buffers and hashes the request body,
//! runs the request, then:
//!
//! * **Buffered responses** (JSON, errors, Arrow): the body is hashed and the row committed
//!   *before* the response leaves. If the commit fails the caller gets 503 `ledger_unavailable`
//!   and none of the output: there is never a response without its row.
//! * **Streamed responses** (`text/event-stream`, or any response carrying [`StreamedBody`],
//!   like the audit export): the bytes flow as they are produced while being hashed; the last
//!   chunk (for SSE, `data: [DONE]`) is held back until the row, with the hash of every byte and
//!   the final usage, is committed. If that commit fails, an SSE stream ends with an error event
//!   instead of its last chunk, and any other stream is aborted, so the client never sees a
//!   complete response without a row. A stream only starts while the ledger is healthy.
//! * **Dropped requests** (client went away before the response): the row is still written, with
//!   status 499 and the hash of whatever was produced.
//!
//! Rows for requests refused with 503 `ledger_unavailable` are the only ones that do not exist;
//! a COMMIT whose reply was lost may leave a row for a request that was answered 503.

use std::future::Future;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::ClientCtx;
use crate::error::{current_request_id, ApiError, ErrorEnvelope, REQUEST_ID};
use crate::ledger::chain::to_db_precision;
use crate::ledger::{Bodies, Ledger, LedgerError, UsageEvent};
use crate::usage::Usage;
use crate::AppState;

/// Put this in a response's extensions to have it streamed (hashed on the fly, row committed at
/// the end) instead of buffered. `text/event-stream` responses are detected without it.
#[derive(Clone, Copy, Debug)]
pub struct StreamedBody;

/// Status recorded for a request whose client went away before the response was complete.
pub const STATUS_CLIENT_CLOSED: i16 = 499;

const REQUEST_ID_HEADER: &str = "x-request-id";

/// Run `next` under the ledger (see the module docs).
pub async fn record_usage(state: &AppState, ctx: &ClientCtx, req: Request, next: Next) -> Response {
    record_with(state, ctx, req, |req| next.run(req)).await
}

/// Like [`record_usage`] with any inner service: the gate can put its admission checks (limits,
/// scope) inside `inner` so that their refusals are recorded too.
pub async fn record_with<F, Fut>(
    state: &AppState,
    ctx: &ClientCtx,
    req: Request,
    inner: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let request_id = current_request_id()
        .or_else(|| {
            req.headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| valid_request_id(v))
                .map(str::to_string)
        })
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    let mut response = if current_request_id().is_some() {
        record_inner(state, ctx, request_id.clone(), req, inner).await
    } else {
        REQUEST_ID
            .scope(
                request_id.clone(),
                record_inner(state, ctx, request_id.clone(), req, inner),
            )
            .await
    };
    if !response.headers().contains_key(REQUEST_ID_HEADER) {
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
    }
    response
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Text as Postgres accepts it (no NUL), bounded.
fn clean(s: &str) -> String {
    s.chars().filter(|c| *c != '\0').take(256).collect()
}

async fn record_inner<F, Fut>(
    state: &AppState,
    ctx: &ClientCtx,
    request_id: String,
    req: Request,
    inner: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let mut event = UsageEvent {
        request_id,
        ts: to_db_precision(Utc::now()),
        client_id: ctx.client_id,
        key_id: ctx.key_id,
        method: req.method().as_str().to_string(),
        endpoint: clean(&endpoint),
        model: None,
        status: STATUS_CLIENT_CLOSED,
        error_code: None,
        prompt_tokens: 0,
        scored_tokens: 0,
        generated_tokens: 0,
        judgments: 0,
        top_k: None,
        latency_ms: 0.0,
        request_sha256: [0; 32],
        response_sha256: Sha256::digest(b"").into(),
        tos_version: state.tos.current_version_for_ledger().await,
        weights_sha256: None,
    };

    let (parts, body) = req.into_parts();
    let limit = state.config.server.body_limit_bytes;
    let (request_bytes, response) = match read_limited(body, limit).await {
        Ok(bytes) => {
            event.request_sha256 = Sha256::digest(&bytes).into();
            let req = Request::from_parts(parts, Body::from(bytes.clone()));
            let mut guard = RowGuard::new(state.ledger.clone(), event, started);
            let response = inner(req).await;
            event = guard.disarm();
            (bytes, response)
        }
        Err(too_large) => {
            event.request_sha256 = Sha256::digest(b"").into();
            let e = if too_large {
                ApiError::PayloadTooLarge {
                    message: "request body is over the size limit".into(),
                    code: Some("body_too_large"),
                }
            } else {
                ApiError::bad_request("could not read the request body")
            };
            (Bytes::new(), e.into_response())
        }
    };

    let (parts, body) = response.into_parts();
    event.status = parts.status.as_u16() as i16;
    if let Some(usage) = parts.extensions.get::<Usage>() {
        apply_usage(&mut event, usage);
    }

    let streamed = parts.extensions.get::<StreamedBody>().is_some() || is_sse(&parts.headers);
    if streamed {
        if !state.ledger.is_healthy() {
            return ApiError::LedgerUnavailable.into_response();
        }
        let sse = is_sse(&parts.headers);
        let body = stream_through_ledger(state.ledger.clone(), event, started, body, sse);
        return Response::from_parts(parts, body);
    }

    let response_bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(err) => {
            tracing::error!(error = %err, "response body failed");
            event.status = 500;
            Bytes::new()
        }
    };
    event.response_sha256 = Sha256::digest(&response_bytes).into();
    if event.status >= 400 {
        event.error_code = serde_json::from_slice::<ErrorEnvelope>(&response_bytes)
            .ok()
            .and_then(|e| e.error.code)
            .map(|c| clean(&c));
    }
    event.latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let bodies = state.ledger.stores_bodies().then(|| Bodies {
        request: request_bytes,
        response: response_bytes.clone(),
    });
    match state.ledger.record(event, bodies).await {
        Ok(_) => Response::from_parts(parts, Body::from(response_bytes)),
        Err(err) => refusal(err),
    }
}

/// The whole body, or `Err(true)` when it is over `limit` bytes, `Err(false)` when it failed.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, bool> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| false)?;
        if buf.len() + chunk.len() > limit {
            return Err(true);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn refusal(err: LedgerError) -> Response {
    match err {
        LedgerError::DuplicateRequestId(id) => ApiError::BadRequest {
            message: format!("the request id `{id}` was already used; send a new x-request-id"),
            param: None,
            code: Some("duplicate_request_id"),
        }
        .into_response(),
        LedgerError::Unavailable(why) => {
            tracing::warn!(error = %why, "ledger commit failed; answering 503");
            ApiError::LedgerUnavailable.into_response()
        }
        LedgerError::Closed => ApiError::LedgerUnavailable.into_response(),
    }
}

fn apply_usage(event: &mut UsageEvent, usage: &Usage) {
    event.model = usage.model.as_deref().map(clean);
    event.prompt_tokens = usage.prompt_tokens as i64;
    event.scored_tokens = usage.scored_tokens as i64;
    event.generated_tokens = usage.generated_tokens as i64;
    event.judgments = usage.judgments as i64;
    event.top_k = usage.top_k.map(|k| k as i32);
    event.weights_sha256 = usage.weights_sha256.as_deref().map(clean);
}

fn is_sse(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Writes the row (status 499, hash of what was produced) if the request or its stream is
/// dropped before it completes.
struct RowGuard {
    ledger: Ledger,
    event: Option<UsageEvent>,
    hasher: Sha256,
    started: Instant,
}

impl RowGuard {
    fn new(ledger: Ledger, event: UsageEvent, started: Instant) -> Self {
        Self {
            ledger,
            event: Some(event),
            hasher: Sha256::new(),
            started,
        }
    }

    fn disarm(&mut self) -> UsageEvent {
        self.event.take().expect("guard disarmed twice")
    }
}

impl Drop for RowGuard {
    fn drop(&mut self) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        event.status = STATUS_CLIENT_CLOSED;
        event.error_code = Some("client_closed_request".into());
        event.response_sha256 = std::mem::take(&mut self.hasher).finalize().into();
        event.latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let ledger = self.ledger.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = ledger.record(event, None).await {
                    tracing::warn!(error = %e, "could not record a cancelled request");
                }
            });
        }
    }
}

struct StreamState {
    inner: axum::body::BodyDataStream,
    guard: RowGuard,
    held: Option<Bytes>,
    sse: bool,
    finished: bool,
    request_id: String,
}

fn stream_through_ledger(
    ledger: Ledger,
    event: UsageEvent,
    started: Instant,
    body: Body,
    sse: bool,
) -> Body {
    let request_id = event.request_id.clone();
    let state = StreamState {
        inner: body.into_data_stream(),
        guard: RowGuard::new(ledger, event, started),
        held: None,
        sse,
        finished: false,
        request_id,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        loop {
            match st.inner.next().await {
                Some(Ok(chunk)) => {
                    st.guard.hasher.update(&chunk);
                    if let Some(prev) = st.held.replace(chunk) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(err)) => {
                    // The producer failed mid-stream: record it as a server error.
                    let mut event = st.guard.disarm();
                    event.status = 500;
                    event.error_code = Some("stream_error".into());
                    event.response_sha256 = std::mem::take(&mut st.guard.hasher).finalize().into();
                    event.latency_ms = started_ms(&st.guard);
                    let _ = st.guard.ledger.record(event, None).await;
                    st.finished = true;
                    return Some((Err(err), st));
                }
                None => {
                    let mut event = st.guard.disarm();
                    event.response_sha256 = std::mem::take(&mut st.guard.hasher).finalize().into();
                    event.latency_ms = started_ms(&st.guard);
                    st.finished = true;
                    return match st.guard.ledger.record(event, None).await {
                        Ok(_) => st.held.take().map(|last| (Ok(last), st)),
                        Err(err) => {
                            tracing::warn!(error = %err, "ledger commit failed at the end of a stream");
                            if st.sse {
                                let envelope = ApiError::LedgerUnavailable
                                    .envelope(Some(st.request_id.clone()));
                                let json = serde_json::to_string(&envelope).unwrap_or_default();
                                Some((Ok(Bytes::from(format!("data: {json}\n\n"))), st))
                            } else {
                                Some((
                                    Err(axum::Error::new(std::io::Error::other(
                                        "ledger unavailable",
                                    ))),
                                    st,
                                ))
                            }
                        }
                    };
                }
            }
        }
    });
    Body::from_stream(stream)
}

fn started_ms(guard: &RowGuard) -> f64 {
    guard.started.elapsed().as_secs_f64() * 1e3
}
