//! Ledger benchmark: prints a table.
//!
//! `cargo run --bin bench-ledger` (Postgres at 127.0.0.1:5432, user postgres; override with
//! BENCH_PG_ADMIN_URL). Creates throwaway databases `teachd_bench_*`.
//!
//! 1. `Ledger::record` alone: durably committed rows/s and record latency with N callers.
//! 2. Full stack: `GET /v1/tos` through the real server (`teachd::serve`), a real teacher key,
//!    the gate (auth, limits) and the ledger (every request's row committed before its
//!    response), against the open `GET /healthz` on the same server (no auth, no row):
//!    requests/s and the latency auth + the commit add. Load generator and server share the
//!    machine's cores.
//! 3. `GET /admin/usage` over 1,000,000 seeded events; then the transparency log over them:
//!    the tree's catch-up over rows seeded without it, checkpoint signing, inclusion and
//!    consistency proofs through the real server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use teachd::ledger::{Ledger, UsageEvent};
use teachd::AppState;
use uuid::Uuid;

fn admin_url() -> String {
    std::env::var("BENCH_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

async fn fresh_db() -> String {
    use sqlx::Connection;
    let name = format!("teachd_bench_{}", Uuid::new_v4().simple());
    CREATED.lock().unwrap().push(name.clone());
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let base = admin_url();
    format!("{}/{}", &base[..base.rfind('/').unwrap()], name)
}

fn event() -> UsageEvent {
    UsageEvent {
        request_id: Uuid::now_v7().to_string(),
        ts: teachd::ledger::chain::to_db_precision(chrono::Utc::now()),
        client_id: Uuid::from_u128(1),
        key_id: Uuid::from_u128(2),
        method: "POST".into(),
        endpoint: "/v1/logprobs".into(),
        model: Some("smollm2-135m-instruct".into()),
        status: 200,
        error_code: None,
        prompt_tokens: 512,
        scored_tokens: 511,
        generated_tokens: 0,
        judgments: 0,
        top_k: Some(20),
        latency_ms: 3.5,
        request_sha256: [1; 32],
        response_sha256: [2; 32],
        tos_version: Some("v1".into()),
        weights_sha256: Some("ab".repeat(32)),
        refusals: 0,
        response_bytes: 0,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn state_for(url: &str) -> AppState {
    // TEACHD__LEDGER__MAX_WAIT_MS=0 etc. apply.
    let mut config = teachd::config::Config::load(None).unwrap();
    config.database.url = url.to_string();
    config.models.clear(); // the ledger alone
    teachd::build_state(config).await.unwrap()
}

async fn bench_record(ledger: &Ledger, callers: usize, secs: u64) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (ledger, stop) = (ledger.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                ledger.record(event(), None).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    (lat.len() as f64 / elapsed, pct(&lat, 0.5), pct(&lat, 0.99))
}

/// The real server on a free port; returns its base URL, an admin key and a teacher key (of a
/// client whose limits the load cannot reach).
async fn serve(state: AppState) -> (String, String, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(teachd::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let base = format!("http://{addr}");
    let (_, admin) = teachd::store::bootstrap_admin(&state.db).await.unwrap();
    let admin = admin.expose_secret().to_string();
    let http = reqwest::Client::new();
    let client: serde_json::Value = http
        .post(format!("{base}/admin/clients"))
        .bearer_auth(&admin)
        .json(
            &serde_json::json!({"name": "bench", "limits": {"rpm": 100000000,
            "tpm": 1000000000, "max_concurrent": 100000, "daily_tokens": 1000000000000i64}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: serde_json::Value = http
        .post(format!(
            "{base}/admin/clients/{}/keys",
            client["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"scopes": ["teacher"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (base, admin, key["key"].as_str().unwrap().to_string())
}

async fn bench_http(
    url: String,
    key: Option<String>,
    workers: usize,
    secs: u64,
) -> (f64, f64, f64) {
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, url, stop, key) = (http.clone(), url.clone(), stop.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let mut rq = http.get(&url);
                if let Some(key) = &key {
                    rq = rq.bearer_auth(key);
                }
                let r = rq.send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    (lat.len() as f64 / elapsed, pct(&lat, 0.5), pct(&lat, 0.99))
}

const SEED_SQL: &str = "
INSERT INTO usage_events (id, request_id, ts, client_id, key_id, method, endpoint, model, status,
    error_code, prompt_tokens, scored_tokens, generated_tokens, judgments, top_k, latency_ms,
    request_sha256, response_sha256, tos_version, weights_sha256, prev_hash, row_hash)
-- ids 1..1000000 (the tree needs ids without gaps); the server's own rows (client, key) follow
SELECT g, 'seed-' || g,
       timestamptz '2025-01-01' + (g * interval '30 days' / 1000000),
       ('00000000-0000-0000-0000-' || lpad((g % 100)::text, 12, '0'))::uuid,
       ('00000000-0000-0000-0001-' || lpad((g % 100)::text, 12, '0'))::uuid,
       'POST',
       (ARRAY['/v1/logprobs','/v1/completions','/v1/chat/completions','/v1/judgments','/v1/tokenize'])[1 + g % 5],
       (ARRAY['m1','m2','m3'])[1 + g % 3],
       CASE WHEN g % 50 = 0 THEN 429 ELSE 200 END, NULL,
       100 + g % 400, 99 + g % 400, g % 64, g % 2, 20, 1.5,
       sha256(('q' || g)::bytea), sha256(('r' || g)::bytea), 'v1', 'w',
       sha256(('p' || g)::bytea), sha256(('h' || g)::bytea)
FROM generate_series(1, 1000000) g";

async fn time_usage(base: &str, admin: &str, query: &str) -> (f64, usize) {
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let r = http
            .get(format!("{base}/admin/usage?{query}"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        times.push(t.elapsed());
        rows = body["data"].as_array().unwrap().len();
    }
    times.sort();
    (times[times.len() / 2].as_secs_f64() * 1e3, rows)
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);

    let sections = std::env::var("BENCH_SECTIONS").unwrap_or_else(|_| "123".into());
    let cfg = teachd::config::Config::load(None).unwrap().ledger;
    println!(
        "ledger config: max_batch={} max_wait_ms={}\n",
        cfg.max_batch, cfg.max_wait_ms
    );
    if sections.contains('1') {
        println!("## 1. Ledger::record (durable group commit), {secs}s per row\n");
        println!("| callers | rows/s | p50 ms | p99 ms |");
        println!("|---:|---:|---:|---:|");
        let state = state_for(&fresh_db().await).await;
        for callers in [1, 16, 64, 256] {
            let (rps, p50, p99) = bench_record(&state.ledger, callers, secs).await;
            println!("| {callers} | {rps:.0} | {p50:.2} | {p99:.2} |");
        }
    }
    if sections.contains('2') {
        println!("\n## 2. Full stack, real server, {secs}s per row\n");
        println!("| workers | route | req/s | p50 ms | p99 ms |");
        println!("|---:|---|---:|---:|---:|");
        let state = state_for(&fresh_db().await).await;
        state.tos.publish("v1", "terms").await.unwrap();
        let (base, _admin, key) = serve(state.clone()).await;
        for workers in [16, 64] {
            for gated in [false, true] {
                let (url, key, label) = if gated {
                    (
                        format!("{base}/v1/tos"),
                        Some(key.clone()),
                        "GET /v1/tos (auth + limits + row committed per request)",
                    )
                } else {
                    (
                        format!("{base}/healthz"),
                        None,
                        "GET /healthz (open: no auth, no row)",
                    )
                };
                let (rps, p50, p99) = bench_http(url, key, workers, secs).await;
                println!("| {workers} | {label} | {rps:.0} | {p50:.2} | {p99:.2} |");
            }
        }
        let t = Instant::now();
        let report = teachd::ledger::queries::verify(&state.db, Default::default())
            .await
            .unwrap();
        println!(
            "\nchain verify after the run: ok={} rows={} in {:.2}s",
            report.ok,
            report.rows_checked,
            t.elapsed().as_secs_f64()
        );
    }
    if sections.contains('3') {
        usage_queries().await;
    }
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    let names = CREATED.lock().unwrap().clone();
    for name in names {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

async fn usage_queries() {
    println!("\n## 3. GET /admin/usage over 1,000,000 seeded events (median of 5)\n");
    let state = state_for(&fresh_db().await).await;
    let t = Instant::now();
    sqlx::query(SEED_SQL).execute(&state.db).await.unwrap();
    sqlx::query("ANALYZE usage_events")
        .execute(&state.db)
        .await
        .unwrap();
    println!("seeded in {:.1}s\n", t.elapsed().as_secs_f64());
    // The seeded rows have no tree yet: the writer adds them before its first commit.
    let t = Instant::now();
    state.ledger.record(event(), None).await.unwrap();
    let catch_up = t.elapsed().as_secs_f64();
    let (base, admin, _) = serve(state.clone()).await;
    println!("| query | groups | ms |");
    println!("|---|---:|---:|");
    for q in [
        "group_by=client",
        "group_by=day",
        "group_by=client,day",
        "group_by=model,endpoint",
        "group_by=hour&from=2025-01-10&to=2025-01-11",
        "client_id=00000000-0000-0000-0000-000000000007&group_by=day",
        "",
    ] {
        let (ms, rows) = time_usage(&base, &admin, q).await;
        println!("| `{q}` | {rows} | {ms:.0} |");
    }
    let http = reqwest::Client::new();
    let t = Instant::now();
    let r = http
        .get(format!(
            "{base}/admin/usage/events?limit=1000&cursor=900000"
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    println!(
        "\nevents page (1000 rows, cursor deep in the table): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let r = http
        .get(format!("{base}/admin/audit/export?format=jsonl"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let mut n = 0usize;
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        n += chunk.unwrap().len();
    }
    println!(
        "export 1M rows as JSONL: {:.1}s, {} MiB",
        t.elapsed().as_secs_f64(),
        n >> 20
    );

    println!("\n## 4. Transparency log over the same 1,000,000 rows\n");
    println!("tree catch-up over the seeded rows (first commit): {catch_up:.1}s\n");
    println!("| request | median ms | p99 ms |");
    println!("|---|---:|---:|");
    let size = state.ledger.tlog().size().await.unwrap();
    let timed = |path: String| {
        let (http, admin) = (http.clone(), admin.clone());
        async move {
            let mut lat = Vec::new();
            for i in 0..50u64 {
                let n = (i * 19_997) % (size / 2) + 1;
                let path = path.replace("{i}", &n.to_string());
                let t = Instant::now();
                let r = http
                    .get(path.clone())
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{path}");
                r.bytes().await.unwrap();
                lat.push(t.elapsed());
            }
            lat.sort();
            (pct(&lat, 0.5), pct(&lat, 0.99))
        }
    };
    for (label, path) in [
        (
            "GET /v1/ledger/checkpoint (signs a new one each time the tree grew)",
            format!("{base}/v1/ledger/checkpoint"),
        ),
        (
            "GET /v1/ledger/proof/inclusion (leaf i, tree of ~1M)",
            format!("{base}/v1/ledger/proof/inclusion?leaf_index={{i}}&tree_size={size}"),
        ),
        (
            "GET /v1/ledger/proof/consistency (first = i + 1, second ~1M)",
            format!("{base}/v1/ledger/proof/consistency?first={{i}}&second={size}"),
        ),
        (
            "GET /v1/ledger/leaf/{i}",
            format!("{base}/v1/ledger/leaf/{{i}}"),
        ),
    ] {
        let (p50, p99) = timed(path).await;
        println!("| {label} | {p50:.2} | {p99:.2} |");
    }
    let t = Instant::now();
    let key = state.ledger.tlog().key.clone();
    let report =
        teachd::ledger::transparency::audit(&state.db, key.verifier_key(), key.origin(), &[])
            .await
            .unwrap();
    println!(
        "\naudit (chain + tree recomputed from every row; the seeded rows carry no valid \
         chain, so ok={}): rows={} in {:.1}s",
        report.ok,
        report.rows_checked,
        t.elapsed().as_secs_f64()
    );
}
