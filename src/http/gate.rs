//! The gate in front of teacher and admin routes:
//! authenticate (401/403) -> admit (rpm, concurrency: 429) -> handler -> settle -> headers.
//!
//! Everything after `authenticate` runs inside the usage ledger's `record_with`: every
//! authenticated request, refused or served, yields exactly one ledger row, and a 2xx leaves
//! only after its row is committed.

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::auth::{ClientCtx, Scope};
use crate::error::ApiError;
use crate::http::ledger_layer::{record_usage, record_with};
use crate::limits::{Admission, DeferredSettlement};
use crate::usage::Usage;
use crate::AppState;

/// Middleware for /v1 teacher routes (scope `teacher`).
pub async fn teacher_gate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let ctx = match authenticate(&state, req.headers(), Scope::Teacher).await {
        Ok(ctx) => ctx,
        Err(err) => return err.into_response(),
    };
    req.extensions_mut().insert(ctx.clone());
    let inner_state = state.clone();
    let inner_ctx = ctx.clone();
    record_with(&state, &ctx, req, move |req| async move {
        let (state, ctx) = (inner_state, inner_ctx);
        let admission = match state.limits.admit(&ctx) {
            Ok(admission) => admission,
            Err(err) => return err.into_response(),
        };
        let mut response = next.run(req).await;
        settle(&mut response).await;
        state
            .limits
            .write_headers(&ctx, &admission, response.headers_mut());
        hold_until_body_ends(response, admission)
    })
    .await
}

/// Middleware for /admin routes (scope `admin`). No rate limits: admins are few and trusted.
pub async fn admin_gate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let ctx = match authenticate(&state, req.headers(), Scope::Admin).await {
        Ok(ctx) => ctx,
        Err(err) => return err.into_response(),
    };
    req.extensions_mut().insert(ctx.clone());
    record_usage(&state, &ctx, req, next).await
}

/// The caller, holding `scope`. With `server.disable_auth`, teacher requests run as the
/// anonymous client.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<ClientCtx, ApiError> {
    let ctx = state.auth.authenticate(headers, scope).await?;
    tracing::Span::current().record("client_id", tracing::field::display(ctx.client_id));
    Ok(ctx)
}

/// Settles a reservation the handler deferred to the gate, at the response's billable tokens.
async fn settle(response: &mut Response) {
    let Some(deferred) = response.extensions_mut().remove::<DeferredSettlement>() else {
        return;
    };
    let Some(reservation) = deferred.take() else {
        return;
    };
    match response.extensions().get::<Usage>() {
        Some(usage) => reservation.settle(usage.billable_tokens()).await,
        None => drop(reservation), // no work reported: refund it all
    }
}

/// Keeps the concurrency slot until the body is sent: a streamed generation is in flight
/// until its last event, not until its headers leave.
fn hold_until_body_ends(response: Response, admission: Admission) -> Response {
    if response.body().size_hint().exact().is_some() {
        return response; // a buffered body: the work is done, `admission` drops here
    }
    let (parts, body) = response.into_parts();
    let stream = body.into_data_stream().map(move |chunk| {
        let _slot = &admission;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}
