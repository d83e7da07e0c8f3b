//! `POST /v1/batches`: every line validated and the whole job's tokens reserved against the
//! daily quota before the batch runs (see [`super::validate`] and [`super::runner`]).

use std::collections::HashMap;

use axum::extract::State;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::input::{self, Format};
use super::store::{self, BatchError, BatchObject, BatchRow};
use super::validate::{self, Validated};
use crate::auth::ClientCtx;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::Json;
use crate::AppState;

/// OpenAI's batch creation body (unknown fields are ignored, as SDKs send extras).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[schema(example = json!({"input_file_id": "file-…", "endpoint": "/v1/logprobs", "completion_window": "24h"}))]
pub struct CreateBatch {
    pub input_file_id: String,
    /// `/v1/logprobs`, `/v1/completions`, `/v1/chat/completions` or `/v1/judgments`.
    pub endpoint: String,
    /// `24h` (or a shorter `<n>h`, `<n>m`, `<n>s`, up to `batch.max_completion_window_secs`).
    pub completion_window: String,
    /// Up to 16 string values. For a Parquet input, `model`, `top_k`, `score_from` and
    /// `temperature` here are every row's request fields.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// `jsonl` (default) or `parquet` (teacher forcing only).
    #[serde(default)]
    pub output_format: Option<String>,
    /// Parquet only: `top_logprobs` rounded to this many f32 mantissa bits (1-23; default 23,
    /// every bit kept). A value `x` is stored within `|x| * 2^-(bits+1)` of itself (8 bits: about
    /// bf16's precision), which shrinks the file; `token_logprobs` are never rounded.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 23)]
    pub top_logprobs_mantissa_bits: Option<i64>,
}

/// `24h` -> seconds.
fn window_secs(window: &str, max: u64) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::bad_param(
            "completion_window",
            format!("`completion_window` must be like `24h` (at most {max} s)"),
        )
    };
    if !window.is_ascii() || window.len() < 2 {
        return Err(bad());
    }
    let (n, unit) = window.split_at(window.len() - 1);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit = match unit {
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(unit).ok_or_else(bad)?;
    if secs == 0 || secs > max {
        return Err(bad());
    }
    Ok(secs)
}

/// Create a batch: every line is validated and the job's tokens reserved before it runs.
#[utoipa::path(
    post, path = "/v1/batches", tag = "teacher", request_body = CreateBatch,
    responses(
        (status = 200, description = "The batch (`in_progress`, or `failed` with `errors` when the file is malformed)", body = BatchObject),
        (status = 400, description = "Bad endpoint, window, format or metadata", body = ErrorEnvelope),
        (status = 404, description = "No such input file of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn create(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Json(req): Json<CreateBatch>,
) -> Result<Json<BatchObject>, ApiError> {
    let cfg = &state.config.batch;
    if !super::ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(ApiError::bad_param(
            "endpoint",
            format!("`endpoint` must be one of {}", super::ENDPOINTS.join(", ")),
        ));
    }
    let window = window_secs(&req.completion_window, cfg.max_completion_window_secs)?;
    let output_format = req.output_format.clone().unwrap_or_else(|| "jsonl".into());
    if output_format != "jsonl" && !(output_format == "parquet" && req.endpoint == "/v1/logprobs") {
        return Err(ApiError::bad_param(
            "output_format",
            "`output_format` is `jsonl`, or `parquet` for `/v1/logprobs`",
        ));
    }
    let mantissa_bits = match req.top_logprobs_mantissa_bits {
        None => 23,
        Some(b) if (1..=23).contains(&b) && output_format == "parquet" => b as i16,
        Some(_) => {
            return Err(ApiError::bad_param(
                "top_logprobs_mantissa_bits",
                "`top_logprobs_mantissa_bits` is 1 to 23, with `output_format: parquet`",
            ))
        }
    };
    let metadata = req.metadata.as_ref();
    if metadata
        .is_some_and(|m| m.len() > 16 || m.iter().any(|(k, v)| k.len() > 64 || v.len() > 512))
    {
        return Err(ApiError::bad_param(
            "metadata",
            "`metadata` holds at most 16 keys of 64 characters, values of 512",
        ));
    }
    let metadata = metadata.map(|m| json!(m));
    let file = super::files::find(&state.db, ctx.client_id, &req.input_file_id).await?;
    if file.purpose != "batch" {
        return Err(ApiError::bad_param(
            "input_file_id",
            "the input file's purpose must be `batch`",
        ));
    }
    if store::active_count(&state.db, ctx.client_id).await? >= cfg.max_active_per_client as i64 {
        return Err(ApiError::TooManyRequests {
            message: format!(
                "this client has {} unfinished batches (batch.max_active_per_client); wait for one to end",
                cfg.max_active_per_client
            ),
            kind: "rate_limit_exceeded",
            headers: Default::default(),
        });
    }
    let items = input::read(
        super::file_path(&state, &file.id),
        Format::parse(&file.format),
        req.endpoint.clone(),
        metadata.clone(),
    );
    let mut v = validate::validate(&state, &ctx, &req.endpoint, items).await?;
    if output_format == "parquet" && v.mixed {
        v.file_errors.push(input::FileError {
            code: "mixed_parameters",
            message: "a Parquet output needs one model, top_k and temperature for every line"
                .into(),
            line: None,
        });
    }
    let id = super::new_id("batch_");
    let now = Utc::now();
    let base = NewBatch {
        id: &id,
        ctx: &ctx,
        req: &req,
        output_format: &output_format,
        mantissa_bits,
        metadata,
        expires_at: now + chrono::Duration::seconds(window as i64),
    };
    if !v.file_errors.is_empty() {
        let row = insert_failed(&state, &base, &v).await?;
        return Ok(Json(BatchObject::from(&row)));
    }
    // The whole job's tokens, reserved before any line runs; settled line by line.
    let day = state
        .limits
        .reserve_daily(ctx.client_id, &ctx.limits, v.total_tokens)
        .await?;
    match insert_running(&state, &base, &v, day).await {
        Ok(row) => {
            state.batch_wake.notify_one();
            Ok(Json(BatchObject::from(&row)))
        }
        Err(e) => {
            state
                .limits
                .adjust_daily(ctx.client_id, day, -(v.total_tokens as i64))
                .await;
            Err(e)
        }
    }
}

struct NewBatch<'a> {
    id: &'a str,
    ctx: &'a ClientCtx,
    req: &'a CreateBatch,
    output_format: &'a str,
    mantissa_bits: i16,
    metadata: Option<Value>,
    expires_at: chrono::DateTime<Utc>,
}

async fn insert_failed(
    state: &AppState,
    b: &NewBatch<'_>,
    v: &Validated,
) -> Result<BatchRow, ApiError> {
    let errors: Vec<BatchError> = v
        .file_errors
        .iter()
        .map(|e| BatchError {
            code: e.code.into(),
            message: e.message.clone(),
            param: None,
            line: e.line.map(|l| l as i64),
        })
        .collect();
    sqlx::query_as(
        "INSERT INTO batches (id, client_id, key_id, endpoint, input_file_id, completion_window,
            output_format, metadata, status, errors, failed_at, expires_at, total_lines, quota_day,
            top_logprobs_mantissa_bits)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'failed', $9, now(), $10, $11, current_date, $12)
         RETURNING *",
    )
    .bind(b.id)
    .bind(b.ctx.client_id)
    .bind(b.ctx.key_id)
    .bind(&b.req.endpoint)
    .bind(&b.req.input_file_id)
    .bind(&b.req.completion_window)
    .bind(b.output_format)
    .bind(&b.metadata)
    .bind(json!(errors))
    .bind(b.expires_at)
    .bind(v.total as i32)
    .bind(b.mantissa_bits)
    .fetch_one(&state.db)
    .await
    .map_err(super::files::db_error)
}

async fn insert_running(
    state: &AppState,
    b: &NewBatch<'_>,
    v: &Validated,
    day: chrono::NaiveDate,
) -> Result<BatchRow, ApiError> {
    // Lines refused at validation are in the error file from the start.
    let mut errors = String::new();
    for e in &v.line_errors {
        errors += &super::output::error_line(&e.line.custom_id, e.line.line, None, &e.error);
    }
    let path = super::work_path(state, b.id, "errors");
    let io = |e: std::io::Error| ApiError::Internal(anyhow::anyhow!("writing the error file: {e}"));
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
    }
    tokio::fs::write(&path, errors.as_bytes())
        .await
        .map_err(io)?;
    let invalid: Vec<i32> = v.line_errors.iter().map(|e| e.line.line as i32).collect();
    sqlx::query_as(
        "INSERT INTO batches (id, client_id, key_id, endpoint, input_file_id, completion_window,
            output_format, metadata, status, in_progress_at, expires_at, total_lines, failed_lines,
            invalid_lines, error_offset, total_tokens, reserved_tokens, quota_day,
            top_logprobs_mantissa_bits)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'in_progress', now(), $9, $10, $11, $12, $13,
            $14, $14, $15, $16)
         RETURNING *",
    )
    .bind(b.id)
    .bind(b.ctx.client_id)
    .bind(b.ctx.key_id)
    .bind(&b.req.endpoint)
    .bind(&b.req.input_file_id)
    .bind(&b.req.completion_window)
    .bind(b.output_format)
    .bind(&b.metadata)
    .bind(b.expires_at)
    .bind(v.total as i32)
    .bind(invalid.len() as i32)
    .bind(&invalid)
    .bind(errors.len() as i64)
    .bind(v.total_tokens as i64)
    .bind(day)
    .bind(b.mantissa_bits)
    .fetch_one(&state.db)
    .await
    .map_err(super::files::db_error)
}

#[cfg(test)]
mod tests {
    use super::window_secs;

    #[test]
    fn completion_windows() {
        assert_eq!(window_secs("24h", 86400).unwrap(), 86400);
        assert_eq!(window_secs("90s", 86400).unwrap(), 90);
        for bad in ["25h", "0h", "h", "24", "24é", "99999999999999999999h", ""] {
            assert!(window_secs(bad, 86400).is_err(), "{bad}");
        }
    }
}
