//! What the console's pages show, read from the rollups (whole hours) and the raw rows (the
//! last hour, partial hours, a client's recent events). Range sizes bound every query: a
//! 30-day overview reads at most 720 rollup hours per key, never 30 days of rows.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::{PgPool, QueryBuilder};
use uuid::Uuid;

use crate::ledger::queries::{EventFilter, TimeRange};
use crate::ledger::rollups::push_source;

/// The overview's ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    Hour,
    Day,
    Month,
    Custom,
}

/// A range with the width of its chart buckets.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub span: Span,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub step: TimeDelta,
}

impl Window {
    /// Buckets of 5 minutes up to 2 hours, of an hour up to 3 days, of a day beyond.
    pub fn new(span: Span, from: DateTime<Utc>, to: DateTime<Utc>) -> Window {
        let len = to - from;
        let step = if len <= TimeDelta::hours(2) {
            TimeDelta::minutes(5)
        } else if len <= TimeDelta::days(3) {
            TimeDelta::hours(1)
        } else {
            TimeDelta::days(1)
        };
        let from = from.duration_trunc(step).unwrap_or(from);
        Window {
            span,
            from,
            to,
            step,
        }
    }

    pub fn last(span: Span, now: DateTime<Utc>) -> Window {
        let len = match span {
            Span::Hour => TimeDelta::hours(1),
            Span::Day => TimeDelta::days(1),
            _ => TimeDelta::days(30),
        };
        Window::new(span, now - len, now)
    }

    pub fn buckets(&self) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = self.from;
        while t < self.to && out.len() < 2_000 {
            out.push(t);
            t += self.step;
        }
        out
    }

    pub fn label(&self, t: DateTime<Utc>) -> String {
        if self.step >= TimeDelta::days(1) {
            t.format("%m-%d").to_string()
        } else if self.to - self.from > TimeDelta::days(1) {
            t.format("%m-%d %Hh").to_string()
        } else {
            t.format("%H:%M").to_string()
        }
    }

    pub fn filter(&self, client_id: Option<Uuid>) -> EventFilter {
        EventFilter {
            range: TimeRange {
                from: Some(self.from),
                to: Some(self.to),
            },
            client_id,
            ..Default::default()
        }
    }
}

/// Per bucket: requests, positions scored, tokens generated, judgments, bytes served, and
/// refusals/errors by reason (error code, or `5xx`/`4xx` without one).
#[derive(Debug, Default)]
pub struct Series {
    pub buckets: Vec<DateTime<Utc>>,
    pub requests: Vec<f64>,
    pub scored: Vec<f64>,
    pub generated: Vec<f64>,
    pub judgments: Vec<f64>,
    pub bytes: Vec<f64>,
    pub refusals: BTreeMap<String, Vec<f64>>,
}

type SeriesRow = (DateTime<Utc>, i16, Option<String>, i64, i64, i64, i64, i64);

pub async fn series(
    db: &PgPool,
    w: &Window,
    client_id: Option<Uuid>,
) -> Result<Series, sqlx::Error> {
    let rows: Vec<SeriesRow> = if w.step < TimeDelta::hours(1) {
        // Sub-hour buckets come from the raw rows (a range of at most 2 hours).
        let mut q = QueryBuilder::new("SELECT date_bin(");
        q.push_bind(w.step)
            .push(", ts, ")
            .push_bind(w.from)
            .push(
                ") AS bucket, (status / 100)::int2, error_code, sum(greatest(refusals, 1))::int8, \
                 sum(scored_tokens)::int8, sum(generated_tokens)::int8, sum(judgments)::int8, \
                 sum(response_bytes)::int8 FROM usage_events WHERE ts >= ",
            )
            .push_bind(w.from)
            .push(" AND ts < ")
            .push_bind(w.to);
        if let Some(c) = client_id {
            q.push(" AND client_id = ").push_bind(c);
        }
        q.push(" GROUP BY 1, 2, 3");
        q.build_query_as().fetch_all(db).await?
    } else {
        let unit = if w.step >= TimeDelta::days(1) {
            "day"
        } else {
            "hour"
        };
        let mut q = QueryBuilder::new(format!(
            "SELECT date_trunc('{unit}', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket, \
             status_class, error_code, sum(requests)::int8, sum(scored_tokens)::int8, \
             sum(generated_tokens)::int8, sum(judgments)::int8, sum(response_bytes)::int8 FROM "
        ));
        push_source(&mut q, &w.filter(client_id), unit == "day");
        q.push(" GROUP BY 1, 2, 3");
        q.build_query_as().fetch_all(db).await?
    };
    let buckets = w.buckets();
    let index: BTreeMap<DateTime<Utc>, usize> =
        buckets.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let n = buckets.len();
    let mut s = Series {
        requests: vec![0.0; n],
        scored: vec![0.0; n],
        generated: vec![0.0; n],
        judgments: vec![0.0; n],
        bytes: vec![0.0; n],
        buckets,
        ..Default::default()
    };
    for (bucket, class, code, requests, scored, generated, judgments, bytes) in rows {
        // A bucket that starts before the window (its first, partial one) joins the first.
        let i = index
            .range(..=bucket)
            .next_back()
            .map_or(0, |(_, i)| *i)
            .min(n.saturating_sub(1));
        if n == 0 {
            break;
        }
        s.requests[i] += requests as f64;
        s.scored[i] += scored as f64;
        s.generated[i] += generated as f64;
        s.judgments[i] += judgments as f64;
        s.bytes[i] += bytes as f64;
        if class >= 4 {
            let reason = code.unwrap_or_else(|| format!("{class}xx"));
            s.refusals.entry(reason).or_insert_with(|| vec![0.0; n])[i] += requests as f64;
        }
    }
    Ok(s)
}

/// A client's (or a model's) share of a range.
#[derive(Debug, sqlx::FromRow)]
pub struct Share {
    pub key: Option<String>,
    pub name: Option<String>,
    pub requests: i64,
    pub scored: i64,
    pub generated: i64,
    pub errors: i64,
}

const SHARE_SUMS: &str = "sum(requests)::int8 AS requests, sum(scored_tokens)::int8 AS scored, \
    sum(generated_tokens)::int8 AS generated, \
    coalesce(sum(requests) FILTER (WHERE status_class >= 4), 0)::int8 AS errors";

/// The clients with the most requests in the range.
pub async fn top_clients(db: &PgPool, w: &Window, limit: i64) -> Result<Vec<Share>, sqlx::Error> {
    let mut q = QueryBuilder::new(format!(
        "SELECT src.client_id::text AS key, max(c.name) AS name, {SHARE_SUMS} FROM "
    ));
    push_source(&mut q, &w.filter(None), true);
    q.push(" LEFT JOIN clients c ON c.id = src.client_id GROUP BY src.client_id ORDER BY 3 DESC LIMIT ")
        .push_bind(limit);
    q.build_query_as().fetch_all(db).await
}

/// Requests and tokens per teacher in the range (rows without a model left out).
pub async fn model_mix(db: &PgPool, w: &Window) -> Result<Vec<Share>, sqlx::Error> {
    let mut q = QueryBuilder::new(format!(
        "SELECT model AS key, NULL::text AS name, {SHARE_SUMS} FROM "
    ));
    push_source(&mut q, &w.filter(None), true);
    q.push(" WHERE model IS NOT NULL GROUP BY model ORDER BY 3 DESC");
    q.build_query_as().fetch_all(db).await
}

/// Latency percentiles (p50, p90, p99, ms) of teacher requests in the last hour of the range.
pub async fn latency(db: &PgPool, w: &Window) -> Result<Option<[f64; 3]>, sqlx::Error> {
    let from = w.from.max(w.to - TimeDelta::hours(1));
    let row: (Option<Vec<f64>>,) = sqlx::query_as(
        "SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY latency_ms)
         FROM usage_events WHERE ts >= $1 AND ts < $2 AND endpoint LIKE '/v1/%' AND status < 400",
    )
    .bind(from)
    .bind(w.to)
    .fetch_one(db)
    .await?;
    Ok(row.0.and_then(|v| v.try_into().ok()))
}

/// The last verification of the hash chain.
#[derive(Debug, sqlx::FromRow)]
pub struct Verification {
    pub ran_at: DateTime<Utc>,
    pub range_from: Option<DateTime<Utc>>,
    pub range_to: Option<DateTime<Utc>>,
    pub ok: bool,
    pub rows_checked: i64,
    pub first_bad_event_id: Option<i64>,
}

pub async fn verifications(db: &PgPool, limit: i64) -> Result<Vec<Verification>, sqlx::Error> {
    sqlx::query_as(
        "SELECT ran_at, range_from, range_to, ok, rows_checked, first_bad_event_id
         FROM ledger_verifications ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The latest signed checkpoint of the transparency log: (tree size, root, when).
pub async fn latest_checkpoint(
    db: &PgPool,
) -> Result<Option<(i64, Vec<u8>, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tree_size, root_hash, created_at FROM ledger_checkpoints \
         ORDER BY tree_size DESC LIMIT 1",
    )
    .fetch_optional(db)
    .await
}

/// A batch job's progress, for the overview: the API's own batch object (lines and token
/// progress, rate, ETA computed in one place) and its client's name.
#[derive(Debug)]
pub struct BatchLine {
    pub batch: crate::batch::store::BatchObject,
    pub client: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl BatchLine {
    pub fn lines_done(&self) -> i64 {
        self.batch.request_counts.completed + self.batch.request_counts.failed
    }

    /// `12m 5s`-style time left, or empty when unknown or finished.
    pub fn eta(&self) -> String {
        match self.batch.progress.eta_s {
            Some(s) if s.is_finite() => {
                let s = s.round() as i64;
                match (s / 3600, (s % 3600) / 60, s % 60) {
                    (0, 0, sec) => format!("{sec}s"),
                    (0, m, sec) => format!("{m}m {sec}s"),
                    (h, m, _) => format!("{h}h {m}m"),
                }
            }
            _ => String::new(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct BatchWithClient {
    #[sqlx(flatten)]
    row: crate::batch::store::BatchRow,
    client: Option<String>,
}

/// The most recent batch jobs of every client.
pub async fn recent_batches(db: &PgPool, n: i64) -> Result<Vec<BatchLine>, sqlx::Error> {
    let rows: Vec<BatchWithClient> = sqlx::query_as(
        "SELECT b.*, c.name AS client \
         FROM batches b LEFT JOIN clients c ON c.id = b.client_id \
         ORDER BY b.created_at DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| BatchLine {
            batch: crate::batch::store::BatchObject::from(&r.row),
            client: r.client,
            created_at: r.row.created_at,
        })
        .collect())
}

/// The newest ledger row's id and time (cheap: the primary key's last entry).
pub async fn ledger_head(db: &PgPool) -> Result<Option<(i64, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, ts FROM usage_events ORDER BY id DESC LIMIT 1")
        .fetch_optional(db)
        .await
}
