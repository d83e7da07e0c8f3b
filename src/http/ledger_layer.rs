//! The request's ledger row: every authenticated request leaves exactly one row.
//!
//! The gate opens a [`Row`] as soon as it knows the caller (after authentication, before any
//! other check), together with the request's [`Meter`]. The row then ends in one of three ways:
//!
//! * **Refused** ([`Row::refuse`]) by an admission check (rate limits, concurrency, load, body
//!   size or read timeout): a row with the refusal's status and code. Refusal rows are bounded
//!   per client (`ledger.max_refusal_rows_per_minute`): past the bound, refusals of a client
//!   are counted and written as one aggregated row per minute (see `ledger::refusals`).
//! * **Finished** ([`Row::finish`]) with the handler's response. A **buffered** response (JSON,
//!   errors, Arrow) leaves only after its row — status, error code, usage from the meter, the
//!   SHA-256 of the exact bytes — is committed; if the commit fails the caller gets 503
//!   `ledger_unavailable` and none of the output. A **streamed** response (SSE, or the audit
//!   export) flows as it is produced while being hashed; its final chunk (for SSE the
//!   `data: [DONE]` event, or the error event of a failed stream) is held back until the row,
//!   with the hash of every byte, the meter's usage and the stream's real outcome, is
//!   committed. If that commit fails, an SSE stream ends with a `ledger_unavailable` error event
//!   instead, and any other stream is aborted: a client never sees a complete response without
//!   its row.
//! * **Dropped** (the client went away first, or the server cut the connection at shutdown):
//!   the row is written with status 499 once the request's meter closes, i.e. once the work
//!   that was already running has ended, so it carries (and the client pays) exactly what was
//!   produced. [`crate::ledger::Ledger::shutdown`] waits for these rows before it drains.
//!
//! Bills are settled here, after the row: charged what was produced, or refunded entirely when
//! the response was not delivered (503 `ledger_unavailable`, 400 `duplicate_request_id`).

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::auth::ClientCtx;
use crate::error::{current_request_id, ApiError};
use crate::ledger::signing::ReceiptFields;
use crate::ledger::{Bodies, Committed, Ledger, LedgerError, PendingRow, UsageEvent};
use crate::usage::{Closed, Meter, MeterWatch, Outcome, Usage};
use crate::AppState;

/// Put this in a response's extensions to have it streamed (hashed on the fly, row committed at
/// the end) instead of buffered. `text/event-stream` responses are detected without it.
#[derive(Clone, Copy, Debug)]
pub struct StreamedBody;

/// The header carrying a response's signed receipt (see [`Stamp`]).
pub const RECEIPT_HEADER: &str = "x-teachd-receipt";

/// What a row's receipt states besides its place in the tree (base64 of a JSON object with the
/// leaf index, row hash, the SHA-256 of the request and response bytes and the row's time,
/// signed with the ledger's key; encoding: [`ReceiptFields::signed_bytes`], README "Receipts"),
/// taken before the row goes to the writer.
struct Stamp {
    request_sha256: [u8; 32],
    response_sha256: [u8; 32],
    ts: chrono::DateTime<Utc>,
}

impl Stamp {
    fn of(event: &UsageEvent) -> Stamp {
        Stamp {
            request_sha256: event.request_sha256,
            response_sha256: event.response_sha256,
            ts: event.ts,
        }
    }

    /// The `x-teachd-receipt` value of the committed row.
    fn seal(self, ledger: &Ledger, committed: Committed) -> String {
        ReceiptFields {
            leaf_index: committed.id as u64 - 1,
            row_hash: committed.row_hash,
            request_sha256: self.request_sha256,
            response_sha256: self.response_sha256,
            ts: self.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        }
        .seal(&ledger.tlog().key)
    }
}

fn with_receipt(mut response: Response, value: String) -> Response {
    if let Ok(v) = header::HeaderValue::from_str(&value) {
        response.headers_mut().insert(RECEIPT_HEADER, v);
    }
    response
}

/// Status recorded for a request whose client went away before the response was complete.
pub const STATUS_CLIENT_CLOSED: i16 = 499;

/// Text as Postgres accepts it (no NUL), bounded.
fn clean(s: &str) -> String {
    s.chars().filter(|c| *c != '\0').take(256).collect()
}

/// The ledger row of one request, from authentication to commit. See the module docs.
pub struct Row {
    ledger: Ledger,
    event: Option<UsageEvent>,
    watch: Option<MeterWatch>,
    request_body: Bytes,
    started: Instant,
    /// Longest a dropped request's row waits for its work to end before it is written with the
    /// usage seen so far.
    close_wait: Duration,
    _pending: PendingRow,
}

impl Row {
    /// Opens the row of `ctx`'s request and its meter. `req` gives the route and method.
    pub fn open(
        state: &AppState,
        ctx: &ClientCtx,
        req: &Request,
    ) -> impl std::future::Future<Output = (Row, Meter)> + Send + 'static {
        let endpoint = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string());
        let method = req.method().as_str().to_string();
        let (state, ctx) = (state.clone(), ctx.clone());
        async move { Self::open_with(&state, &ctx, endpoint, method).await }
    }

    async fn open_with(
        state: &AppState,
        ctx: &ClientCtx,
        endpoint: String,
        method: String,
    ) -> (Row, Meter) {
        let request_id = current_request_id().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let event = UsageEvent::begin(
            request_id,
            ctx.client_id,
            ctx.key_id,
            method,
            clean(&endpoint),
            STATUS_CLIENT_CLOSED,
            state.tos.current_version_for_ledger().await,
        );
        let (meter, watch) = Meter::open(ctx.clone(), state.limits.clone());
        let row = Row {
            ledger: state.ledger.clone(),
            event: Some(event),
            watch: Some(watch),
            request_body: Bytes::new(),
            started: Instant::now(),
            close_wait: Duration::from_secs(state.config.server.request_timeout_secs),
            _pending: state.ledger.pending_row(),
        };
        (row, meter)
    }

    pub fn request_id(&self) -> &str {
        self.event.as_ref().map_or("", |e| e.request_id.as_str())
    }

    /// The request body as read: its hash goes into the row (the bytes too, with
    /// `ledger.store_bodies`).
    pub fn set_request_body(&mut self, bytes: &Bytes) {
        if let Some(e) = self.event.as_mut() {
            e.request_sha256 = Sha256::digest(bytes).into();
        }
        if self.ledger.stores_bodies() {
            self.request_body = bytes.clone();
        }
    }

    fn take(&mut self) -> (UsageEvent, MeterWatch) {
        (
            self.event.take().expect("row taken twice"),
            self.watch.take().expect("row taken twice"),
        )
    }

    /// The request was refused by an admission check before its handler ran. Refusal rows are
    /// bounded per client; see the module docs.
    pub async fn refuse(mut self, err: ApiError) -> Response {
        let (mut event, watch) = self.take();
        drop(watch); // nothing was reserved or produced
        event.status = err.status().as_u16() as i16;
        event.error_code = err.code().map(clean);
        event.latency_ms = ms(self.started);
        let (parts, body) = err.into_response().into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        event.response_sha256 = Sha256::digest(&bytes).into();
        event.response_bytes = bytes.len() as i64;
        let stamp = Stamp::of(&event);
        match self.ledger.record_refusal(event).await {
            Ok(None) => Response::from_parts(parts, Body::from(bytes)),
            Ok(Some(committed)) => with_receipt(
                Response::from_parts(parts, Body::from(bytes)),
                stamp.seal(&self.ledger, committed),
            ),
            Err(err) => refusal(err),
        }
    }

    /// The handler's response: buffered (row committed before it leaves) or streamed (final
    /// chunk held until the row is committed). See the module docs.
    pub async fn finish(mut self, response: Response) -> Response {
        let (mut parts, body) = response.into_parts();
        let streamed =
            parts.extensions.remove::<StreamedBody>().is_some() || is_sse(&parts.headers);
        if streamed {
            if let Some(e) = self.event.as_mut() {
                e.status = parts.status.as_u16() as i16;
            }
            let sse = is_sse(&parts.headers);
            let stream = StreamRow {
                request_id: self.request_id().to_string(),
                row: self,
                hasher: Sha256::new(),
                bytes: 0,
                sse,
            };
            return Response::from_parts(parts, stream.into_body(body));
        }

        let (mut event, watch) = self.take();
        event.status = parts.status.as_u16() as i16;
        let response_bytes = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(error = %err, "response body failed");
                event.status = 500;
                Bytes::new()
            }
        };
        let mut closed = watch.closed().await;
        apply(&mut event, &closed.usage);
        event.response_sha256 = Sha256::digest(&response_bytes).into();
        event.response_bytes = response_bytes.len() as i64;
        if event.status >= 400 {
            event.error_code =
                serde_json::from_slice::<crate::error::ErrorEnvelope>(&response_bytes)
                    .ok()
                    .and_then(|e| e.error.code)
                    .map(|c| clean(&c));
        }
        event.latency_ms = ms(self.started);
        let bodies = (self.ledger.stores_bodies() && !closed.sensitive).then(|| Bodies {
            request: std::mem::take(&mut self.request_body),
            response: response_bytes.clone(),
        });
        let stamp = Stamp::of(&event);
        match self.ledger.record(event, bodies).await {
            Ok(committed) => {
                closed.settle().await;
                with_receipt(
                    Response::from_parts(parts, Body::from(response_bytes)),
                    stamp.seal(&self.ledger, committed),
                )
            }
            Err(err) => {
                closed.refund().await;
                refusal(err)
            }
        }
    }
}

impl Row {
    /// The response is leaving without this row (the request timed out): write the row with
    /// `status` and `code` once the request's meter closes, i.e. once the work that was running
    /// has ended, so it records (and the client pays) exactly what was produced.
    pub fn abandon(mut self, status: i16, code: &str) {
        self.detach(status, code);
    }

    fn detach(&mut self, status: i16, code: &str) {
        let (Some(mut event), Some(watch)) = (self.event.take(), self.watch.take()) else {
            return;
        };
        let ledger = self.ledger.clone();
        let pending = ledger.pending_row();
        let (started, wait) = (self.started, self.close_wait);
        let code = code.to_string();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _pending = pending;
            let snapshot = watch.snapshot();
            let closed = tokio::time::timeout(wait, watch.closed()).await;
            let (usage, closed) = match closed {
                Ok(c) => (c.usage.clone(), Some(c)),
                Err(_) => (snapshot.unwrap_or_default(), None),
            };
            apply(&mut event, &usage);
            event.status = status;
            event.error_code = Some(code);
            event.latency_ms = ms(started);
            if let Err(e) = ledger.record(event, None).await {
                tracing::warn!(error = %e, "could not record an abandoned request");
            }
            // Work that ran is paid for even though its response did not complete.
            if let Some(mut c) = closed {
                c.settle().await;
            }
        });
    }
}

impl Drop for Row {
    fn drop(&mut self) {
        // The client went away (or the connection was cut) before the response was complete.
        self.detach(STATUS_CLIENT_CLOSED, "client_closed_request");
    }
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

/// What a failed commit becomes on the wire (the mapping lives with every other one, in
/// `crate::error`).
fn refusal(err: LedgerError) -> Response {
    ApiError::from(err).into_response()
}

fn apply(event: &mut UsageEvent, usage: &Usage) {
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

/// A streamed response on its way out: hashes every byte, holds the last chunk, commits the row
/// at the end. Dropped early (client gone), its [`Row`] writes the 499 row.
struct StreamRow {
    request_id: String,
    row: Row,
    hasher: Sha256,
    /// Bytes hashed so far.
    bytes: u64,
    sse: bool,
}

impl StreamRow {
    fn into_body(self, body: Body) -> Body {
        let state = (self, body.into_data_stream(), None::<Bytes>, false);
        let stream =
            futures::stream::unfold(state, |(mut st, mut inner, mut held, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match inner.next().await {
                        Some(Ok(chunk)) => {
                            st.hasher.update(&chunk);
                            st.bytes += chunk.len() as u64;
                            if let Some(prev) = held.replace(chunk) {
                                return Some((Ok(prev), (st, inner, held, false)));
                            }
                        }
                        Some(Err(err)) => {
                            // The body failed mid-stream: a server error.
                            let _ = st.commit(Some(500)).await;
                            return Some((Err(err), (st, inner, None, true)));
                        }
                        None => {
                            let last = match st.commit(None).await {
                                // An event stream carries its receipt as an SSE comment
                                // (clients ignore comments) right before its last event: the
                                // response hash covers every byte but that comment.
                                Ok(receipt) if st.sse => {
                                    let mut out =
                                        format!(": {RECEIPT_HEADER}: {receipt}\n\n").into_bytes();
                                    out.extend_from_slice(&held.take().unwrap_or_default());
                                    Some(Ok(Bytes::from(out)))
                                }
                                Ok(_) => held.take().map(Ok),
                                Err(()) if st.sse => {
                                    let envelope = ApiError::LedgerUnavailable
                                        .envelope(Some(st.request_id.clone()));
                                    let json = serde_json::to_string(&envelope).unwrap_or_default();
                                    Some(Ok(Bytes::from(format!("data: {json}\n\n"))))
                                }
                                Err(()) => Some(Err(axum::Error::new(std::io::Error::other(
                                    "ledger unavailable",
                                )))),
                            };
                            return last.map(|item| (item, (st, inner, None, true)));
                        }
                    }
                }
            });
        Body::from_stream(stream)
    }

    /// Commits the row of a stream that ended (or failed with `failed` status); returns its
    /// receipt.
    async fn commit(&mut self, failed: Option<u16>) -> Result<String, ()> {
        let (mut event, watch) = self.row.take();
        let mut closed: Closed = watch.closed().await;
        apply(&mut event, &closed.usage);
        match (&closed.outcome, failed) {
            (_, Some(status)) => {
                event.status = status as i16;
                event.error_code = Some("stream_error".into());
            }
            (Outcome::Failed { status, code }, None) => {
                event.status = *status as i16;
                event.error_code = code.as_deref().map(clean);
            }
            (Outcome::Unknown, None) if self.sse => {
                // An event stream whose producer vanished without finishing (e.g. panicked).
                event.status = 500;
                event.error_code = Some("stream_error".into());
            }
            _ => {}
        }
        event.response_sha256 = std::mem::take(&mut self.hasher).finalize().into();
        event.response_bytes = self.bytes as i64;
        event.latency_ms = ms(self.row.started);
        let stamp = Stamp::of(&event);
        match self.row.ledger.record(event, None).await {
            Ok(committed) => {
                closed.settle().await;
                Ok(stamp.seal(&self.row.ledger, committed))
            }
            Err(err) => {
                tracing::warn!(error = %err, "ledger commit failed at the end of a stream");
                // The stream's output (all but its end) was delivered: it is paid for.
                closed.settle().await;
                Err(())
            }
        }
    }
}

/// Runs `next` under a ledger row for an already authenticated `ctx` (admin-style: no limits).
/// Used by gates outside [`crate::http::gate`] (e.g. a console session) so that their requests
/// are recorded like every other.
pub async fn record_usage(state: &AppState, ctx: &ClientCtx, req: Request, next: Next) -> Response {
    crate::http::gate::run_admitted(state, ctx, req, next).await
}
