//! Usage aggregates answered from the hourly rollups (`usage_rollups_hourly`, kept by a trigger
//! on the ledger's INSERT: see migrations/0007_console.sql) instead of a scan of every row.
//!
//! A range is split at whole hours: the whole hours inside it come from the rollups, the partial
//! hours at its ends (at most two hours of rows, through the `ts` index) from the raw rows; for
//! aggregates by day or coarser, the whole UTC days come from the daily rollups
//! (`usage_rollups_daily`, kept by the same trigger). The answer is therefore exactly the raw
//! aggregate ([`super::queries::usage`]) for any range and grouping, at a cost that grows with
//! the number of days and hours, not of rows.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::queries::{EventFilter, GroupKey, UsageTotals};

/// The start of the hour `t` is in.
pub fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t)
}

/// The first whole hour at or after `t`.
pub fn ceil_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let f = floor_hour(t);
    if f == t {
        t
    } else {
        f + TimeDelta::hours(1)
    }
}

/// `[lo, hi)`; an open end is unbounded.
pub type Hours = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// How a range splits: rollup hours `[lo, hi)` (open ends are unbounded) and raw edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Rollup hours; `None` when the range holds no whole hour.
    pub hours: Option<Hours>,
    /// Raw rows at the start, `[from, lo)`.
    pub head: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Raw rows at the end, `[hi, to)`.
    pub tail: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// [`split_by`] at whole hours.
pub fn split(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Split {
    split_by(from, to, TimeDelta::hours(1))
}

/// How `[from, to)` splits at whole `unit`s (an hour or a day): `hours` holds the whole units.
pub fn split_by(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>, unit: TimeDelta) -> Split {
    let floor = |t: DateTime<Utc>| t.duration_trunc(unit).unwrap_or(t);
    let ceil = |t: DateTime<Utc>| {
        let f = floor(t);
        if f == t {
            t
        } else {
            f + unit
        }
    };
    let lo = from.map(ceil);
    let hi = to.map(floor);
    if let (Some(lo), Some(hi), Some(from), Some(to)) = (lo, hi, from, to) {
        if lo >= hi {
            // No whole unit inside: the finer source for the whole range.
            return Split {
                hours: None,
                head: (from < to).then_some((from, to)),
                tail: None,
            };
        }
    }
    Split {
        hours: Some((lo, hi)),
        head: from.zip(lo).filter(|(f, l)| f < l),
        tail: hi.zip(to).filter(|(h, t)| h < t),
    }
}

fn push_dims(q: &mut QueryBuilder<'_, Postgres>, client: Option<Uuid>, f: &EventFilter) {
    if let Some(c) = client {
        q.push(" AND client_id = ").push_bind(c);
    }
    if let Some(m) = &f.model {
        q.push(" AND model = ").push_bind(m.clone());
    }
    if let Some(e) = &f.endpoint {
        q.push(" AND endpoint = ").push_bind(e.clone());
    }
}

const ROLLUP_COLUMNS: &str = "client_id, model, endpoint, status_class, error_code, requests, \
    prompt_tokens, scored_tokens, generated_tokens, judgments, latency_ms_sum, response_bytes";

/// One rollup table's rows in `[lo, hi)` (open ends unbounded), as a `UNION ALL` branch.
fn push_rollup(
    q: &mut QueryBuilder<'_, Postgres>,
    table: &str,
    time: &str,
    (lo, hi): Hours,
    filter: &EventFilter,
) {
    q.push(format!(
        " UNION ALL SELECT {time}, {ROLLUP_COLUMNS} FROM {table} WHERE true"
    ));
    if let Some(lo) = lo {
        q.push(format!(" AND {time} >= ")).push_bind(lo);
    }
    if let Some(hi) = hi {
        q.push(format!(" AND {time} < ")).push_bind(hi);
    }
    push_dims(q, filter.client_id, filter);
}

/// Pushes `SELECT hour, client_id, model, endpoint, status_class, error_code, requests,
/// prompt_tokens, scored_tokens, generated_tokens, judgments, latency_ms_sum, response_bytes`
/// over the rollups
/// and raw edges of `filter` (the source every aggregate here reads). With `days`, the whole
/// UTC days of the range come from the daily rollups (their `hour` is the day's midnight: only
/// for aggregates by day or coarser), the rest of its whole hours from the hourly ones.
pub fn push_source(q: &mut QueryBuilder<'_, Postgres>, filter: &EventFilter, days: bool) {
    let s = split(filter.range.from, filter.range.to);
    q.push(format!(
        "(SELECT hour, {ROLLUP_COLUMNS} FROM usage_rollups_hourly WHERE false"
    ));
    if let Some(hours) = s.hours {
        if days {
            let d = split_by(hours.0, hours.1, TimeDelta::days(1));
            if let Some(whole_days) = d.hours {
                push_rollup(q, "usage_rollups_daily", "day", whole_days, filter);
            }
            for (a, b) in [d.head, d.tail].into_iter().flatten() {
                push_rollup(
                    q,
                    "usage_rollups_hourly",
                    "hour",
                    (Some(a), Some(b)),
                    filter,
                );
            }
        } else {
            push_rollup(q, "usage_rollups_hourly", "hour", hours, filter);
        }
    }
    for (a, b) in [s.head, s.tail].into_iter().flatten() {
        q.push(
            " UNION ALL SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', \
             client_id, model, endpoint, (status / 100)::smallint, error_code, \
             greatest(refusals, 1), prompt_tokens, scored_tokens, generated_tokens, judgments, \
             latency_ms, response_bytes FROM usage_events WHERE ts >= ",
        )
        .push_bind(a)
        .push(" AND ts < ")
        .push_bind(b);
        push_dims(q, filter.client_id, filter);
    }
    q.push(") AS src");
}

/// [`super::queries::usage`], answered from the rollups: same rows, same order.
pub async fn usage(
    pool: &PgPool,
    filter: &EventFilter,
    keys: &[GroupKey],
) -> Result<Vec<UsageTotals>, sqlx::Error> {
    let mut select = Vec::new();
    let mut group = Vec::new();
    for (key, name, expr, null) in [
        (GroupKey::Client, "client_id", "client_id", "NULL::uuid"),
        (GroupKey::Model, "model", "model", "NULL::text"),
        (GroupKey::Endpoint, "endpoint", "endpoint", "NULL::text"),
        (
            GroupKey::Day,
            "day",
            "(hour AT TIME ZONE 'UTC')::date",
            "NULL::date",
        ),
        (GroupKey::Hour, "hour", "hour", "NULL::timestamptz"),
    ] {
        if keys.contains(&key) {
            select.push(format!("{expr} AS {name}"));
            group.push(expr);
        } else {
            select.push(format!("{null} AS {name}"));
        }
    }
    let mut q = QueryBuilder::new(format!(
        "SELECT {}, coalesce(sum(requests), 0)::int8 AS requests, \
         coalesce(sum(requests) FILTER (WHERE status_class >= 4), 0)::int8 AS errors, \
         coalesce(sum(prompt_tokens), 0)::int8 AS prompt_tokens, \
         coalesce(sum(scored_tokens), 0)::int8 AS scored_tokens, \
         coalesce(sum(generated_tokens), 0)::int8 AS generated_tokens, \
         coalesce(sum(judgments), 0)::int8 AS judgments, \
         coalesce(sum(response_bytes), 0)::int8 AS response_bytes FROM ",
        select.join(", ")
    ));
    // By hour needs hourly rows; anything coarser may read whole days from the daily rollups.
    push_source(&mut q, filter, !keys.contains(&GroupKey::Hour));
    if !group.is_empty() {
        let list = group.join(", ");
        q.push(format!(" GROUP BY {list} ORDER BY {list}"));
    }
    q.build_query_as().fetch_all(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn ranges_split_at_whole_hours() {
        let s = split(
            Some(t("2025-01-01T10:20:00Z")),
            Some(t("2025-01-01T13:05:00Z")),
        );
        assert_eq!(
            s.hours,
            Some((
                Some(t("2025-01-01T11:00:00Z")),
                Some(t("2025-01-01T13:00:00Z"))
            ))
        );
        assert_eq!(
            s.head,
            Some((t("2025-01-01T10:20:00Z"), t("2025-01-01T11:00:00Z")))
        );
        assert_eq!(
            s.tail,
            Some((t("2025-01-01T13:00:00Z"), t("2025-01-01T13:05:00Z")))
        );
        // Aligned bounds: rollups only.
        let s = split(
            Some(t("2025-01-01T10:00:00Z")),
            Some(t("2025-01-01T12:00:00Z")),
        );
        assert_eq!((s.head, s.tail), (None, None));
        // Within one hour, or across one boundary without a whole hour: raw rows only.
        for (a, b) in [
            ("2025-01-01T10:10:00Z", "2025-01-01T10:50:00Z"),
            ("2025-01-01T10:50:00Z", "2025-01-01T11:10:00Z"),
        ] {
            let s = split(Some(t(a)), Some(t(b)));
            assert_eq!(s.hours, None);
            assert_eq!(s.head, Some((t(a), t(b))));
        }
        // Open ends.
        let s = split(None, Some(t("2025-01-01T10:30:00Z")));
        assert_eq!(s.hours, Some((None, Some(t("2025-01-01T10:00:00Z")))));
        assert_eq!(s.head, None);
        assert!(s.tail.is_some());
        assert_eq!(
            ceil_hour(t("2025-01-01T10:00:00Z")),
            t("2025-01-01T10:00:00Z")
        );
    }
}
