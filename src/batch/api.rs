//! `/v1/batches`: get, list, cancel, and live progress as server-sent events (creation, with
//! its validation and quota reservation, is in [`super::create`]).

use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

// The handler and its OpenAPI path item (`__path_create`).
use super::create::*;
use super::store::{self, BatchObject, BatchRow};
use crate::auth::ClientCtx;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{Json, Query};
use crate::usage::Meter;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_batch))
        .routes(routes!(cancel))
        .routes(routes!(events))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchList {
    pub object: String,
    pub data: Vec<BatchObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// A batch id: the page starts after it.
    pub after: Option<String>,
    /// 1..=100, default 20.
    pub limit: Option<i64>,
}

/// One of the caller's batches.
#[utoipa::path(
    get, path = "/v1/batches/{batch_id}", tag = "teacher",
    params(("batch_id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "The batch", body = BatchObject),
        (status = 404, description = "No such batch of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_batch(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let row = store::find(&state.db, ctx.client_id, &id).await?;
    Ok(Json(BatchObject::from(&row)))
}

/// The caller's batches, newest first, paged with `after` and `limit` like OpenAI's.
#[utoipa::path(
    get, path = "/v1/batches", tag = "teacher", params(ListQuery),
    responses((status = 200, description = "A page of batches", body = BatchList),
        (status = 400, description = "Bad query parameters", body = ErrorEnvelope)),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Query(q): Query<ListQuery>,
) -> Result<Json<BatchList>, ApiError> {
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let mut rows = store::page(&state.db, ctx.client_id, q.after.as_deref(), limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<BatchObject> = rows.iter().map(BatchObject::from).collect();
    Ok(Json(BatchList {
        object: "list".into(),
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        data,
        has_more,
    }))
}

/// Cancel a batch: it stops within one line and keeps what it produced.
#[utoipa::path(
    post, path = "/v1/batches/{batch_id}/cancel", tag = "teacher",
    params(("batch_id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "The batch, `cancelling` (or already finished)", body = BatchObject),
        (status = 404, description = "No such batch of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn cancel(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let row = store::find(&state.db, ctx.client_id, &id).await?;
    let updated: Option<BatchRow> = sqlx::query_as(
        "UPDATE batches SET status = 'cancelling', cancelling_at = now()
         WHERE id = $1 AND status IN ('validating', 'in_progress') RETURNING *",
    )
    .bind(&row.id)
    .fetch_optional(&state.db)
    .await
    .map_err(super::files::db_error)?;
    if updated.is_some() {
        state.batch_wake.notify_one();
    }
    Ok(Json(BatchObject::from(updated.as_ref().unwrap_or(&row))))
}

/// How often the event stream looks at the batch.
const EVENTS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Live progress: the batch object as an event whenever its status, counts or tokens change,
/// until it finishes; then `data: [DONE]`.
#[utoipa::path(
    get, path = "/v1/batches/{batch_id}/events", tag = "teacher",
    params(("batch_id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "Server-sent events, each a batch object", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such batch of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn events(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let first = store::find(&state.db, ctx.client_id, &id).await?;
    Ok(crate::http::sse::stream(meter, move |sink| async move {
        let mut last = None;
        let mut row = first;
        loop {
            let seen = (
                row.status.clone(),
                row.completed_lines,
                row.failed_lines,
                row.scored_tokens,
            );
            if last.as_ref() != Some(&seen) {
                if !sink.send(&BatchObject::from(&row)).await {
                    return Ok(());
                }
                last = Some(seen);
            }
            if row.is_terminal() {
                return Ok(());
            }
            tokio::time::sleep(EVENTS_EVERY).await;
            row = store::find(&state.db, ctx.client_id, &row.id).await?;
        }
    }))
}
