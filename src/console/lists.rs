//! Lists the console shows beside the admin API's own views: a client's ToS acceptances and
//! recent ledger events (keyset pages, newest first), ToS versions, today's spend of every
//! client.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, sqlx::FromRow)]
pub struct AcceptanceRow {
    pub version: String,
    pub purpose: String,
    pub student_model: String,
    pub commercial: bool,
    pub accepted_at: DateTime<Utc>,
}

pub async fn acceptances(db: &PgPool, client: Uuid) -> Result<Vec<AcceptanceRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT version, purpose, student_model, commercial, accepted_at
         FROM tos_acceptances WHERE client_id = $1 ORDER BY id DESC LIMIT 100",
    )
    .bind(client)
    .fetch_all(db)
    .await
}

#[derive(Debug, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub ts: DateTime<Utc>,
    pub request_id: String,
    pub method: String,
    pub endpoint: String,
    pub model: Option<String>,
    pub status: i16,
    pub error_code: Option<String>,
    pub scored_tokens: i64,
    pub generated_tokens: i64,
    pub judgments: i64,
    pub latency_ms: f64,
    pub refusals: i64,
}

/// Page size of a client's events.
pub const EVENTS_PAGE: i64 = 25;

/// Up to [`EVENTS_PAGE`] events of `client` with `id < before`, newest first, and the cursor of
/// the next (older) page when there is one. Keyset: a page never shifts as rows are appended.
pub async fn events(
    db: &PgPool,
    client: Uuid,
    before: Option<i64>,
) -> Result<(Vec<EventRow>, Option<i64>), sqlx::Error> {
    let mut rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, ts, request_id, method, endpoint, model, status, error_code, scored_tokens,
                generated_tokens, judgments, latency_ms, refusals
         FROM usage_events WHERE client_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
    )
    .bind(client)
    .bind(before.unwrap_or(i64::MAX))
    .bind(EVENTS_PAGE + 1)
    .fetch_all(db)
    .await?;
    let more = rows.len() as i64 > EVENTS_PAGE;
    rows.truncate(EVENTS_PAGE as usize);
    let next = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok((rows, next))
}

#[derive(Debug, sqlx::FromRow)]
pub struct TosRow {
    pub version: String,
    pub published_at: DateTime<Utc>,
    pub acceptances: i64,
}

pub async fn tos_versions(db: &PgPool) -> Result<Vec<TosRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT v.version, v.published_at,
                (SELECT count(DISTINCT a.client_id) FROM tos_acceptances a
                 WHERE a.version = v.version) AS acceptances
         FROM tos_versions v ORDER BY v.seq DESC LIMIT 50",
    )
    .fetch_all(db)
    .await
}

/// Tokens each client spent today (the persisted daily quota).
pub async fn spent_today(db: &PgPool) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT client_id, tokens FROM client_daily_usage WHERE day = $1")
            .bind(crate::limits::quota::today())
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().collect())
}
