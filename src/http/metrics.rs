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

/// Request counters, keyed by (normalised path, status).
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
}

impl Metrics {
    pub fn observe(&self, path: &str, status: u16, elapsed: Duration) {
        let mut map = self.requests.lock();
        let entry = map.entry((normalise(path), status)).or_default();
        entry.0 += 1;
        entry.1 += elapsed.as_secs_f64();
    }
}

/// Ids in paths (`/admin/clients/<uuid>`) become `{id}` so the label set stays bounded;
/// unknown paths collapse into one label.
fn normalise(path: &str) -> String {
    const KNOWN: &[&str] = &[
        "/v1/",
        "/admin/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
    ];
    if !KNOWN.iter().any(|k| path.starts_with(k)) {
        return "other".into();
    }
    path.split('/')
        .map(|seg| {
            if uuid::Uuid::parse_str(seg).is_ok() {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let requests = state.metrics.requests.lock().clone();
    out.push_str("# HELP teachd_requests_total Requests answered, by route and status.\n");
    out.push_str("# TYPE teachd_requests_total counter\n");
    for ((path, status), (n, _)) in &requests {
        let _ = writeln!(
            out,
            "teachd_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}"
        );
    }
    out.push_str("# HELP teachd_request_duration_seconds_sum Time to the response head, summed.\n");
    out.push_str("# TYPE teachd_request_duration_seconds_sum counter\n");
    for ((path, status), (_, secs)) in &requests {
        let _ = writeln!(
            out,
            "teachd_request_duration_seconds_sum{{path=\"{path}\",status=\"{status}\"}} {secs}"
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
    out.push_str("# HELP teachd_ledger_healthy 1 while the usage ledger commits.\n");
    out.push_str("# TYPE teachd_ledger_healthy gauge\n");
    let _ = writeln!(
        out,
        "teachd_ledger_healthy {}",
        u8::from(state.ledger.is_healthy())
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn ids_and_unknown_paths_do_not_grow_the_label_set() {
        assert_eq!(
            normalise("/admin/clients/6f1c2c1e-8a49-4a57-9a3e-1f0f4a2b8c11/keys"),
            "/admin/clients/{id}/keys"
        );
        assert_eq!(normalise("/wp-login.php"), "other");
        assert_eq!(normalise("/v1/logprobs"), "/v1/logprobs");
    }
}
