//! The batch runner: one background task per process that runs the lines of every active
//! batch, taking the active batches in turn (a step of each per round, so a long batch does
//! not hold up a short one).
//!
//! **Two lines at once when the machine allows.** A step runs a batch's next line on the
//! scoring engine and, if the line after it is teacher forcing and the model's generation
//! engine is idle ([`crate::engine::SpareTurn`]), that one beside it on the generation engine
//! (with native scoring, a second pass of the same native model); otherwise the second line
//! runs first in the next step. The two are committed in order.
//!
//! **Priority.** Each line is one engine request in the model's queue, like an interactive
//! request: an interactive `/v1/logprobs` call waits at most for the line in progress on the
//! scoring engine, and a generation at most for the one line a spare turn runs, never behind
//! a whole batch.
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
//! **One runner per batch.** Several `teachd serve` processes may share one database (and a
//! data directory on a shared volume): a runner drives a batch only while it holds the batch's
//! session-level advisory lock (`pg_try_advisory_lock`) on a connection of its own, so two
//! processes never run the same batch. Postgres releases the lock when that connection or the
//! process dies, and another runner takes the batch over from its last committed line.
//!
//! **Limits.** Interactive rpm/tpm do not apply line by line: the job's whole cost was reserved
//! against the daily quota when it was created, `batch.max_active_per_client` bounds a
//! client's unfinished batches, and a batch runs at most two lines at once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use tokio::io::AsyncWriteExt;

use super::input::{self, Format, Item};
use super::store::{self, BatchRow};
use super::validate::Lookup;
use crate::AppState;

/// Starts the runner; it stops (after the line in progress) when `stop` turns true.
pub fn spawn(
    state: AppState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let poll = Duration::from_millis(state.config.batch.poll_ms.max(10));
        let mut open: HashMap<String, Work> = HashMap::new();
        let mut claims = Claims::default();
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
            if !claims.keep(&ids).await {
                // The claims' connection is gone, and with it every lock: start over.
                open.clear();
            }
            let mut busy = false;
            for id in ids {
                if *stop.borrow() {
                    return;
                }
                match claims.claim(&state.db, &id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Another process runs it.
                        open.remove(&id);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(batch = %id, error = %e, "cannot claim batch; retrying later");
                        open.clear();
                        continue;
                    }
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

/// Advisory-lock namespace of batch claims (`pg_try_advisory_lock(int4, int4)`).
pub const CLAIM_NAMESPACE: i32 = 0x7465_6163; // "teac"

/// The batches this process runs: session-level advisory locks held on one connection of its
/// own (detached from the pool, so it is never handed to anyone else).
#[derive(Default)]
struct Claims {
    conn: Option<sqlx::PgConnection>,
    held: HashSet<String>,
}

impl Claims {
    /// Whether this process holds (or now took) batch `id`.
    async fn claim(&mut self, db: &sqlx::PgPool, id: &str) -> anyhow::Result<bool> {
        if self.held.contains(id) {
            return Ok(true);
        }
        if self.conn.is_none() {
            self.conn = Some(db.acquire().await?.detach());
            self.held.clear();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let taken: Result<bool, _> =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(CLAIM_NAMESPACE)
                .bind(id)
                .fetch_one(&mut *conn)
                .await;
        match taken {
            Ok(true) => {
                self.held.insert(id.to_string());
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                self.conn = None;
                self.held.clear();
                Err(e.into())
            }
        }
    }

    /// Releases the claims of batches no longer active and checks that the connection (and so
    /// every lock) is still there; false when it was lost.
    async fn keep(&mut self, active: &[String]) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return true;
        };
        let done: Vec<String> = self
            .held
            .iter()
            .filter(|id| !active.contains(id))
            .cloned()
            .collect();
        let mut alive = sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok();
        for id in done {
            self.held.remove(&id);
            alive &= sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
                .bind(CLAIM_NAMESPACE)
                .bind(&id)
                .execute(&mut *conn)
                .await
                .is_ok();
        }
        if !alive {
            self.conn = None;
            self.held.clear();
        }
        alive
    }
}

/// A batch being run: its input read from the resume point, its work files open for append.
pub(super) struct Work {
    pub(super) row: BatchRow,
    items: tokio::sync::mpsc::Receiver<Item>,
    pub(super) out: tokio::fs::File,
    pub(super) err: tokio::fs::File,
    invalid: HashSet<i32>,
    pub(super) lookup: Lookup<'static>,
    /// Next 0-based line index to run.
    pub(super) next: usize,
    /// A line prepared to run beside the previous one that found no idle engine: it runs next.
    pending: Option<super::line::Prepared>,
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
        pending: None,
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
    let first = match work.pending.take() {
        Some(mut prepared) => {
            prepared.restart_clock();
            prepared
        }
        None => match next_line(work).await? {
            Some(line) => super::line::prepare(state, work, line).await,
            None => {
                finish(state, open, id, "completed").await?;
                return Ok(false);
            }
        },
    };
    // A second line runs beside it when it is teacher forcing and its teacher's generation
    // engine is idle (the first takes the scoring engine); otherwise it runs next.
    match next_line(work).await? {
        Some(line) => {
            let second = super::line::prepare(state, work, line).await;
            work.pending = super::line::run_pair(state, work, first, second).await?;
        }
        None => super::line::run_line(state, work, first).await?,
    }
    Ok(true)
}

/// The next line to run: lines before the resume point (done in an earlier life) and lines
/// found invalid at validation are passed over. `None` at the end of the input.
async fn next_line(work: &mut Work) -> anyhow::Result<Option<input::InputLine>> {
    loop {
        match work.items.recv().await {
            None => return Ok(None),
            Some(Item::Malformed(e)) => anyhow::bail!("input no longer readable: {}", e.message),
            Some(Item::Line(line)) if line.index < work.next => continue,
            Some(Item::Line(line)) if work.invalid.contains(&(line.line as i32)) => {
                work.next = line.index + 1;
                continue;
            }
            Some(Item::Line(line)) => return Ok(Some(line)),
        }
    }
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
        // A line prepared to run next was already taken from the input: it comes first.
        let mut pending = work.pending.take().map(super::line::Prepared::into_line);
        loop {
            let line = match pending.take() {
                Some(line) => line,
                None => match work.items.recv().await {
                    Some(Item::Line(line)) => line,
                    Some(Item::Malformed(_)) => continue,
                    None => break,
                },
            };
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
