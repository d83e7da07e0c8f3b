//! `GET /admin/usage` (aggregates) and `GET /admin/usage/events` (keyset-paginated rows).

use axum::extract::State;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{parse_range, Query};
use crate::auth::ClientCtx;
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::Json;
use crate::http::input;
use crate::ledger::queries::{self, EventFilter, GroupKey};
use crate::ledger::rollups;
use crate::ledger::ChainedEvent;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(usage))
        .routes(routes!(usage_events))
}

pub const DEFAULT_PAGE: i64 = 100;
pub const MAX_PAGE: i64 = 1_000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Inclusive start (RFC 3339 or YYYY-MM-DD, UTC).
    pub from: Option<String>,
    /// Exclusive end.
    pub to: Option<String>,
    pub client_id: Option<Uuid>,
    pub model: Option<String>,
    /// Matched route, e.g. `/v1/logprobs`.
    pub endpoint: Option<String>,
    /// `client`, `model`, `endpoint`, `day` or `hour`; several comma-separated
    /// (`client,day`). Without it: one row of totals.
    pub group_by: Option<String>,
}

/// One aggregate row. Only the keys named in `group_by` are present.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    pub client_id: Option<Uuid>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
    pub day: Option<NaiveDate>,
    pub hour: Option<DateTime<Utc>>,
    pub requests: i64,
    /// Requests answered with a status of 400 or more.
    pub errors: i64,
    pub prompt_tokens: i64,
    pub scored_tokens: i64,
    pub generated_tokens: i64,
    pub judgments: i64,
    /// Bytes of response bodies served.
    pub response_bytes: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    pub object: &'static str,
    pub group_by: Vec<GroupKey>,
    #[schema(value_type = Vec<UsageRow>)]
    pub data: Vec<Map<String, Value>>,
}

#[allow(clippy::result_large_err)] // ApiError carries rate-limit headers; fine off the hot path
fn parse_group_by(raw: Option<&str>) -> Result<Vec<GroupKey>> {
    let mut keys = Vec::new();
    for part in raw
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let key = GroupKey::parse(part).ok_or_else(|| {
            ApiError::bad_param(
                "group_by",
                format!("unknown group_by `{part}`; use client, model, endpoint, day or hour"),
            )
        })?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Usage aggregates over the ledger.
#[utoipa::path(get, path = "/admin/usage", tag = "admin", params(UsageParams),
    responses(
        (status = 200, body = UsageResponse),
        (status = 400, body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn usage(
    State(state): State<AppState>,
    _ctx: ClientCtx,
    Query(p): Query<UsageParams>,
) -> Result<Json<UsageResponse>> {
    let keys = parse_group_by(p.group_by.as_deref())?;
    for (param, value) in [("model", &p.model), ("endpoint", &p.endpoint)] {
        if let Some(v) = value {
            input::no_nul(param, v)?;
        }
    }
    let filter = EventFilter {
        range: parse_range(p.from.as_deref(), p.to.as_deref())?,
        client_id: p.client_id,
        model: p.model,
        endpoint: p.endpoint,
    };
    // From the hourly rollups (whole hours) plus the raw rows of partial hours: the same
    // answer as a scan of every row, in time that grows with hours, not rows.
    let rows = rollups::usage(&state.db, &filter, &keys).await?;
    let data = rows
        .into_iter()
        .map(|r| {
            let mut m = Map::new();
            for key in &keys {
                let (name, value) = match key {
                    GroupKey::Client => ("client_id", serde_json::to_value(r.client_id)),
                    GroupKey::Model => ("model", serde_json::to_value(&r.model)),
                    GroupKey::Endpoint => ("endpoint", serde_json::to_value(&r.endpoint)),
                    GroupKey::Day => ("day", serde_json::to_value(r.day)),
                    GroupKey::Hour => ("hour", serde_json::to_value(r.hour)),
                };
                m.insert(name.into(), value.unwrap_or(Value::Null));
            }
            for (name, v) in [
                ("requests", r.requests),
                ("errors", r.errors),
                ("prompt_tokens", r.prompt_tokens),
                ("scored_tokens", r.scored_tokens),
                ("generated_tokens", r.generated_tokens),
                ("judgments", r.judgments),
                ("response_bytes", r.response_bytes),
            ] {
                m.insert(name.into(), v.into());
            }
            m
        })
        .collect();
    Ok(Json(UsageResponse {
        object: "list",
        group_by: keys,
        data,
    }))
}

/// A ledger row as the admin API shows it (digests in lowercase hex).
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EventView {
    pub id: i64,
    pub request_id: String,
    pub ts: DateTime<Utc>,
    pub client_id: Uuid,
    pub key_id: Uuid,
    pub method: String,
    pub endpoint: String,
    pub model: Option<String>,
    pub status: i16,
    pub error_code: Option<String>,
    pub prompt_tokens: i64,
    pub scored_tokens: i64,
    pub generated_tokens: i64,
    pub judgments: i64,
    pub top_k: Option<i32>,
    pub latency_ms: f64,
    pub request_sha256: String,
    pub response_sha256: String,
    pub tos_version: Option<String>,
    pub weights_sha256: Option<String>,
    /// For an aggregated refusal row: how many refused requests it stands for (0 otherwise).
    pub refusals: i64,
    /// Bytes of the response body served (what `response_sha256` covers).
    pub response_bytes: i64,
    pub prev_hash: String,
    pub row_hash: String,
}

impl From<ChainedEvent> for EventView {
    fn from(c: ChainedEvent) -> Self {
        let e = c.event;
        EventView {
            id: c.id,
            request_id: e.request_id,
            ts: e.ts,
            client_id: e.client_id,
            key_id: e.key_id,
            method: e.method,
            endpoint: e.endpoint,
            model: e.model,
            status: e.status,
            error_code: e.error_code,
            prompt_tokens: e.prompt_tokens,
            scored_tokens: e.scored_tokens,
            generated_tokens: e.generated_tokens,
            judgments: e.judgments,
            top_k: e.top_k,
            latency_ms: e.latency_ms,
            request_sha256: hex::encode(e.request_sha256),
            response_sha256: hex::encode(e.response_sha256),
            tos_version: e.tos_version,
            weights_sha256: e.weights_sha256,
            refusals: e.refusals,
            response_bytes: e.response_bytes,
            prev_hash: hex::encode(c.prev_hash),
            row_hash: hex::encode(c.row_hash),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    pub from: Option<String>,
    pub to: Option<String>,
    pub client_id: Option<Uuid>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    pub data: Vec<EventView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Ledger rows in id order, keyset-paginated: every row appears exactly once across pages,
/// even while new rows are appended.
#[utoipa::path(get, path = "/admin/usage/events", tag = "admin", params(EventsParams),
    responses(
        (status = 200, body = EventsPage),
        (status = 400, body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn usage_events(
    State(state): State<AppState>,
    _ctx: ClientCtx,
    Query(p): Query<EventsParams>,
) -> Result<Json<EventsPage>> {
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_param(
            "limit",
            format!("`limit` must be 1..={MAX_PAGE}"),
        ));
    }
    let after = match p.cursor.as_deref() {
        None => 0,
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|c| *c >= 0)
            .ok_or_else(|| ApiError::bad_param("cursor", "invalid cursor"))?,
    };
    let filter = EventFilter {
        range: parse_range(p.from.as_deref(), p.to.as_deref())?,
        client_id: p.client_id,
        ..Default::default()
    };
    let mut rows = queries::events_after(&state.db, &filter, after, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(EventsPage {
        data: rows.into_iter().map(EventView::from).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_accepts_lists_and_rejects_unknown_keys() {
        assert_eq!(
            parse_group_by(Some("client, day,client")).unwrap(),
            vec![GroupKey::Client, GroupKey::Day]
        );
        assert!(parse_group_by(None).unwrap().is_empty());
        assert!(parse_group_by(Some("week")).is_err());
    }
}
