//! The hash chain over ledger rows, as pure functions.
//!
//! `row_hash = SHA-256(prev_hash || encode(id, event))`; the first row's `prev_hash` is
//! [`GENESIS`]. The encoding is canonical: a domain tag, then every field in a fixed order,
//! integers as 8-byte big-endian, variable-length fields length-prefixed, optional fields with a
//! presence byte. Changing a field, deleting a row or reordering rows changes some hash that a
//! later row (or the recomputation) no longer matches.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Bumped if the encoding ever changes (old rows keep verifying under their version).
const DOMAIN: &[u8] = b"teachd-ledger-v1";

/// One request as the ledger records it (everything but the chain columns).
#[derive(Clone, Debug, PartialEq)]
pub struct UsageEvent {
    /// The request id (`x-request-id`), unique in the ledger.
    pub request_id: String,
    /// When the request arrived; microsecond precision, as Postgres stores it.
    pub ts: DateTime<Utc>,
    pub client_id: Uuid,
    pub key_id: Uuid,
    pub method: String,
    /// The matched route, e.g. `/v1/logprobs` or `/admin/clients/{id}`.
    pub endpoint: String,
    pub model: Option<String>,
    pub status: i16,
    /// `error.code` of an error response.
    pub error_code: Option<String>,
    pub prompt_tokens: i64,
    pub scored_tokens: i64,
    pub generated_tokens: i64,
    pub judgments: i64,
    pub top_k: Option<i32>,
    pub latency_ms: f64,
    pub request_sha256: [u8; 32],
    pub response_sha256: [u8; 32],
    pub tos_version: Option<String>,
    pub weights_sha256: Option<String>,
    /// For an aggregated refusal row: how many refusals of this client it stands for (the
    /// refusals past `ledger.max_refusal_rows_per_minute` in its minute). 0 for any other row.
    pub refusals: i64,
    /// Bytes of the response body served (the bytes `response_sha256` covers).
    pub response_bytes: i64,
}

impl UsageEvent {
    /// A row as it starts: who asked for what, now, with nothing served yet (no model, no
    /// tokens, the hashes of empty bodies) and `status` until the outcome is known.
    pub fn begin(
        request_id: String,
        client_id: Uuid,
        key_id: Uuid,
        method: String,
        endpoint: String,
        status: i16,
        tos_version: Option<String>,
    ) -> UsageEvent {
        let empty: [u8; 32] = Sha256::digest(b"").into();
        UsageEvent {
            request_id,
            ts: to_db_precision(Utc::now()),
            client_id,
            key_id,
            method,
            endpoint,
            model: None,
            status,
            error_code: None,
            prompt_tokens: 0,
            scored_tokens: 0,
            generated_tokens: 0,
            judgments: 0,
            top_k: None,
            latency_ms: 0.0,
            request_sha256: empty,
            response_sha256: empty,
            tos_version,
            weights_sha256: None,
            refusals: 0,
            response_bytes: 0,
        }
    }
}

/// A committed row: the event plus its place in the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainedEvent {
    pub id: i64,
    pub event: UsageEvent,
    pub prev_hash: [u8; 32],
    pub row_hash: [u8; 32],
}

/// Truncate a timestamp to what Postgres stores (microseconds), so hashes survive a round trip.
pub fn to_db_precision(ts: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(ts.timestamp_micros()).unwrap_or(ts)
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(&(v.len() as u64).to_be_bytes());
        self.0.extend_from_slice(v);
    }
    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(1);
                self.bytes(s.as_bytes());
            }
        }
    }
}

/// The canonical encoding of a row (without `prev_hash`, which the hash prepends).
pub fn encode(id: i64, e: &UsageEvent) -> Vec<u8> {
    let mut w = Encoder(Vec::with_capacity(320));
    w.0.extend_from_slice(DOMAIN);
    w.i64(id);
    w.bytes(e.request_id.as_bytes());
    w.i64(e.ts.timestamp_micros());
    w.0.extend_from_slice(e.client_id.as_bytes());
    w.0.extend_from_slice(e.key_id.as_bytes());
    w.bytes(e.method.as_bytes());
    w.bytes(e.endpoint.as_bytes());
    w.opt_str(e.model.as_deref());
    w.i64(i64::from(e.status));
    w.opt_str(e.error_code.as_deref());
    w.i64(e.prompt_tokens);
    w.i64(e.scored_tokens);
    w.i64(e.generated_tokens);
    w.i64(e.judgments);
    match e.top_k {
        None => w.0.push(0),
        Some(k) => {
            w.0.push(1);
            w.i64(i64::from(k));
        }
    }
    w.0.extend_from_slice(&e.latency_ms.to_bits().to_be_bytes());
    w.0.extend_from_slice(&e.request_sha256);
    w.0.extend_from_slice(&e.response_sha256);
    w.opt_str(e.tos_version.as_deref());
    w.opt_str(e.weights_sha256.as_deref());
    // Added after the first rows were written: present only when set, so every earlier row
    // (and every row that is not an aggregate) encodes exactly as before.
    if e.refusals != 0 {
        w.0.extend_from_slice(b"refusals");
        w.i64(e.refusals);
    }
    // Likewise (rows written before the column existed have 0 and encode as before).
    if e.response_bytes != 0 {
        w.0.extend_from_slice(b"response_bytes");
        w.i64(e.response_bytes);
    }
    w.0
}

/// `SHA-256(prev_hash || encode(id, event))`.
pub fn row_hash(prev_hash: &[u8; 32], id: i64, event: &UsageEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(encode(id, event));
    h.finalize().into()
}

/// Chain `events` after the row `(head_id, head_hash)` (`(0, GENESIS)` for an empty ledger).
pub fn chain(head_id: i64, head_hash: [u8; 32], events: Vec<UsageEvent>) -> Vec<ChainedEvent> {
    let mut prev = head_hash;
    let mut id = head_id;
    events
        .into_iter()
        .map(|event| {
            id += 1;
            let row = row_hash(&prev, id, &event);
            let chained = ChainedEvent {
                id,
                event,
                prev_hash: prev,
                row_hash: row,
            };
            prev = row;
            chained
        })
        .collect()
}

/// Checks rows fed in `id` order. Stops being useful at the first bad row, which it names.
#[derive(Debug)]
pub struct Verifier {
    expected_prev: [u8; 32],
    expected_id: Option<i64>,
    pub rows_checked: u64,
    pub first_bad: Option<i64>,
}

impl Verifier {
    /// Start after the row `(prev_id, prev_hash)`: `(0, GENESIS)` verifies from the beginning.
    /// `prev_id = None` accepts any first id (a range whose predecessor is unknown).
    pub fn new(prev_id: Option<i64>, prev_hash: [u8; 32]) -> Self {
        Self {
            expected_prev: prev_hash,
            expected_id: prev_id.map(|id| id + 1),
            rows_checked: 0,
            first_bad: None,
        }
    }

    /// Feed the next row; returns false once a bad row has been seen.
    /// A row is bad when its id is not the successor of the previous one (a deleted row), its
    /// `prev_hash` is not the previous row's `row_hash` (deleted or reordered rows), or its
    /// `row_hash` does not match its contents (an edited row).
    pub fn check(&mut self, row: &ChainedEvent) -> bool {
        if self.first_bad.is_some() {
            return false;
        }
        self.rows_checked += 1;
        let id_ok = self.expected_id.is_none_or(|id| id == row.id);
        let ok = id_ok
            && row.prev_hash == self.expected_prev
            && row.row_hash == row_hash(&row.prev_hash, row.id, &row.event);
        if !ok {
            self.first_bad = Some(row.id);
            return false;
        }
        self.expected_prev = row.row_hash;
        self.expected_id = Some(row.id + 1);
        true
    }
}

/// Verify a whole slice (convenience for tests).
pub fn verify(rows: &[ChainedEvent]) -> Option<i64> {
    let mut v = Verifier::new(Some(0), GENESIS);
    for row in rows {
        if !v.check(row) {
            break;
        }
    }
    v.first_bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8) -> UsageEvent {
        UsageEvent {
            request_id: format!("req-{n}"),
            ts: DateTime::from_timestamp_micros(1_700_000_000_000_000 + i64::from(n)).unwrap(),
            client_id: Uuid::from_u128(7),
            key_id: Uuid::from_u128(8),
            method: "POST".into(),
            endpoint: "/v1/logprobs".into(),
            model: Some("m".into()),
            status: 200,
            error_code: None,
            prompt_tokens: 10,
            scored_tokens: 9,
            generated_tokens: 0,
            judgments: 0,
            top_k: Some(20),
            latency_ms: 1.25,
            request_sha256: [n; 32],
            response_sha256: [n.wrapping_add(1); 32],
            tos_version: Some("2024-01".into()),
            weights_sha256: Some("ab".into()),
            refusals: 0,
            response_bytes: 0,
        }
    }

    fn rows(n: u8) -> Vec<ChainedEvent> {
        chain(0, GENESIS, (1..=n).map(event).collect())
    }

    #[test]
    fn chain_links_each_row_to_the_previous_and_verifies() {
        let rows = rows(5);
        assert_eq!(rows[0].prev_hash, GENESIS);
        assert_eq!(rows[0].id, 1);
        for w in rows.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].row_hash);
            assert_eq!(w[1].id, w[0].id + 1);
        }
        assert_eq!(verify(&rows), None);
    }

    #[test]
    fn continuing_a_chain_equals_chaining_at_once() {
        let all = rows(4);
        let first = chain(0, GENESIS, (1..=2).map(event).collect());
        let rest = chain(first[1].id, first[1].row_hash, (3..=4).map(event).collect());
        assert_eq!([first, rest].concat(), all);
    }

    #[test]
    fn an_edited_field_is_the_first_bad_row() {
        let mut rows = rows(5);
        rows[2].event.prompt_tokens += 1;
        assert_eq!(verify(&rows), Some(3));
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = event(1);
        let h = row_hash(&GENESIS, 1, &base);
        let mut variants: Vec<UsageEvent> = Vec::new();
        let mut push = |f: &dyn Fn(&mut UsageEvent)| {
            let mut e = base.clone();
            f(&mut e);
            variants.push(e);
        };
        push(&|e| e.request_id.push('x'));
        push(&|e| e.ts += chrono::Duration::microseconds(1));
        push(&|e| e.client_id = Uuid::from_u128(9));
        push(&|e| e.key_id = Uuid::from_u128(9));
        push(&|e| e.method = "GET".into());
        push(&|e| e.endpoint.push('/'));
        push(&|e| e.model = None);
        push(&|e| e.status = 201);
        push(&|e| e.error_code = Some("x".into()));
        push(&|e| e.prompt_tokens = 0);
        push(&|e| e.scored_tokens = 0);
        push(&|e| e.generated_tokens = 1);
        push(&|e| e.judgments = 1);
        push(&|e| e.top_k = None);
        push(&|e| e.latency_ms = 1.5);
        push(&|e| e.request_sha256[0] ^= 1);
        push(&|e| e.response_sha256[31] ^= 1);
        push(&|e| e.tos_version = None);
        push(&|e| e.weights_sha256 = Some("ac".into()));
        push(&|e| e.refusals = 3);
        push(&|e| e.response_bytes = 1234);
        for v in &variants {
            assert_ne!(row_hash(&GENESIS, 1, v), h, "{v:?}");
        }
        assert_ne!(row_hash(&GENESIS, 2, &base), h, "the id is covered");
        assert_ne!(row_hash(&[1; 32], 1, &base), h, "prev_hash is covered");
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        // Moving a character from one field to the next must change the hash.
        let mut a = event(1);
        let mut b = event(1);
        a.method = "GE".into();
        a.endpoint = "T/x".into();
        b.method = "GET".into();
        b.endpoint = "/x".into();
        assert_ne!(encode(1, &a), encode(1, &b));
        let mut c = event(1);
        c.model = Some(String::new());
        let mut d = event(1);
        d.model = None;
        assert_ne!(encode(1, &c), encode(1, &d));
    }

    #[test]
    fn a_deleted_row_makes_its_successor_bad() {
        let mut rows = rows(5);
        rows.remove(2); // id 3
        assert_eq!(verify(&rows), Some(4));
    }

    #[test]
    fn deleting_and_renumbering_is_still_caught() {
        let mut rows = rows(5);
        rows.remove(2);
        for (i, r) in rows.iter_mut().enumerate() {
            r.id = i as i64 + 1;
        }
        assert_eq!(verify(&rows), Some(3));
    }

    #[test]
    fn swapped_rows_are_caught_at_the_first_of_them() {
        let mut rows = rows(5);
        // Swap contents of ids 2 and 3 but keep the id order.
        let (a, b) = (rows[1].clone(), rows[2].clone());
        rows[1] = ChainedEvent { id: 2, ..b };
        rows[2] = ChainedEvent { id: 3, ..a };
        assert_eq!(verify(&rows), Some(2));
    }

    #[test]
    fn a_recomputed_row_hash_breaks_the_next_link() {
        let mut rows = rows(4);
        rows[1].event.status = 500;
        rows[1].row_hash = row_hash(&rows[1].prev_hash, 2, &rows[1].event);
        assert_eq!(verify(&rows), Some(3));
    }

    #[test]
    fn a_range_can_start_mid_chain() {
        let rows = rows(6);
        let mut v = Verifier::new(Some(rows[2].id), rows[2].row_hash);
        assert!(rows[3..].iter().all(|r| v.check(r)));
        assert_eq!(v.rows_checked, 3);
        let mut unknown_start = Verifier::new(None, rows[2].row_hash);
        assert!(rows[3..].iter().all(|r| unknown_start.check(r)));
    }

    #[test]
    fn timestamps_are_truncated_to_microseconds() {
        let ts = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(to_db_precision(ts).timestamp_subsec_nanos(), 123_456_000);
    }
}
