//! The `batches` table: a batch's state, its resume point and its progress, and the batch
//! object the API shows (OpenAI's fields plus `progress` and `output_format`).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use super::files::db_error;
use crate::error::ApiError;

/// One row of `batches`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    pub id: String,
    pub client_id: Uuid,
    pub key_id: Uuid,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub output_format: String,
    pub metadata: Option<Value>,
    pub status: String,
    pub errors: Option<Value>,
    pub output_file_id: Option<String>,
    pub output_file_ids: Vec<String>,
    pub error_file_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub finalizing_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    pub cancelling_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub total_lines: i32,
    pub completed_lines: i32,
    pub failed_lines: i32,
    pub invalid_lines: Vec<i32>,
    pub next_line: i32,
    pub output_offset: i64,
    pub error_offset: i64,
    pub total_tokens: i64,
    pub scored_tokens: i64,
    pub reserved_tokens: i64,
    pub settled_tokens: i64,
    pub quota_day: NaiveDate,
    pub first_ledger_id: Option<i64>,
    pub last_ledger_id: Option<i64>,
    pub top_logprobs_mantissa_bits: i16,
}

impl BatchRow {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "failed" | "completed" | "expired" | "cancelled"
        )
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// Token-level progress: tokens run through the teacher so far out of the job's total.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub scored_tokens: i64,
    pub total_tokens: i64,
    /// Since the batch went in progress.
    pub tokens_per_s: f64,
    /// Seconds left at that rate; null before the rate is known or once finished.
    pub eta_s: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchErrors {
    pub object: String,
    pub data: Vec<BatchError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line (JSONL) or row (Parquet).
    pub line: Option<i64>,
}

/// OpenAI's batch object, plus `progress` and `output_format`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchObject {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    /// validating, failed, in_progress, finalizing, completed, expired, cancelling, cancelled.
    pub status: String,
    /// The output (its first shard when a Parquet output is sharded).
    pub output_file_id: Option<String>,
    /// Every output file in row order: the Parquet shards, or the one output file.
    pub output_file_ids: Vec<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Value>,
    pub output_format: String,
    /// Mantissa bits kept in a Parquet output's `top_logprobs` (23: all).
    pub top_logprobs_mantissa_bits: i16,
    pub progress: Progress,
}

impl From<&BatchRow> for BatchObject {
    fn from(r: &BatchRow) -> Self {
        let ts = |t: Option<DateTime<Utc>>| t.map(super::unix);
        let end = r
            .completed_at
            .or(r.failed_at)
            .or(r.expired_at)
            .or(r.cancelled_at)
            .unwrap_or_else(Utc::now);
        let rate = match r.in_progress_at {
            Some(start) if r.scored_tokens > 0 => {
                let secs = (end - start).num_milliseconds().max(1) as f64 / 1e3;
                r.scored_tokens as f64 / secs
            }
            _ => 0.0,
        };
        let left = (r.total_tokens - r.scored_tokens).max(0) as f64;
        let eta_s = (rate > 0.0 && !r.is_terminal()).then(|| left / rate);
        BatchObject {
            id: r.id.clone(),
            object: "batch".into(),
            endpoint: r.endpoint.clone(),
            errors: r
                .errors
                .clone()
                .and_then(|e| serde_json::from_value::<Vec<BatchError>>(e).ok())
                .map(|data| BatchErrors {
                    object: "list".into(),
                    data,
                }),
            input_file_id: r.input_file_id.clone(),
            completion_window: r.completion_window.clone(),
            status: r.status.clone(),
            output_file_id: r.output_file_id.clone(),
            output_file_ids: r.output_file_ids.clone(),
            error_file_id: r.error_file_id.clone(),
            created_at: super::unix(r.created_at),
            in_progress_at: ts(r.in_progress_at),
            expires_at: super::unix(r.expires_at),
            finalizing_at: ts(r.finalizing_at),
            completed_at: ts(r.completed_at),
            failed_at: ts(r.failed_at),
            expired_at: ts(r.expired_at),
            cancelling_at: ts(r.cancelling_at),
            cancelled_at: ts(r.cancelled_at),
            request_counts: RequestCounts {
                total: r.total_lines as i64,
                completed: r.completed_lines as i64,
                failed: r.failed_lines as i64,
            },
            metadata: r.metadata.clone(),
            output_format: r.output_format.clone(),
            top_logprobs_mantissa_bits: r.top_logprobs_mantissa_bits,
            progress: Progress {
                scored_tokens: r.scored_tokens,
                total_tokens: r.total_tokens,
                tokens_per_s: rate,
                eta_s,
            },
        }
    }
}

/// The batch `id` of `client`, or 404 (also when it is another client's).
pub async fn find(db: &PgPool, client: Uuid, id: &str) -> Result<BatchRow, ApiError> {
    let not_found = || ApiError::NotFound {
        message: format!("No such batch: `{id}`"),
        param: Some("batch_id".into()),
    };
    if !super::valid_id(id, "batch_") {
        return Err(not_found());
    }
    sqlx::query_as("SELECT * FROM batches WHERE id = $1 AND client_id = $2")
        .bind(id)
        .bind(client)
        .fetch_optional(db)
        .await
        .map_err(db_error)?
        .ok_or_else(not_found)
}

/// The batch `id`, whoever owns it (for the runner).
pub async fn load(db: &PgPool, id: &str) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as("SELECT * FROM batches WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Batches the runner has to drive, oldest first.
pub async fn active(db: &PgPool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT id FROM batches WHERE status IN ('in_progress', 'finalizing', 'cancelling')
         ORDER BY created_at, id",
    )
    .fetch_all(db)
    .await
}

/// A page of the client's batches, newest first, after the batch `after` (exclusive).
pub async fn page(
    db: &PgPool,
    client: Uuid,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<BatchRow>, ApiError> {
    sqlx::query_as(
        "SELECT * FROM batches WHERE client_id = $1
           AND ($2::text IS NULL OR (created_at, id) <
                (SELECT created_at, id FROM batches WHERE id = $2 AND client_id = $1))
         ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(client)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
    .map_err(db_error)
}

/// Batches of the client that are not finished.
pub async fn active_count(db: &PgPool, client: Uuid) -> Result<i64, ApiError> {
    sqlx::query_scalar(
        "SELECT count(*) FROM batches WHERE client_id = $1
           AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')",
    )
    .bind(client)
    .fetch_one(db)
    .await
    .map_err(db_error)
}
