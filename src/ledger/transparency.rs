//! The transparency log over the ledger: signed checkpoints, proofs, leaves and the audit of a
//! ledger against checkpoints that were saved elsewhere.
//!
//! Checkpoints: every `tlog.checkpoint_interval_secs` while the tree grows (and on demand when
//! the latest is older), one process signs the tree as committed (size = the last row id: the
//! writer commits rows and their tree hashes together, ids without gaps), stores the note in
//! `ledger_checkpoints` and writes it to `tlog.checkpoint_dir` when set. Several processes on
//! one database share one tree; the first to store a size wins, the others reuse its note.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::chain::{encode, Verifier, GENESIS};
use super::queries;
use super::signing::{open_checkpoint, CheckpointError, LogKey};
use super::tree::{self, Frontier, PgStore, TreeError};
use crate::config::TlogConfig;

/// The log of one ledger: its key and checkpoint policy.
pub struct Tlog {
    pub key: Arc<LogKey>,
    pool: PgPool,
    interval: Duration,
    dir: Option<PathBuf>,
    /// Serialises checkpoint making within this process.
    making: tokio::sync::Mutex<()>,
}

/// A stored checkpoint.
#[derive(Clone, Debug)]
pub struct StoredCheckpoint {
    pub tree_size: u64,
    pub root: [u8; 32],
    pub note: String,
    pub created_at: DateTime<Utc>,
}

impl Tlog {
    pub fn new(key: Arc<LogKey>, pool: PgPool, cfg: &TlogConfig) -> Tlog {
        Tlog {
            key,
            pool,
            interval: Duration::from_secs(cfg.checkpoint_interval_secs),
            dir: (!cfg.checkpoint_dir.as_os_str().is_empty()).then(|| cfg.checkpoint_dir.clone()),
            making: tokio::sync::Mutex::new(()),
        }
    }

    /// Signs checkpoints in the background until the pool closes.
    pub fn spawn_checkpointer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.interval.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(log) = weak.upgrade() else { return };
                if log.pool.is_closed() {
                    return;
                }
                if let Err(e) = log.checkpoint().await {
                    tracing::debug!(error = %e, "no checkpoint this round");
                }
            }
        });
    }

    /// The latest checkpoint, making a new one first when the tree grew and the latest is at
    /// least `tlog.checkpoint_interval_secs` old (or there is none).
    pub async fn checkpoint(&self) -> Result<StoredCheckpoint, TreeError> {
        let _turn = self.making.lock().await;
        let latest = self.latest().await?;
        let fresh = latest.as_ref().is_some_and(|c| {
            (Utc::now() - c.created_at).to_std().unwrap_or_default() < self.interval
        });
        if fresh {
            return Ok(latest.expect("checked"));
        }
        let size = self.size().await?;
        if let Some(c) = latest.as_ref().filter(|c| c.tree_size >= size) {
            return Ok(c.clone());
        }
        let root = tree::root(&PgStore(&self.pool), size).await?;
        let note = self
            .key
            .sign_checkpoint(size, root)
            .map_err(|e| TreeError::Input(e.to_string()))?;
        let inserted = sqlx::query(
            "INSERT INTO ledger_checkpoints (tree_size, root_hash, note) VALUES ($1, $2, $3) \
             ON CONFLICT (tree_size) DO NOTHING",
        )
        .bind(size as i64)
        .bind(&root[..])
        .bind(&note)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            self.write_file(size, &note);
        }
        Ok(self.latest().await?.expect("a checkpoint was just stored"))
    }

    async fn latest(&self) -> Result<Option<StoredCheckpoint>, sqlx::Error> {
        let row: Option<(i64, Vec<u8>, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT tree_size, root_hash, note, created_at FROM ledger_checkpoints \
             ORDER BY tree_size DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(size, root, note, created_at)| StoredCheckpoint {
            tree_size: size as u64,
            root: root.try_into().unwrap_or([0; 32]),
            note,
            created_at,
        }))
    }

    /// Appends the checkpoint to the checkpoint directory (one file per size, never replaced).
    fn write_file(&self, size: u64, note: &str) {
        let Some(dir) = &self.dir else { return };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("{size:020}.checkpoint"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            std::io::Write::write_all(&mut f, note.as_bytes())?;
            f.sync_all()
        };
        match write() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "could not write a checkpoint file")
            }
        }
    }

    /// The size of the committed tree (= rows).
    pub async fn size(&self) -> Result<u64, sqlx::Error> {
        let size: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM usage_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(size as u64)
    }
}

/// One thing an audit against checkpoints found wrong.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Failure {
    /// `malformed_checkpoint`, `bad_signature`, `wrong_origin`, `truncated` (the checkpoint
    /// signed more rows than the ledger has), `root_mismatch` (the first `tree_size` rows are
    /// not the history the checkpoint signed: rows edited with a recomputed chain, or a
    /// replaced history), `tree_mismatch` (a row no longer matches the leaf the tree stored when
    /// it was written), `chain_broken` (a row's hash does not follow from its predecessor),
    /// `tree_incomplete`.
    pub kind: String,
    pub detail: String,
}

/// What `verify` with checkpoints found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AuditReport {
    pub ok: bool,
    pub rows_checked: u64,
    pub first_bad_event_id: Option<i64>,
    /// The size and root of the tree recomputed from the rows.
    pub tree_size: u64,
    pub root_hash: String,
    pub checkpoints_checked: u64,
    pub failures: Vec<Failure>,
}

/// Recomputes the chain and the tree from every row, compares the tree with the stored one and
/// each checkpoint's root with the recomputed root at its size.
pub async fn audit(
    pool: &PgPool,
    verifier_key: &str,
    origin: &str,
    checkpoints: &[String],
) -> Result<AuditReport, sqlx::Error> {
    let mut failures = Vec::new();
    let mut wanted: Vec<(usize, u64, [u8; 32])> = Vec::new();
    for (i, text) in checkpoints.iter().enumerate() {
        match open_checkpoint(verifier_key, text) {
            Ok(cp) if cp.origin != origin => failures.push(Failure {
                kind: "wrong_origin".into(),
                detail: format!("checkpoint {i} is of log `{}`, not `{origin}`", cp.origin),
            }),
            Ok(cp) => wanted.push((i, cp.size, cp.root)),
            Err(CheckpointError::Malformed(e)) => failures.push(Failure {
                kind: "malformed_checkpoint".into(),
                detail: format!("checkpoint {i}: {e}"),
            }),
            Err(CheckpointError::BadSignature(e)) => failures.push(Failure {
                kind: "bad_signature".into(),
                detail: format!("checkpoint {i}: {e}"),
            }),
        }
    }
    wanted.sort_by_key(|w| w.1);

    // One pass over the rows: chain, tree, roots at the checkpoints' sizes.
    let mut chain = Verifier::new(Some(0), GENESIS);
    let mut frontier = Frontier::default();
    let mut stored_mismatch: Option<i64> = None;
    let mut roots: Vec<(u64, [u8; 32])> = Vec::new();
    let mut next = wanted.iter().peekable();
    while next.peek().is_some_and(|w| w.1 == 0) {
        roots.push((0, Frontier::default().root()));
        next.next();
    }
    let mut after = 0i64;
    loop {
        let rows = queries::events_after(pool, &Default::default(), after, 5_000).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let first_leaf = rows[0].id.max(1) as u64 - 1;
        let stored = stored_leaves(pool, first_leaf, rows.len() as u64).await?;
        for event in rows {
            chain.check(&event);
            let leaf = tree::leaf_hash(&event.row_hash);
            let leaf_idx = tree::stored_hash_index(0, frontier.size);
            if stored_mismatch.is_none() && stored.get(&leaf_idx) != Some(&leaf) {
                stored_mismatch = Some(event.id);
            }
            frontier.append(&event.row_hash);
            while next.peek().is_some_and(|w| w.1 == frontier.size) {
                roots.push((frontier.size, frontier.root()));
                next.next();
            }
        }
    }
    let size = frontier.size;
    for w in next {
        failures.push(Failure {
            kind: "truncated".into(),
            detail: format!(
                "checkpoint {} signed a tree of {} rows; the ledger has {size}: rows were deleted",
                w.0, w.1
            ),
        });
    }
    for (i, cp_size, cp_root) in &wanted {
        if let Some((_, root)) = roots.iter().find(|r| r.0 == *cp_size) {
            if root != cp_root {
                failures.push(Failure {
                    kind: "root_mismatch".into(),
                    detail: format!(
                        "checkpoint {i}: the first {cp_size} rows are not the history it signed \
                         (rows edited with a recomputed chain, or a replaced history)"
                    ),
                });
            }
        }
    }
    if let Some(id) = chain.first_bad {
        failures.push(Failure {
            kind: "chain_broken".into(),
            detail: format!("row {id} does not follow from its predecessor"),
        });
    }
    if let Some(id) = stored_mismatch {
        failures.push(Failure {
            kind: "tree_mismatch".into(),
            detail: format!("row {id} is not the row the tree recorded when it was written"),
        });
    }
    Ok(AuditReport {
        ok: failures.is_empty(),
        rows_checked: chain.rows_checked,
        first_bad_event_id: chain.first_bad.or(stored_mismatch),
        tree_size: size,
        root_hash: base64::Engine::encode(&base64::prelude::BASE64_STANDARD, frontier.root()),
        checkpoints_checked: checkpoints.len() as u64,
        failures,
    })
}

/// [`audit`], and with a `range`, the chain recomputed over that range alone from its stored
/// predecessor (as `GET /admin/audit/verify` does): a break there is a `chain_broken` failure.
pub async fn audit_with_range(
    pool: &PgPool,
    verifier_key: &str,
    origin: &str,
    checkpoints: &[String],
    range: Option<queries::TimeRange>,
) -> Result<AuditReport, sqlx::Error> {
    let mut report = audit(pool, verifier_key, origin, checkpoints).await?;
    if let Some(range) = range {
        let ranged = queries::verify(pool, range).await?;
        if let Some(id) = ranged
            .first_bad_event_id
            .filter(|_| report.first_bad_event_id.is_none())
        {
            report.ok = false;
            report.first_bad_event_id = Some(id);
            report.failures.push(Failure {
                kind: "chain_broken".into(),
                detail: format!("row {id} of the range does not follow from its predecessor"),
            });
        }
    }
    Ok(report)
}

/// The stored leaf hashes of leaves `first..first + n`, by stored index.
async fn stored_leaves(
    pool: &PgPool,
    first: u64,
    n: u64,
) -> Result<std::collections::HashMap<u64, [u8; 32]>, sqlx::Error> {
    let indexes: Vec<u64> = (first..first + n)
        .map(|i| tree::stored_hash_index(0, i))
        .collect();
    tree::fetch(pool, &indexes).await
}

/// The canonical bytes of row `id` (what its `row_hash` commits to, after `prev_hash`).
pub fn canonical(event: &super::ChainedEvent) -> Vec<u8> {
    encode(event.id, &event.event)
}
