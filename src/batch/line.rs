//! One line of a batch: run through the endpoint's own code, recorded as one ledger row,
//! settled against the batch's reservation, appended to the output or error file, and the
//! resume point committed (see [`super::runner`] for the order and why it is safe).

use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::input::InputLine;
use super::runner::Work;
use super::validate::{self, Job};
use crate::engine::{Lane, SpareTurn};
use crate::error::ApiError;
use crate::ledger::{LedgerError, UsageEvent};
use crate::usage::{Meter, Usage};
use crate::AppState;

/// What one line produced.
struct Ran {
    ok: bool,
    text: String,
    cost: u64,
    estimate: u64,
    event: UsageEvent,
}

/// A line checked and ready to run: its job prepared (or the reason it cannot run) and its
/// ledger row begun.
pub(super) struct Prepared {
    line: InputLine,
    request_id: String,
    started: Instant,
    event: UsageEvent,
    job: Result<Job, ApiError>,
    estimate: u64,
}

impl Prepared {
    /// A [`SpareTurn`] for this line, if it is teacher forcing and its teacher's generation
    /// engine is idle (see [`crate::engine::SpareTurn`]).
    pub(super) async fn spare(&self) -> Option<SpareTurn> {
        match &self.job {
            Ok(Job::Logprobs { teacher, plan }) => teacher.spare(plan.ids.len()).await,
            _ => None,
        }
    }

    /// Counts its latency from now (a line that waited for the one before it).
    pub(super) fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// The input line it was prepared from.
    pub(super) fn into_line(self) -> InputLine {
        self.line
    }
}

pub(super) async fn prepare(state: &AppState, work: &mut Work, line: InputLine) -> Prepared {
    let row = &work.row;
    let request_id = format!("{}:{}", row.id, line.line);
    let started = Instant::now();
    let mut event = UsageEvent::begin(
        request_id.clone(),
        row.client_id,
        row.key_id,
        "POST".into(),
        row.endpoint.clone(),
        200,
        state.tos.current_version_for_ledger().await,
    );
    event.request_sha256 = Sha256::digest(line.body.to_string().as_bytes()).into();
    let job = validate::prepare(state, &mut work.lookup, &row.endpoint, &line).await;
    let estimate = job.as_ref().map_or(0, Job::cost);
    Prepared {
        line,
        request_id,
        started,
        event,
        job,
        estimate,
    }
}

/// Runs one line and commits it (see the module notes).
pub(super) async fn run_line(
    state: &AppState,
    work: &mut Work,
    line: Prepared,
) -> anyhow::Result<()> {
    let (index, ran, started) = run(line, Lane::Background).await?;
    commit(state, work, index, ran, started).await
}

/// Runs `first`, and `second` beside it on the teacher's generation engine if that engine is
/// (or within its settle pause becomes) idle; commits them in order (the second is not
/// committed if the first fails to commit, and runs again later). Returns `second` unrun when
/// it found no idle engine: it runs next.
pub(super) async fn run_pair(
    state: &AppState,
    work: &mut Work,
    first: Prepared,
    second: Prepared,
) -> anyhow::Result<Option<Prepared>> {
    let beside = async {
        match second.spare().await {
            Some(spare) => Ok(run(second, Lane::Spare(spare)).await),
            None => Err(second),
        }
    };
    let (a, b) = tokio::join!(run(first, Lane::Background), beside);
    let (index, ran, started) = a?;
    commit(state, work, index, ran, started).await?;
    match b {
        Ok(b) => {
            let (index, ran, started) = b?;
            commit(state, work, index, ran, started).await?;
            Ok(None)
        }
        Err(second) => Ok(Some(second)),
    }
}

/// Runs a prepared line; returns its index, what it produced and when it began.
async fn run(prepared: Prepared, lane: Lane) -> anyhow::Result<(usize, Ran, Instant)> {
    let Prepared {
        line,
        request_id,
        started,
        mut event,
        job,
        estimate,
    } = prepared;
    let (result, usage) = match job {
        Ok(job) => {
            event.model = Some(job.teacher().info.id.clone());
            event.weights_sha256 = Some(job.teacher().info.weights_sha256.clone());
            event.top_k = job.top_k().map(|k| k as i32);
            execute(job, lane).await
        }
        Err(e) => (Err(e), Usage::default()),
    };
    event.prompt_tokens = usage.prompt_tokens as i64;
    event.scored_tokens = usage.scored_tokens as i64;
    event.generated_tokens = usage.generated_tokens as i64;
    event.judgments = usage.judgments as i64;
    // What ran is paid for, failed or not, never past the line's reservation.
    let cost = usage.billable_tokens().min(estimate);
    let ran = match result {
        Ok(body) => {
            let bytes = serde_json::to_vec(&body)?;
            event.response_sha256 = Sha256::digest(&bytes).into();
            event.response_bytes = bytes.len() as i64;
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
            event.response_bytes = envelope.len() as i64;
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
    Ok((line.index, ran, started))
}

/// A line's response body, serialised exactly as its endpoint serialises it. One per line,
/// short-lived: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Body {
    Logprobs(crate::http::logprobs::LogprobsResponse),
    Completions(crate::http::completions::CompletionResponse),
    Chat(crate::http::chat::ChatResponse),
    Judgment(crate::http::judgments::JudgmentResult),
}

/// Runs one line's job through the endpoint's own code; returns the body the endpoint would
/// answer and what the engine ran (recorded on a meter of its own, as the endpoint records it).
async fn execute(job: Job, lane: Lane) -> (Result<Body, ApiError>, Usage) {
    match job {
        Job::Logprobs { teacher, plan } => {
            match crate::http::logprobs::execute(&teacher, plan, lane).await {
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
        Job::Chat { checked, .. } => {
            let (meter, _watch) = Meter::detached();
            let result = crate::http::chat::respond(checked, &meter).await;
            (result.map(Body::Chat), meter.usage())
        }
        Job::Judgment { teacher, planned } => {
            match crate::http::judgments::judge_one(&teacher, planned).await {
                Ok(r) => {
                    let usage = Usage {
                        prompt_tokens: r.usage.total_tokens as u64,
                        scored_tokens: r.usage.scored_tokens as u64,
                        judgments: 1,
                        ..Usage::default()
                    };
                    (Ok(Body::Judgment(r)), usage)
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
            Some(id.id)
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
