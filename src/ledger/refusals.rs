//! Bounded storage for refusals. A client that keeps hammering past its limits must not be able
//! to grow the ledger by a row per refused request: each client gets at most
//! `ledger.max_refusal_rows_per_minute` individual refusal rows per UTC minute; later refusals
//! of that minute are counted and written as one aggregated row per (client, status, code),
//! whose `refusals` column says how many requests it stands for. Usage aggregates count an
//! aggregated row as that many requests, so totals stay exact.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use parking_lot::Mutex;
use uuid::Uuid;

use super::chain::{to_db_precision, UsageEvent};

type Key = (Uuid, i16, Option<String>);

/// Refusals of one client in one minute.
struct Window {
    minute: i64,
    written: u32,
    /// Per (status, code): refusals not written individually, and the latest of them.
    suppressed: HashMap<Key, (i64, UsageEvent)>,
}

pub struct RefusalBook {
    per_minute: u32,
    windows: Mutex<HashMap<Uuid, Window>>,
}

/// What to do with one refusal.
pub enum Decision {
    /// Write it as its own row.
    Record(Box<UsageEvent>),
    /// Counted into the client's aggregate for this minute.
    Counted,
}

fn minute_of(ts: DateTime<Utc>) -> i64 {
    ts.timestamp().div_euclid(60)
}

impl RefusalBook {
    pub fn new(per_minute: u32) -> Self {
        RefusalBook {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    pub fn admit(&self, event: UsageEvent) -> Decision {
        let minute = minute_of(event.ts);
        let mut windows = self.windows.lock();
        let w = windows.entry(event.client_id).or_insert_with(|| Window {
            minute,
            written: 0,
            suppressed: HashMap::new(),
        });
        if w.minute != minute {
            // A new minute: the old window's aggregates are flushed by `take_due` (they were
            // moved out before this reset only if due; keep them until then).
            if w.suppressed.is_empty() {
                w.minute = minute;
                w.written = 0;
            } else {
                // Rare: a refusal of a new minute before the flush ran. Count it into the old
                // window's aggregate rather than lose or duplicate anything.
                let key = (event.client_id, event.status, event.error_code.clone());
                count_into(w.suppressed.entry(key).or_insert((0, event.clone())), event);
                return Decision::Counted;
            }
        }
        if w.written < self.per_minute {
            w.written += 1;
            return Decision::Record(Box::new(event));
        }
        let key = (event.client_id, event.status, event.error_code.clone());
        count_into(w.suppressed.entry(key).or_insert((0, event.clone())), event);
        Decision::Counted
    }

    /// Aggregated rows for every window that ended before `now` (all of them with `all`), and
    /// forgets windows with nothing left to write.
    pub fn take_due(&self, now: DateTime<Utc>, all: bool) -> Vec<UsageEvent> {
        let current = minute_of(now);
        let mut out = Vec::new();
        let mut windows = self.windows.lock();
        windows.retain(|_, w| {
            if w.minute >= current && !all {
                return true;
            }
            for ((client, status, code), (count, last)) in w.suppressed.drain() {
                let end = Utc
                    .timestamp_opt((w.minute + 1) * 60 - 1, 0)
                    .single()
                    .unwrap_or(now);
                out.push(UsageEvent {
                    request_id: format!(
                        "refusals-{}-{}-{}",
                        w.minute,
                        status,
                        code.as_deref().unwrap_or("none")
                    ),
                    ts: to_db_precision(end.min(now)),
                    client_id: client,
                    key_id: last.key_id,
                    method: "*".into(),
                    endpoint: "*".into(),
                    model: None,
                    status,
                    error_code: code,
                    prompt_tokens: 0,
                    scored_tokens: 0,
                    generated_tokens: 0,
                    judgments: 0,
                    top_k: None,
                    latency_ms: 0.0,
                    request_sha256: last.request_sha256,
                    response_sha256: last.response_sha256,
                    tos_version: last.tos_version,
                    weights_sha256: None,
                    refusals: count,
                    response_bytes: last.response_bytes,
                });
            }
            false
        });
        out
    }

    /// Clients with a window in memory (to check that the book stays bounded).
    pub fn tracked(&self) -> usize {
        self.windows.lock().len()
    }
}

/// Counts `event` into an aggregate: the latest refusal stands for the rest, its
/// `response_bytes` becomes the sum over every refusal counted.
fn count_into(slot: &mut (i64, UsageEvent), event: UsageEvent) {
    let before = if slot.0 == 0 {
        0
    } else {
        slot.1.response_bytes
    };
    slot.0 += 1;
    slot.1 = event;
    slot.1.response_bytes += before;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(client: Uuid, ts: DateTime<Utc>) -> UsageEvent {
        UsageEvent {
            request_id: Uuid::new_v4().to_string(),
            ts,
            client_id: client,
            key_id: Uuid::nil(),
            method: "POST".into(),
            endpoint: "/v1/logprobs".into(),
            model: None,
            status: 429,
            error_code: Some("rate_limit_exceeded".into()),
            prompt_tokens: 0,
            scored_tokens: 0,
            generated_tokens: 0,
            judgments: 0,
            top_k: None,
            latency_ms: 0.1,
            request_sha256: [0; 32],
            response_sha256: [1; 32],
            tos_version: None,
            weights_sha256: None,
            refusals: 0,
            response_bytes: 0,
        }
    }

    #[test]
    fn past_the_bound_refusals_become_one_counted_row() {
        let book = RefusalBook::new(3);
        let c = Uuid::new_v4();
        let t0 = Utc.timestamp_opt(1_800_000_000 / 60 * 60, 0).unwrap();
        let mut recorded = 0;
        for i in 0..10 {
            if let Decision::Record(_) = book.admit(refusal(c, t0 + chrono::Duration::seconds(i))) {
                recorded += 1;
            }
        }
        assert_eq!(recorded, 3);
        assert!(book
            .take_due(t0 + chrono::Duration::seconds(30), false)
            .is_empty());
        let rows = book.take_due(t0 + chrono::Duration::seconds(61), false);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].refusals, 7);
        assert_eq!(rows[0].client_id, c);
        assert_eq!(book.tracked(), 0, "flushed windows are forgotten");
        // The next minute starts with a fresh budget.
        assert!(matches!(
            book.admit(refusal(c, t0 + chrono::Duration::seconds(65))),
            Decision::Record(_)
        ));
    }
}
