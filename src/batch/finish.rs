//! The end of a batch: its work files become output files (`purpose: batch_output`; the
//! Parquet dataset is written here, from the output lines), the batch takes its final status,
//! and the part of the quota reservation that no line used is refunded.
//!
//! Safe to run again after a crash: output files get fresh ids (the work files are linked, not
//! moved, and removed only after the final status is committed), and the refund is taken only
//! after that commit (a crash in between over-counts the quota, never under).

use std::collections::HashMap;

use anyhow::Context;

use super::input::Format;
use super::output::OutputLine;
use super::store;
use crate::http::logprobs::LogprobsResponse;
use crate::AppState;

/// Ends batch `id` as `end` (`completed`, `cancelled` or `expired`); `unrun` lines were just
/// written to the error file as never run.
pub async fn finalize(state: &AppState, id: &str, end: &str, unrun: i32) -> anyhow::Result<()> {
    let row = store::load(&state.db, id)
        .await?
        .context("the batch vanished")?;
    if end == "completed" {
        sqlx::query(
            "UPDATE batches SET status = 'finalizing', finalizing_at = now()
             WHERE id = $1 AND status = 'in_progress'",
        )
        .bind(id)
        .execute(&state.db)
        .await?;
    }
    let out_work = super::work_path(state, id, "output");
    let err_work = super::work_path(state, id, "errors");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut output_file_ids = Vec::new();
    let mut shards_written = Vec::new();
    if size(&out_work) > 0 {
        if row.output_format == "parquet" {
            let meta = parquet_metadata(state, &row, &out_work).await?;
            let k = meta
                .get("top_k_columns")
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let layout = super::output::Layout {
                row_group_rows: state.config.batch.parquet_row_group_rows,
                shard_bytes: state.config.batch.parquet_shard_bytes,
                top_logprobs_mantissa_bits: row.top_logprobs_mantissa_bits as u32,
            };
            let work = out_work.clone();
            let shards = tokio::task::spawn_blocking(move || {
                let shard_path = |i: usize| work.with_extension(format!("shard-{i:05}.parquet"));
                super::output::write_parquet(&work, &shard_path, k, meta, layout)
            })
            .await?
            .map_err(|e| anyhow::anyhow!("writing the Parquet output: {e}"))?;
            let count = shards.len();
            for (i, shard) in shards.iter().enumerate() {
                let name = if count == 1 {
                    format!("{id}_output.parquet")
                } else {
                    format!("{id}_output-{i:05}-of-{count:05}.parquet")
                };
                let file_id = publish(state, &row, &shard.path, &name, Format::Parquet).await?;
                output_file_ids.push(file_id);
            }
            shards_written = shards.into_iter().map(|s| s.path).collect();
        } else {
            let name = format!("{id}_output.jsonl");
            output_file_ids.push(publish(state, &row, &out_work, &name, Format::Jsonl).await?);
        }
    }
    let output_file_id = output_file_ids.first().cloned();
    let mut error_file_id = None;
    if size(&err_work) > 0 {
        let name = format!("{id}_errors.jsonl");
        error_file_id = Some(publish(state, &row, &err_work, &name, Format::Jsonl).await?);
    }
    let at = match end {
        "completed" => "completed_at",
        "cancelled" => "cancelled_at",
        _ => "expired_at",
    };
    let ended = sqlx::query(&format!(
        "UPDATE batches SET status = $2, {at} = now(), output_file_id = $3, error_file_id = $4,
            failed_lines = failed_lines + $5, settled_tokens = reserved_tokens, output_file_ids = $6
         WHERE id = $1 AND status IN ('in_progress', 'finalizing', 'cancelling')"
    ))
    .bind(id)
    .bind(end)
    .bind(&output_file_id)
    .bind(&error_file_id)
    .bind(unrun)
    .bind(&output_file_ids)
    .execute(&state.db)
    .await?
    .rows_affected();
    if ended == 1 {
        let unused = row.reserved_tokens - row.settled_tokens;
        state
            .limits
            .adjust_daily(row.client_id, row.quota_day, -unused)
            .await;
        let _ = tokio::fs::remove_file(&out_work).await;
        let _ = tokio::fs::remove_file(&err_work).await;
        for shard in shards_written {
            let _ = tokio::fs::remove_file(shard).await;
        }
    }
    Ok(())
}

/// Makes the work file `src` the batch's output file `name` (a fresh file id, linked into the
/// file store); returns its id.
async fn publish(
    state: &AppState,
    row: &store::BatchRow,
    src: &std::path::Path,
    name: &str,
    format: Format,
) -> anyhow::Result<String> {
    let file_id = super::new_id("file-");
    let dest = super::file_path(state, &file_id);
    link(src, &dest).await?;
    let bytes = tokio::fs::metadata(&dest).await?.len() as i64;
    super::files::insert(
        &state.db,
        &file_id,
        row.client_id,
        "batch_output",
        name,
        bytes,
        format,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(file_id)
}

/// A hard link (same volume), else a copy.
async fn link(src: &std::path::Path, dst: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = dst.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    if tokio::fs::hard_link(src, dst).await.is_err() {
        tokio::fs::copy(src, dst).await?;
    }
    Ok(())
}

/// Provenance of a Parquet output, from its first line, the teacher and the ledger: model,
/// digests, licence, ToS version, top_k, temperature, the batch and its ledger rows.
async fn parquet_metadata(
    state: &AppState,
    row: &store::BatchRow,
    out_work: &std::path::Path,
) -> anyhow::Result<HashMap<String, String>> {
    let first = {
        use tokio::io::AsyncBufReadExt;
        let file = tokio::fs::File::open(out_work).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(file).read_line(&mut line).await?;
        line
    };
    let first: OutputLine<LogprobsResponse> = serde_json::from_str(&first)?;
    let body = first
        .response
        .context("an output line without a response")?
        .body;
    let tos: Option<String> = match row.first_ledger_id {
        Some(ledger_id) => sqlx::query_scalar("SELECT tos_version FROM usage_events WHERE id = $1")
            .bind(ledger_id)
            .fetch_optional(&state.db)
            .await?
            .flatten(),
        None => None,
    };
    let licence = state
        .models
        .get(&body.model)
        .map(|t| serde_json::to_string(&t.info.licence).unwrap_or_default())
        .unwrap_or_default();
    let k = body.top_k.min(body.teacher.vocab_size);
    let ledger = |id: Option<i64>| id.map(|i| i.to_string()).unwrap_or_default();
    Ok(HashMap::from([
        ("teachd.batch_id".into(), row.id.clone()),
        ("teachd.endpoint".into(), row.endpoint.clone()),
        ("model".into(), body.model.clone()),
        ("weights_sha256".into(), body.teacher.weights_sha256.clone()),
        (
            "tokenizer_sha256".into(),
            body.teacher.tokenizer_sha256.clone(),
        ),
        ("quantization".into(), body.teacher.quantization.clone()),
        ("vocab_size".into(), body.teacher.vocab_size.to_string()),
        ("licence".into(), licence),
        ("tos_version".into(), tos.unwrap_or_default()),
        ("top_k".into(), body.top_k.to_string()),
        ("top_k_columns".into(), k.to_string()),
        ("temperature".into(), body.temperature.to_string()),
        (
            "top_logprobs_mantissa_bits".into(),
            row.top_logprobs_mantissa_bits.to_string(),
        ),
        ("score_from".into(), "per row: column score_from".into()),
        ("ledger_first_id".into(), ledger(row.first_ledger_id)),
        ("ledger_last_id".into(), ledger(row.last_ledger_id)),
    ]))
}
