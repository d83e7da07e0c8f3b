//! The single writer task: group commit with a hash chain.
//!
//! Each batch is ONE autocommit statement (`INSERT ... SELECT FROM UNNEST(...)`, with the bodies
//! in a data-modifying CTE when they are stored): one round trip and one fsync for hundreds of
//! rows. Ids are `head + 1..`; the primary key on `id` makes concurrent writers (several
//! processes on one ledger) safe without a lock: a writer with a stale head hits a key conflict,
//! reloads the head and retries, so the chain never forks.
//!
//! Failure: any error other than a key conflict answers every row of the batch with
//! [`LedgerError::Unavailable`], drops the connection and forgets the head (a lost COMMIT reply
//! may or may not have committed). The next batch reconnects (at most every
//! `RECONNECT_BACKOFF`) and reloads the head, so service resumes by itself.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::chain::{row_hash, UsageEvent, GENESIS};
use super::tree::{self, Frontier};
use super::{Bodies, Committed, LedgerError, Msg};
use crate::config::LedgerConfig;

const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Key conflicts with another writer are retried this often before the batch is refused.
const MAX_CONFLICT_RETRIES: usize = 8;

struct Pending {
    event: UsageEvent,
    bodies: Option<Bodies>,
    done: oneshot::Sender<Result<Committed, LedgerError>>,
}

struct Writer {
    opts: PgConnectOptions,
    cfg: LedgerConfig,
    conn: Option<PgConnection>,
    /// `(id, row_hash)` of the last committed row and the Merkle tree's right edge over the
    /// rows up to it, when known for sure.
    head: Option<(i64, [u8; 32], Frontier)>,
    next_connect: Instant,
    healthy: Arc<AtomicBool>,
}

pub(crate) async fn run(
    mut rx: mpsc::Receiver<Msg>,
    opts: PgConnectOptions,
    cfg: LedgerConfig,
    healthy: Arc<AtomicBool>,
) {
    let max_batch = cfg.max_batch.max(1);
    let max_wait = Duration::from_millis(cfg.max_wait_ms);
    let mut w = Writer {
        opts,
        cfg,
        conn: None,
        head: None,
        next_connect: Instant::now(),
        healthy,
    };
    let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let push =
        |msg: Msg, batch: &mut Vec<Pending>, flushes: &mut Vec<oneshot::Sender<()>>| match msg {
            Msg::Record {
                event,
                bodies,
                done,
            } => batch.push(Pending {
                event,
                bodies,
                done,
            }),
            Msg::Flush(tx) => flushes.push(tx),
        };
    while let Some(first) = rx.recv().await {
        push(first, &mut batch, &mut flushes);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(msg) => push(msg, &mut batch, &mut flushes),
                Err(_) => break,
            }
        }
        // Wait a little for companions, unless someone is waiting for a flush.
        if !max_wait.is_zero() && flushes.is_empty() && !batch.is_empty() {
            let deadline = Instant::now() + max_wait;
            while batch.len() < max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(msg)) => push(msg, &mut batch, &mut flushes),
                    _ => break,
                }
            }
        }
        if !batch.is_empty() {
            w.commit(std::mem::take(&mut batch)).await;
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

impl Writer {
    async fn commit(&mut self, batch: Vec<Pending>) {
        // A request id twice in one batch (of one client): the later ones are refused up front.
        let mut seen = HashSet::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        for p in batch {
            if seen.insert((p.event.client_id, p.event.request_id.clone())) {
                rows.push(p);
            } else {
                let id = p.event.request_id.clone();
                let _ = p.done.send(Err(LedgerError::DuplicateRequestId(id)));
            }
        }
        let mut conflicts = 0;
        while !rows.is_empty() {
            if let Err(e) = self.ensure_connected().await {
                return self.fail(rows, e);
            }
            let timeout = self.timeout();
            let head = match self.head.take() {
                Some(h) => h,
                // Each statement of the load (and of a tree catch-up over older rows, which
                // may take many) is bounded by the commit timeout, not the whole load.
                None => match load_head(self.conn.as_mut().expect("connected"), timeout).await {
                    Ok(h) => h,
                    Err(HeadError::Db(sqlx::Error::Database(db)))
                        if db.constraint() == Some("ledger_tree_pkey") =>
                    {
                        // Another writer caught the tree up first.
                        conflicts += 1;
                        if conflicts > MAX_CONFLICT_RETRIES {
                            return self.fail(rows, "too many conflicts with other writers".into());
                        }
                        continue;
                    }
                    Err(HeadError::Timeout) => {
                        return self.fail(rows, "timed out loading the chain head".into())
                    }
                    Err(e) => return self.fail(rows, e.to_string()),
                },
            };
            let (links, nodes, frontier) = link(&head, &rows);
            let result = tokio::time::timeout(
                timeout,
                insert(
                    self.conn.as_mut().expect("connected"),
                    &rows,
                    &links,
                    &nodes,
                ),
            )
            .await;
            match result {
                Ok(Ok(())) => {
                    let &(last_id, _, last_hash) = links.last().expect("non-empty batch");
                    self.head = Some((last_id, last_hash, frontier));
                    self.healthy.store(true, Ordering::Relaxed);
                    for (p, (id, _, row_hash)) in rows.into_iter().zip(links) {
                        let _ = p.done.send(Ok(Committed { id, row_hash }));
                    }
                    return;
                }
                Ok(Err(sqlx::Error::Database(db)))
                    if matches!(
                        db.constraint(),
                        Some("usage_events_pkey" | "ledger_tree_pkey")
                    ) =>
                {
                    // Another writer appended first: reload the head and chain again.
                    self.head = None;
                    conflicts += 1;
                    if conflicts > MAX_CONFLICT_RETRIES {
                        return self.fail(rows, "too many id conflicts with other writers".into());
                    }
                }
                Ok(Err(sqlx::Error::Database(db)))
                    if matches!(
                        db.constraint(),
                        Some(
                            "usage_events_client_request_id_key"
                                | "usage_bodies_client_request_id_key"
                        )
                    ) =>
                {
                    // A request id already in the ledger: refuse those rows, commit the others.
                    self.head = Some(head);
                    let conn = self.conn.as_mut().expect("connected");
                    let existing = match existing_request_ids(conn, &rows).await {
                        Ok(e) => e,
                        Err(e) => return self.fail(rows, e.to_string()),
                    };
                    if existing.is_empty() {
                        return self.fail(rows, "unexpected request id conflict".into());
                    }
                    let (dups, rest): (Vec<_>, Vec<_>) = rows.into_iter().partition(|p| {
                        existing.contains(&(p.event.client_id, p.event.request_id.clone()))
                    });
                    for p in dups {
                        let id = p.event.request_id.clone();
                        let _ = p.done.send(Err(LedgerError::DuplicateRequestId(id)));
                    }
                    rows = rest;
                }
                Ok(Err(e)) => return self.fail(rows, e.to_string()),
                Err(_) => return self.fail(rows, "timed out committing a batch".into()),
            }
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.commit_timeout_ms.max(1))
    }

    async fn ensure_connected(&mut self) -> Result<(), String> {
        if self.conn.is_none() {
            if Instant::now() < self.next_connect {
                return Err("database unreachable (waiting to reconnect)".into());
            }
            self.next_connect = Instant::now() + RECONNECT_BACKOFF;
            let conn =
                tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&self.opts))
                    .await
                    .map_err(|_| "timed out connecting".to_string())?
                    .map_err(|e| e.to_string())?;
            tracing::info!("ledger writer connected");
            self.conn = Some(conn);
            self.head = None;
        }
        Ok(())
    }

    /// Refuse every row of the batch; the next batch starts from a fresh connection and head.
    fn fail(&mut self, rows: Vec<Pending>, why: String) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %why, rows = rows.len(), "ledger cannot commit; refusing requests");
        } else {
            tracing::debug!(error = %why, rows = rows.len(), "ledger still cannot commit");
        }
        self.conn = None;
        self.head = None;
        for p in rows {
            let _ = p.done.send(Err(LedgerError::Unavailable(why.clone())));
        }
    }
}

type Links = Vec<(i64, [u8; 32], [u8; 32])>;

/// `(id, prev_hash, row_hash)` for each row, continuing from `head`; the tree hashes the rows
/// add; the tree's right edge after them.
fn link(
    head: &(i64, [u8; 32], Frontier),
    rows: &[Pending],
) -> (Links, Vec<(u64, [u8; 32])>, Frontier) {
    let (mut id, mut prev, mut frontier) = (head.0, head.1, head.2.clone());
    let mut nodes = Vec::with_capacity(rows.len() * 2);
    let links = rows
        .iter()
        .map(|p| {
            id += 1;
            let h = row_hash(&prev, id, &p.event);
            nodes.extend(frontier.append(&h));
            let out = (id, prev, h);
            prev = h;
            out
        })
        .collect();
    (links, nodes, frontier)
}

#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Tree(String),
    #[error("timed out")]
    Timeout,
}

/// `fut` within `limit`.
async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, HeadError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(HeadError::Timeout),
    }
}

/// Rows read per round trip while the tree catches up with rows it does not cover yet.
const CATCH_UP_CHUNK: i64 = 10_000;

/// The chain head and the tree's right edge. Rows the tree does not cover yet (a ledger from
/// before the transparency log) are added to it first, in id order. A tree with more leaves
/// than the ledger has rows means rows were removed: the writer refuses to write on top of
/// that (every request answers 503 until an operator looks; `teachd audit verify` names it).
async fn load_head(
    conn: &mut PgConnection,
    limit: Duration,
) -> Result<(i64, [u8; 32], Frontier), HeadError> {
    // One statement, so the head and the tree's size come from one snapshot (another writer
    // may commit in between two).
    let q = sqlx::query_as::<_, (Option<i64>, Option<Vec<u8>>, i64)>(
        "SELECT h.id, h.row_hash, (SELECT coalesce(max(idx) + 1, 0) FROM ledger_tree) \
         FROM (SELECT 1) one LEFT JOIN \
              (SELECT id, row_hash FROM usage_events ORDER BY id DESC LIMIT 1) h ON true",
    );
    let (head_id, head_hash, stored) = bounded(limit, q.fetch_one(&mut *conn)).await?;
    let (id, hash) = match (head_id, head_hash) {
        (Some(id), Some(hash)) => (id, hash.try_into().unwrap_or([0xff; 32])),
        _ => (0, GENESIS),
    };
    let size = tree::size_from_stored(stored as u64).ok_or_else(|| {
        HeadError::Tree(format!(
            "the ledger tree is incomplete ({stored} stored hashes)"
        ))
    })?;
    if size > id as u64 {
        return Err(HeadError::Tree(format!(
            "the ledger tree has {size} leaves but the ledger only {id} rows: rows were removed"
        )));
    }
    let known = bounded(
        limit,
        tree::fetch(&mut *conn, &tree::frontier_indexes(size)),
    )
    .await?;
    let mut frontier = Frontier::new(size, known).map_err(HeadError::Tree)?;
    while frontier.size < id as u64 {
        let rows: Vec<(i64, Vec<u8>)> = bounded(
            limit,
            sqlx::query_as(
                "SELECT id, row_hash FROM usage_events WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(frontier.size as i64)
            .bind(CATCH_UP_CHUNK)
            .fetch_all(&mut *conn),
        )
        .await?;
        let mut nodes = Vec::new();
        for (row_id, h) in rows {
            if row_id as u64 != frontier.size + 1 {
                return Err(HeadError::Tree(format!(
                    "ledger row {} is missing: the tree cannot cover it",
                    frontier.size + 1
                )));
            }
            let h: [u8; 32] = h.try_into().unwrap_or([0xff; 32]);
            nodes.extend(frontier.append(&h));
        }
        bounded(limit, insert_nodes(&mut *conn, &nodes)).await?;
        tracing::info!(leaves = frontier.size, rows = id, "ledger tree catching up");
    }
    Ok((id, hash, frontier))
}

async fn insert_nodes(
    conn: &mut PgConnection,
    nodes: &[(u64, [u8; 32])],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ledger_tree (idx, hash) SELECT * FROM UNNEST($1::int8[], $2::bytea[])",
    )
    .bind(nodes.iter().map(|n| n.0 as i64).collect::<Vec<_>>())
    .bind(nodes.iter().map(|n| &n.1[..]).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// The `(client, request id)` pairs of `rows` that the ledger already holds.
async fn existing_request_ids(
    conn: &mut PgConnection,
    rows: &[Pending],
) -> Result<HashSet<(uuid::Uuid, String)>, sqlx::Error> {
    let clients: Vec<uuid::Uuid> = rows.iter().map(|p| p.event.client_id).collect();
    let ids: Vec<&str> = rows.iter().map(|p| p.event.request_id.as_str()).collect();
    let found: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "WITH q AS (SELECT * FROM UNNEST($1::uuid[], $2::text[]) AS q(client_id, request_id))
         SELECT e.client_id, e.request_id FROM usage_events e JOIN q USING (client_id, request_id)
         UNION SELECT b.client_id, b.request_id FROM usage_bodies b JOIN q USING (client_id, request_id)",
    )
    .bind(&clients)
    .bind(&ids)
    .fetch_all(conn)
    .await?;
    Ok(found.into_iter().collect())
}

const INSERT_EVENTS: &str = "INSERT INTO usage_events (id, request_id, ts, client_id, key_id, method, \
     endpoint, model, status, error_code, prompt_tokens, scored_tokens, generated_tokens, judgments, \
     top_k, latency_ms, request_sha256, response_sha256, tos_version, weights_sha256, prev_hash, row_hash, \
     refusals, response_bytes) \
     SELECT * FROM UNNEST($1::int8[], $2::text[], $3::timestamptz[], $4::uuid[], $5::uuid[], $6::text[], \
     $7::text[], $8::text[], $9::int2[], $10::text[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], \
     $15::int4[], $16::float8[], $17::bytea[], $18::bytea[], $19::text[], $20::text[], $21::bytea[], $22::bytea[], \
     $23::int8[], $24::int8[])";

/// The batch's tree hashes, inserted by the same statement as its rows.
const INSERT_TREE: &str = "tree AS (INSERT INTO ledger_tree (idx, hash) \
     SELECT * FROM UNNEST($25::int8[], $26::bytea[]))";

async fn insert(
    conn: &mut PgConnection,
    rows: &[Pending],
    links: &[(i64, [u8; 32], [u8; 32])],
    nodes: &[(u64, [u8; 32])],
) -> Result<(), sqlx::Error> {
    let ev = || rows.iter().map(|p| &p.event);
    let with_bodies: Vec<&Pending> = rows.iter().filter(|p| p.bodies.is_some()).collect();
    let sql = if with_bodies.is_empty() {
        format!("WITH {INSERT_TREE} {INSERT_EVENTS}")
    } else {
        format!(
            "WITH {INSERT_TREE}, bodies AS (INSERT INTO usage_bodies (client_id, request_id, \
             request_body, response_body) \
             SELECT * FROM UNNEST($27::uuid[], $28::text[], $29::bytea[], $30::bytea[])) {INSERT_EVENTS}"
        )
    };
    let mut q = sqlx::query(&sql)
        .bind(links.iter().map(|l| l.0).collect::<Vec<i64>>())
        .bind(ev().map(|e| e.request_id.as_str()).collect::<Vec<_>>())
        .bind(ev().map(|e| e.ts).collect::<Vec<_>>())
        .bind(ev().map(|e| e.client_id).collect::<Vec<_>>())
        .bind(ev().map(|e| e.key_id).collect::<Vec<_>>())
        .bind(ev().map(|e| e.method.as_str()).collect::<Vec<_>>())
        .bind(ev().map(|e| e.endpoint.as_str()).collect::<Vec<_>>())
        .bind(ev().map(|e| e.model.as_deref()).collect::<Vec<_>>())
        .bind(ev().map(|e| e.status).collect::<Vec<_>>())
        .bind(ev().map(|e| e.error_code.as_deref()).collect::<Vec<_>>())
        .bind(ev().map(|e| e.prompt_tokens).collect::<Vec<_>>())
        .bind(ev().map(|e| e.scored_tokens).collect::<Vec<_>>())
        .bind(ev().map(|e| e.generated_tokens).collect::<Vec<_>>())
        .bind(ev().map(|e| e.judgments).collect::<Vec<_>>())
        .bind(ev().map(|e| e.top_k).collect::<Vec<_>>())
        .bind(ev().map(|e| e.latency_ms).collect::<Vec<_>>())
        .bind(ev().map(|e| &e.request_sha256[..]).collect::<Vec<_>>())
        .bind(ev().map(|e| &e.response_sha256[..]).collect::<Vec<_>>())
        .bind(ev().map(|e| e.tos_version.as_deref()).collect::<Vec<_>>())
        .bind(
            ev().map(|e| e.weights_sha256.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(links.iter().map(|l| &l.1[..]).collect::<Vec<_>>())
        .bind(links.iter().map(|l| &l.2[..]).collect::<Vec<_>>())
        .bind(ev().map(|e| e.refusals).collect::<Vec<_>>())
        .bind(ev().map(|e| e.response_bytes).collect::<Vec<_>>())
        .bind(nodes.iter().map(|n| n.0 as i64).collect::<Vec<_>>())
        .bind(nodes.iter().map(|n| &n.1[..]).collect::<Vec<_>>());
    if !with_bodies.is_empty() {
        let b = |p: &&Pending| p.bodies.clone().expect("filtered");
        q = q
            .bind(
                with_bodies
                    .iter()
                    .map(|p| p.event.client_id)
                    .collect::<Vec<_>>(),
            )
            .bind(
                with_bodies
                    .iter()
                    .map(|p| p.event.request_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                with_bodies
                    .iter()
                    .map(|p| b(p).request.to_vec())
                    .collect::<Vec<_>>(),
            )
            .bind(
                with_bodies
                    .iter()
                    .map(|p| b(p).response.to_vec())
                    .collect::<Vec<_>>(),
            );
    }
    q.execute(conn).await?;
    Ok(())
}
