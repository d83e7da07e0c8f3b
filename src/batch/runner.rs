//! The batch runner: one background task per process that runs the lines of every active
//! batch, one line at a time, taking the active batches in turn (one line of each per round,
//! so a long batch does not hold up a short one).
//!
//! **Priority.** Each line is one engine request through the model's FIFO gate, like an
//! interactive request: an interactive call waits at most for the line in progress, never
//! behind a whole batch.
//!
//! **One ledger row per line**, recorded like an interactive request's (endpoint, model,
//! status, tokens, top_k, body hashes, ToS version, weights) under the request id
//! `<batch id>:<line>`. Per line rather than one per batch: audits and usage queries see batch
//! work like any other, each row carries its own sequence's tokens, and the ledger's
//! uniqueness of (client, request id) makes resumption exactly-once: a line whose row exists
//! is never billed twice.
//!
//! **Per line:** run, record the row (fail closed: no output without a row; an unavailable
//! ledger pauses the batch), settle the line's quota estimate against what it cost, append its
//! output or error line, then commit the resume point (next line, the work files' sizes). After
//! a crash the work files are cut back to the committed sizes and the batch goes on from the
//! next line: no line is lost or written twice.
//!
//! **Limits.** Interactive rpm/tpm do not apply line by line: the job's whole cost was reserved
//! against the daily quota when it was created, `batch.max_active_per_client` bounds a
//! client's unfinished batches, and lines run one at a time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::input::{self, Format, InputLine, Item};
use super::store::{self, BatchRow};
use super::validate::{self, Job, Lookup};
use crate::error::ApiError;
use crate::ledger::chain::to_db_precision;
use crate::ledger::{LedgerError, UsageEvent};
use crate::usage::{Meter, Usage};
use crate::AppState;

/// Starts the runner; it stops (after the line in progress) when `stop` turns true.
pub fn spawn(
    state: AppState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let poll = Duration::from_millis(state.config.batch.poll_ms.max(10));
        let mut open: HashMap<String, Work> = HashMap::new();
        loop {
            if *stop.borrow() {
                return;
            }
            let ids = match store::active(&state.db).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "batch runner cannot list batches");
                    Vec::new()
                }
            };
            open.retain(|id, _| ids.contains(id));
            let mut busy = false;
            for id in ids {
                if *stop.borrow() {
                    return;
                }
                match step(&state, &mut open, &id).await {
                    Ok(more) => busy |= more,
                    Err(e) => {
                        tracing::warn!(batch = %id, error = %e, "batch step failed; retrying later");
                        open.remove(&id);
                    }
                }
            }
            if !busy {
                tokio::select! {
                    _ = state.batch_wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    })
}

/// A batch being run: its input read from the resume point, its work files open for append.
struct Work {
    row: BatchRow,
    items: tokio::sync::mpsc::Receiver<Item>,
    out: tokio::fs::File,
    err: tokio::fs::File,
    invalid: HashSet<i32>,
    lookup: Lookup<'static>,
    /// Next 0-based line index to run.
    next: usize,
}

async fn open_work(state: &AppState, id: &str) -> anyhow::Result<Option<Work>> {
    let Some(row) = store::load(&state.db, id).await? else {
        return Ok(None);
    };
    let out = reopen(&super::work_path(state, id, "output"), row.output_offset).await?;
    let err = reopen(&super::work_path(state, id, "errors"), row.error_offset).await?;
    let format: Option<String> = sqlx::query_scalar("SELECT format FROM batch_files WHERE id = $1")
        .bind(&row.input_file_id)
        .fetch_optional(&state.db)
        .await?;
    let items = input::read(
        super::file_path(state, &row.input_file_id),
        Format::parse(format.as_deref().unwrap_or("jsonl")),
        row.endpoint.clone(),
        row.metadata.clone(),
    );
    Ok(Some(Work {
        invalid: row.invalid_lines.iter().copied().collect(),
        next: row.next_line as usize,
        row,
        items,
        out,
        err,
        lookup: Lookup::unchecked(),
    }))
}

/// A work file cut back to its committed size (what a crash wrote past it is dropped).
async fn reopen(path: &std::path::Path, size: i64) -> anyhow::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .await?;
    file.set_len(size as u64).await?;
    let mut file = file;
    use tokio::io::AsyncSeekExt;
    file.seek(std::io::SeekFrom::Start(size as u64)).await?;
    Ok(file)
}

/// Advances batch `id` by one line, or finishes it. True while it has more to do.
async fn step(
    state: &AppState,
    open: &mut HashMap<String, Work>,
    id: &str,
) -> anyhow::Result<bool> {
    if !open.contains_key(id) {
        match open_work(state, id).await? {
            Some(work) => open.insert(id.to_string(), work),
            None => return Ok(false),
        };
    }
    let work = open.get_mut(id).expect("opened above");
    let (status, expires_at): (String, chrono::DateTime<Utc>) =
        sqlx::query_as("SELECT status, expires_at FROM batches WHERE id = $1")
            .bind(id)
            .fetch_one(&state.db)
            .await?;
    let done = match status.as_str() {
        "cancelling" => Some("cancelled"),
        "finalizing" => Some("completed"),
        "in_progress" if Utc::now() > expires_at => Some("expired"),
        "in_progress" => None,
        _ => return Ok(false),
    };
    if let Some(end) = done {
        finish(state, open, id, end).await?;
        return Ok(false);
    }
    // The next line to run (lines before the resume point were done in an earlier life).
    let line = loop {
        match work.items.recv().await {
            None => {
                finish(state, open, id, "completed").await?;
                return Ok(false);
            }
            Some(Item::Malformed(e)) => anyhow::bail!("input no longer readable: {}", e.message),
            Some(Item::Line(line)) if line.index < work.next => continue,
            Some(Item::Line(line)) if work.invalid.contains(&(line.line as i32)) => {
                work.next = line.index + 1;
                continue;
            }
            Some(Item::Line(line)) => break line,
        }
    };
    run_line(state, work, line).await?;
    Ok(true)
}

/// What one line produced.
struct Ran {
    ok: bool,
    text: String,
    cost: u64,
    estimate: u64,
    event: UsageEvent,
}

async fn run_line(state: &AppState, work: &mut Work, line: InputLine) -> anyhow::Result<()> {
    let row = &work.row;
    let request_id = format!("{}:{}", row.id, line.line);
    let started = Instant::now();
    let mut event = UsageEvent {
        request_id: request_id.clone(),
        ts: to_db_precision(Utc::now()),
        client_id: row.client_id,
        key_id: row.key_id,
        method: "POST".into(),
        endpoint: row.endpoint.clone(),
        model: None,
        status: 200,
        error_code: None,
        prompt_tokens: 0,
        scored_tokens: 0,
        generated_tokens: 0,
        judgments: 0,
        top_k: None,
        latency_ms: 0.0,
        request_sha256: Sha256::digest(line.body.to_string().as_bytes()).into(),
        response_sha256: Sha256::digest(b"").into(),
        tos_version: state.tos.current_version_for_ledger().await,
        weights_sha256: None,
        refusals: 0,
    };
    let job = validate::prepare(state, &mut work.lookup, &row.endpoint, &line).await;
    let estimate = job.as_ref().map_or(0, Job::cost);
    let (result, usage) = match job {
        Ok(job) => {
            event.model = Some(job.teacher().info.id.clone());
            event.weights_sha256 = Some(job.teacher().info.weights_sha256.clone());
            event.top_k = job.top_k().map(|k| k as i32);
            execute(job).await
        }
        Err(e) => (Err(e), Usage::default()),
    };
    event.prompt_tokens = usage.prompt_tokens as i64;
    event.scored_tokens = usage.scored_tokens as i64;
    event.generated_tokens = usage.generated_tokens as i64;
    // What ran is paid for, failed or not, never past the line's reservation.
    let cost = usage.billable_tokens().min(estimate);
    let ran = match result {
        Ok(body) => {
            event.response_sha256 = Sha256::digest(serde_json::to_vec(&body)?).into();
            Ran {
                ok: true,
                text: super::output::ok_line(&line.custom_id, &request_id, &body),
                cost,
                estimate,
                event,
            }
        }
        Err(err) => {
            event.status = err.status().as_u16() as i16;
            event.error_code = err.code().map(str::to_string);
            let envelope = serde_json::to_vec(&err.envelope(Some(request_id.clone())))?;
            event.response_sha256 = Sha256::digest(&envelope).into();
            Ran {
                ok: false,
                text: super::output::error_line(
                    &line.custom_id,
                    line.line,
                    Some(&request_id),
                    &err,
                ),
                cost,
                estimate,
                event,
            }
        }
    };
    commit(state, work, line.index, ran, started).await
}

/// A line's response body, serialised exactly as its endpoint serialises it.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Body {
    Logprobs(crate::http::logprobs::LogprobsResponse),
    Completions(crate::http::completions::CompletionResponse),
}

/// Runs one line's job through the endpoint's own code; returns the body the endpoint would
/// answer and what the engine ran (recorded on a meter of its own, as the endpoint records it).
async fn execute(job: Job) -> (Result<Body, ApiError>, Usage) {
    match job {
        Job::Logprobs { teacher, plan } => {
            match crate::http::logprobs::execute(&teacher, plan).await {
                Ok(body) => {
                    let usage = Usage {
                        prompt_tokens: body.usage.prompt_tokens as u64,
                        scored_tokens: body.usage.scored_tokens as u64,
                        ..Usage::default()
                    };
                    (Ok(Body::Logprobs(body)), usage)
                }
                Err(e) => (Err(e), Usage::default()),
            }
        }
        Job::Completions { checked, .. } => {
            let (meter, _watch) = Meter::detached();
            let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
            let created = Utc::now().timestamp();
            let result = crate::http::completions::respond(checked, &meter, id, created).await;
            (result.map(Body::Completions), meter.usage())
        }
    }
}

async fn commit(
    state: &AppState,
    work: &mut Work,
    index: usize,
    mut ran: Ran,
    started: Instant,
) -> anyhow::Result<()> {
    ran.event.latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let row = &work.row;
    let ledger_id = match state.ledger.record(ran.event, None).await {
        Ok(id) => {
            // New row: settle this line's share of the reservation at what it cost.
            let delta = ran.cost as i64 - ran.estimate as i64;
            state
                .limits
                .adjust_daily(row.client_id, row.quota_day, delta)
                .await;
            Some(id)
        }
        // Recorded (and settled) before a restart: write the output, bill nothing again.
        Err(LedgerError::DuplicateRequestId(_)) => None,
        Err(e) => {
            // Fail closed: no output without its row. The line is run again later.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Err(ApiError::from(e).into());
        }
    };
    let file = if ran.ok { &mut work.out } else { &mut work.err };
    file.write_all(ran.text.as_bytes()).await?;
    file.flush().await?;
    file.sync_data().await?;
    let (out_len, err_len) = (
        work.out.metadata().await?.len(),
        work.err.metadata().await?.len(),
    );
    sqlx::query(
        "UPDATE batches SET next_line = $2, output_offset = $3, error_offset = $4,
            completed_lines = completed_lines + $5, failed_lines = failed_lines + $6,
            scored_tokens = scored_tokens + $7, settled_tokens = settled_tokens + $8,
            first_ledger_id = coalesce(first_ledger_id, $9),
            last_ledger_id = coalesce($9, last_ledger_id)
         WHERE id = $1",
    )
    .bind(&row.id)
    .bind(index as i32 + 1)
    .bind(out_len as i64)
    .bind(err_len as i64)
    .bind(ran.ok as i32)
    .bind(!ran.ok as i32)
    .bind(ran.cost as i64)
    .bind(ran.estimate as i64)
    .bind(ledger_id)
    .execute(&state.db)
    .await?;
    work.next = index + 1;
    Ok(())
}

/// Ends batch `id` as `end` (completed, cancelled or expired): unrun lines of an expired batch
/// go to the error file as `batch_expired`, the outputs become files, the unused reservation is
/// refunded.
async fn finish(
    state: &AppState,
    open: &mut HashMap<String, Work>,
    id: &str,
    end: &str,
) -> anyhow::Result<()> {
    let Some(mut work) = open.remove(id) else {
        return Ok(());
    };
    let mut unrun = 0;
    if end == "expired" {
        while let Some(item) = work.items.recv().await {
            let Item::Line(line) = item else { continue };
            if line.index < work.next || work.invalid.contains(&(line.line as i32)) {
                continue;
            }
            let text = super::output::unrun_line(
                &line.custom_id,
                line.line,
                "batch_expired",
                "the batch's completion window ended before this line ran",
            );
            work.err.write_all(text.as_bytes()).await?;
            unrun += 1;
        }
        work.err.flush().await?;
        work.err.sync_data().await?;
    }
    super::finish::finalize(state, id, end, unrun).await
}
