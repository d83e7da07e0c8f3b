//! `GET /metrics`: Prometheus text exposition of request counts and latencies per route and
//! status, engine queue depth per model, and ledger health. Open, like the health checks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use parking_lot::Mutex;

use crate::AppState;

/// Request counters, keyed by (route template, status). Route templates come from the router
/// (`/admin/clients/{id}`), and every path no route matched is counted as `unmatched`, so the
/// label set is bounded by the routes and statuses that exist, whatever clients send.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let mut map = self.requests.lock();
        match map.get_mut(&(route.to_string(), status)) {
            Some(entry) => {
                entry.0 += 1;
                entry.1 += elapsed.as_secs_f64();
            }
            None => {
                map.insert((route.to_string(), status), (1, elapsed.as_secs_f64()));
            }
        }
    }

    /// Label sets held (to check they stay bounded).
    pub fn series(&self) -> usize {
        self.requests.lock().len()
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let requests = state.metrics.requests.lock().clone();
    out.push_str("# HELP teachd_requests_total Requests answered, by route and status.\n");
    out.push_str("# TYPE teachd_requests_total counter\n");
    for ((path, status), (n, _)) in &requests {
        let _ = writeln!(
            out,
            "teachd_requests_total{{route=\"{path}\",status=\"{status}\"}} {n}"
        );
    }
    out.push_str("# HELP teachd_request_duration_seconds_sum Time to the response head, summed.\n");
    out.push_str("# TYPE teachd_request_duration_seconds_sum counter\n");
    for ((path, status), (_, secs)) in &requests {
        let _ = writeln!(
            out,
            "teachd_request_duration_seconds_sum{{route=\"{path}\",status=\"{status}\"}} {secs}"
        );
    }
    out.push_str("# HELP teachd_engine_queue_depth Requests waiting for a model's engine.\n");
    out.push_str("# TYPE teachd_engine_queue_depth gauge\n");
    for t in state.models.iter() {
        let _ = writeln!(
            out,
            "teachd_engine_queue_depth{{model=\"{}\"}} {}",
            t.info.id,
            t.queue_depth()
        );
    }
    out.push_str(
        "# HELP teachd_engine_raw_passes_total Teacher-forcing passes started, by engine: \
         `scoring` (the scoring lane: the native engine's model, a mistralrs scoring \
         instance, or the one engine when shared) or `generation` (batch lines on a spare turn \
         of an idle generation engine).\n",
    );
    out.push_str("# TYPE teachd_engine_raw_passes_total counter\n");
    for t in state.models.iter() {
        let (scoring, spare) = t.raw_passes();
        for (engine, n) in [("scoring", scoring), ("generation", spare)] {
            let _ = writeln!(
                out,
                "teachd_engine_raw_passes_total{{model=\"{}\",engine=\"{engine}\"}} {n}",
                t.info.id
            );
        }
    }
    out.push_str("# HELP teachd_ledger_healthy 1 while the usage ledger commits.\n");
    out.push_str("# TYPE teachd_ledger_healthy gauge\n");
    let _ = writeln!(
        out,
        "teachd_ledger_healthy {}",
        u8::from(state.ledger.is_healthy())
    );
    out.push_str("# HELP teachd_database_up 0 while database-bound requests fail fast (503).\n");
    out.push_str("# TYPE teachd_database_up gauge\n");
    let _ = writeln!(
        out,
        "teachd_database_up {}",
        u8::from(!state.db_health.is_down())
    );
    out.push_str("# HELP teachd_ledger_pending_rows Rows not yet handed to the ledger writer.\n");
    out.push_str("# TYPE teachd_ledger_pending_rows gauge\n");
    let _ = writeln!(
        out,
        "teachd_ledger_pending_rows {}",
        state.ledger.pending_rows()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
