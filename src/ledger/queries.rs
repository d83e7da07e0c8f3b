//! Reads over the ledger for audits: aggregates, keyset pages, chunks for export, verification.
//! Everything that scans a range does so in keyset chunks by `id`, so memory stays constant
//! however many rows match.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::chain::{ChainedEvent, UsageEvent, Verifier, GENESIS};

pub const EVENT_COLUMNS: &str = "id, request_id, ts, client_id, key_id, method, endpoint, model, \
    status, error_code, prompt_tokens, scored_tokens, generated_tokens, judgments, top_k, latency_ms, \
    request_sha256, response_sha256, tos_version, weights_sha256, refusals, response_bytes, prev_hash, row_hash";

/// Rows read per round trip when scanning (export, verify).
pub const SCAN_CHUNK: i64 = 5_000;

/// `[from, to)`; either end may be open.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeRange {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl TimeRange {
    /// Parse `from`/`to` bounds; on error, the offending parameter and a message.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<TimeRange, (&'static str, String)> {
        let one = |param: &'static str, raw: Option<&str>| {
            raw.map(|r| {
                parse_time(r).ok_or_else(|| {
                    (
                        param,
                        format!("`{param}` must be an RFC 3339 timestamp or a YYYY-MM-DD date"),
                    )
                })
            })
            .transpose()
        };
        let range = TimeRange {
            from: one("from", from)?,
            to: one("to", to)?,
        };
        if let (Some(f), Some(t)) = (range.from, range.to) {
            if f > t {
                return Err(("to", "`to` is before `from`".into()));
            }
        }
        Ok(range)
    }
}

/// An RFC 3339 timestamp, or a date (`2025-01-31`, meaning its UTC midnight).
pub fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// Which events a query covers.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub range: TimeRange,
    pub client_id: Option<Uuid>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
}

impl EventFilter {
    fn push_where(&self, q: &mut QueryBuilder<'_, Postgres>) {
        q.push(" WHERE true");
        if let Some(from) = self.range.from {
            q.push(" AND ts >= ").push_bind(from);
        }
        if let Some(to) = self.range.to {
            q.push(" AND ts < ").push_bind(to);
        }
        if let Some(c) = self.client_id {
            q.push(" AND client_id = ").push_bind(c);
        }
        if let Some(m) = &self.model {
            q.push(" AND model = ").push_bind(m.clone());
        }
        if let Some(e) = &self.endpoint {
            q.push(" AND endpoint = ").push_bind(e.clone());
        }
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: i64,
    request_id: String,
    ts: DateTime<Utc>,
    client_id: Uuid,
    key_id: Uuid,
    method: String,
    endpoint: String,
    model: Option<String>,
    status: i16,
    error_code: Option<String>,
    prompt_tokens: i64,
    scored_tokens: i64,
    generated_tokens: i64,
    judgments: i64,
    top_k: Option<i32>,
    latency_ms: f64,
    request_sha256: Vec<u8>,
    response_sha256: Vec<u8>,
    tos_version: Option<String>,
    weights_sha256: Option<String>,
    refusals: i64,
    response_bytes: i64,
    prev_hash: Vec<u8>,
    row_hash: Vec<u8>,
}

/// Byte strings of the wrong length (only possible by tampering, the table checks lengths) map
/// to a value that cannot verify.
fn hash32(v: Vec<u8>) -> [u8; 32] {
    v.try_into().unwrap_or([0xff; 32])
}

impl From<EventRow> for ChainedEvent {
    fn from(r: EventRow) -> Self {
        ChainedEvent {
            id: r.id,
            prev_hash: hash32(r.prev_hash),
            row_hash: hash32(r.row_hash),
            event: UsageEvent {
                request_id: r.request_id,
                ts: r.ts,
                client_id: r.client_id,
                key_id: r.key_id,
                method: r.method,
                endpoint: r.endpoint,
                model: r.model,
                status: r.status,
                error_code: r.error_code,
                prompt_tokens: r.prompt_tokens,
                scored_tokens: r.scored_tokens,
                generated_tokens: r.generated_tokens,
                judgments: r.judgments,
                top_k: r.top_k,
                latency_ms: r.latency_ms,
                request_sha256: hash32(r.request_sha256),
                response_sha256: hash32(r.response_sha256),
                tos_version: r.tos_version,
                weights_sha256: r.weights_sha256,
                refusals: r.refusals,
                response_bytes: r.response_bytes,
            },
        }
    }
}

/// Up to `limit` events matching `filter` with `id > after`, in id order.
pub async fn events_after(
    pool: &PgPool,
    filter: &EventFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<ChainedEvent>, sqlx::Error> {
    let mut q = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM usage_events"));
    filter.push_where(&mut q);
    q.push(" AND id > ").push_bind(after);
    q.push(" ORDER BY id LIMIT ").push_bind(limit);
    let rows: Vec<EventRow> = q.build_query_as().fetch_all(pool).await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Usage aggregate dimensions.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum GroupKey {
    Client,
    Model,
    Endpoint,
    Day,
    Hour,
}

impl GroupKey {
    pub fn parse(s: &str) -> Option<GroupKey> {
        Some(match s {
            "client" => GroupKey::Client,
            "model" => GroupKey::Model,
            "endpoint" => GroupKey::Endpoint,
            "day" => GroupKey::Day,
            "hour" => GroupKey::Hour,
            _ => return None,
        })
    }
}

/// One aggregate row; the group keys not asked for are `None`.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageTotals {
    pub client_id: Option<Uuid>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
    pub day: Option<NaiveDate>,
    pub hour: Option<DateTime<Utc>>,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub scored_tokens: i64,
    pub generated_tokens: i64,
    pub judgments: i64,
    /// Bytes of response bodies served.
    pub response_bytes: i64,
}

/// Aggregates over the filtered events, grouped by `keys` (none: one total row).
pub async fn usage(
    pool: &PgPool,
    filter: &EventFilter,
    keys: &[GroupKey],
) -> Result<Vec<UsageTotals>, sqlx::Error> {
    let has = |k| keys.contains(&k);
    let mut select = Vec::new();
    let mut group = Vec::new();
    for (key, expr, null) in [
        (GroupKey::Client, "client_id", "NULL::uuid"),
        (GroupKey::Model, "model", "NULL::text"),
        (GroupKey::Endpoint, "endpoint", "NULL::text"),
        (GroupKey::Day, "(ts AT TIME ZONE 'UTC')::date", "NULL::date"),
        (
            GroupKey::Hour,
            "date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            "NULL::timestamptz",
        ),
    ] {
        let name = match key {
            GroupKey::Client => "client_id",
            GroupKey::Model => "model",
            GroupKey::Endpoint => "endpoint",
            GroupKey::Day => "day",
            GroupKey::Hour => "hour",
        };
        if has(key) {
            select.push(format!("{expr} AS {name}"));
            group.push(expr);
        } else {
            select.push(format!("{null} AS {name}"));
        }
    }
    let mut q = QueryBuilder::new(format!(
        "SELECT {}, coalesce(sum(greatest(refusals, 1)), 0)::int8 AS requests, \
         coalesce(sum(greatest(refusals, 1)) FILTER (WHERE status >= 400), 0)::int8 AS errors, \
         coalesce(sum(prompt_tokens), 0)::int8 AS prompt_tokens, \
         coalesce(sum(scored_tokens), 0)::int8 AS scored_tokens, \
         coalesce(sum(generated_tokens), 0)::int8 AS generated_tokens, \
         coalesce(sum(judgments), 0)::int8 AS judgments, \
         coalesce(sum(response_bytes), 0)::int8 AS response_bytes FROM usage_events",
        select.join(", ")
    ));
    filter.push_where(&mut q);
    if !group.is_empty() {
        let list = group.join(", ");
        q.push(format!(" GROUP BY {list} ORDER BY {list}"));
    }
    q.build_query_as().fetch_all(pool).await
}

/// What `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub ok: bool,
    pub rows_checked: u64,
    /// The id of the first row that does not verify: edited, out of order, or right after a
    /// deleted row.
    pub first_bad_event_id: Option<i64>,
}

/// Recompute the chain over the rows in `range` (all rows when open), in id order.
///
/// A range starts from the stored `row_hash` of the row before it, so it proves the range is
/// intact and linked to its predecessor; verify without a range to check the whole history.
/// Deleting the newest rows leaves a shorter valid chain: that is only visible against an
/// external copy of the head (e.g. the last `row_hash` of a previous export).
pub async fn verify(pool: &PgPool, range: TimeRange) -> Result<VerifyReport, sqlx::Error> {
    let (lo, hi) = if range.from.is_none() && range.to.is_none() {
        (1i64, i64::MAX)
    } else {
        let mut q = QueryBuilder::new("SELECT min(id), max(id) FROM usage_events");
        EventFilter {
            range,
            ..Default::default()
        }
        .push_where(&mut q);
        let (lo, hi): (Option<i64>, Option<i64>) = q.build_query_as().fetch_one(pool).await?;
        match (lo, hi) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => {
                return Ok(VerifyReport {
                    ok: true,
                    rows_checked: 0,
                    first_bad_event_id: None,
                })
            }
        }
    };
    let mut verifier = if lo <= 1 {
        Verifier::new(Some(0), GENESIS)
    } else {
        let prev: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT row_hash FROM usage_events WHERE id = $1")
                .bind(lo - 1)
                .fetch_optional(pool)
                .await?;
        // A missing predecessor makes the first row of the range bad.
        Verifier::new(
            Some(lo - 1),
            prev.map(|(h,)| hash32(h)).unwrap_or([0xff; 32]),
        )
    };
    let mut after = lo - 1;
    'scan: loop {
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
        ))
        .bind(after)
        .bind(hi)
        .bind(SCAN_CHUNK)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in rows {
            if !verifier.check(&row.into()) {
                break 'scan;
            }
        }
    }
    Ok(VerifyReport {
        ok: verifier.first_bad.is_none(),
        rows_checked: verifier.rows_checked,
        first_bad_event_id: verifier.first_bad,
    })
}

/// Keeps the result of a verification (the console shows the last one).
pub async fn record_verification(
    pool: &PgPool,
    range: TimeRange,
    report: &VerifyReport,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ledger_verifications (range_from, range_to, ok, rows_checked, first_bad_event_id)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(range.from)
    .bind(range.to)
    .bind(report.ok)
    .bind(report.rows_checked as i64)
    .bind(report.first_bad_event_id)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_dates() {
        assert_eq!(parse_time("2025-01-31"), parse_time("2025-01-31T00:00:00Z"));
        assert_eq!(
            parse_time("2025-01-31T02:00:00+02:00"),
            parse_time("2025-01-31")
        );
        assert!(parse_time("2025-01-31").is_some());
        assert!(parse_time("yesterday").is_none());
        assert_eq!(
            TimeRange::parse(Some("2025-02-01"), Some("2025-01-01"))
                .unwrap_err()
                .0,
            "to"
        );
        assert_eq!(TimeRange::parse(Some("x"), None).unwrap_err().0, "from");
    }
}
