//! What authentication and per-client limits add to a request.
//!
//! Starts the app in-process (empty model registry, a fresh Postgres database) three times and
//! fires requests at the cheap `GET /v1/models`:
//! - `no gate`: the same handler mounted without the gate (the baseline),
//! - `disable_auth`: the gate with `server.disable_auth` (anonymous client: limits, no key lookup),
//! - `auth + limits`: the real thing, a Bearer key looked up in Postgres on every request.
//!
//! Latency: sequential requests on one keep-alive connection. Throughput: `--concurrency`
//! clients on one key, limits set high enough not to refuse anything.
//!
//! `cargo run --bin bench-auth -- [--requests 5000] [--concurrency 8]`
//! (Postgres at `TEACHD_TEST_PG`, default postgres://postgres@127.0.0.1:5432)

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use serde_json::json;
use sqlx::Executor;
use teachd::config::Config;
use teachd::engine::ModelRegistry;
use tokio::net::TcpListener;

struct Args {
    requests: usize,
    concurrency: usize,
}

fn args() -> Args {
    let mut a = Args {
        requests: 5000,
        concurrency: 8,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse().ok());
        match (pair[0].as_str(), value) {
            ("--requests", Some(v)) => a.requests = v,
            ("--concurrency", Some(v)) => a.concurrency = v,
            _ => panic!("usage: bench_auth [--requests N] [--concurrency C]"),
        }
    }
    a
}

fn pg_server() -> String {
    std::env::var("TEACHD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// (url, name) of a new database.
async fn fresh_database() -> (String, String) {
    let server = pg_server();
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    let name = format!("teachd_bench_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .unwrap();
    (format!("{server}/{name}"), name)
}

fn config(db_url: &str, disable_auth: bool) -> Config {
    let mut c = Config::load_with_env(None, &[]).unwrap();
    c.models.clear();
    c.database.url = db_url.into();
    c.server.disable_auth = disable_auth;
    // High enough that nothing is refused: we measure the cost of checking, not of refusing.
    c.limits.rpm = i32::MAX as u32;
    c.limits.tpm = i32::MAX as u32;
    c.limits.max_concurrent = 10_000;
    c
}

async fn serve(router: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/v1/models")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

struct Row {
    name: &'static str,
    p50: Duration,
    p99: Duration,
    rps: f64,
}

async fn measure(name: &'static str, url: &str, key: Option<&str>, a: &Args) -> Row {
    let http = reqwest::Client::new();
    let send = |http: &reqwest::Client| {
        let rb = http.get(url);
        match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    };
    for _ in 0..200 {
        let r = send(&http).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        r.bytes().await.unwrap();
    }
    let mut lat = Vec::with_capacity(a.requests);
    for _ in 0..a.requests {
        let t = Instant::now();
        let r = send(&http).send().await.unwrap();
        r.bytes().await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();

    let per_worker = a.requests / a.concurrency;
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency {
        let http = reqwest::Client::new();
        let url = url.to_string();
        let key = key.map(str::to_string);
        workers.push(tokio::spawn(async move {
            for _ in 0..per_worker {
                let mut rb = http.get(&url);
                if let Some(k) = &key {
                    rb = rb.bearer_auth(k);
                }
                let r = rb.send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let rps = (per_worker * a.concurrency) as f64 / start.elapsed().as_secs_f64();
    Row {
        name,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        rps,
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let (db_url, db_name) = fresh_database().await;

    // Baseline: the handler alone.
    let plain = teachd::build_state_with_models(config(&db_url, false), ModelRegistry::empty())
        .await
        .unwrap();
    let bare = Router::new()
        .route("/v1/models", get(teachd::http::models::list_models))
        .with_state(plain.clone());
    let bare_url = serve(bare).await;

    let anon = teachd::build_state_with_models(config(&db_url, true), ModelRegistry::empty())
        .await
        .unwrap();
    let anon_url = serve(teachd::http::router(anon)).await;

    let full_url = serve(teachd::http::router(plain.clone())).await;
    let (_, admin) = teachd::store::bootstrap_admin(&plain.db).await.unwrap();
    let http = reqwest::Client::new();
    let base = full_url.trim_end_matches("/v1/models");
    let client: serde_json::Value = http
        .post(format!("{base}/admin/clients"))
        .bearer_auth(admin.expose_secret())
        .json(&json!({"name": "bench", "limits": {"rpm": i32::MAX, "tpm": i32::MAX, "max_concurrent": 10000}}))
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
        .bearer_auth(admin.expose_secret())
        .json(&json!({"scopes": ["teacher"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_string();

    let results = vec![
        measure("no gate (handler only)", &bare_url, None, &a).await,
        measure("disable_auth (limits, no key)", &anon_url, None, &a).await,
        measure("auth + limits", &full_url, Some(&key), &a).await,
    ];
    let base = &results[0];
    println!(
        "GET /v1/models, {} sequential requests for latency, {} concurrent clients for throughput\n",
        a.requests, a.concurrency
    );
    println!("| variant | p50 | p99 | added p50 | added p99 | requests/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &results {
        let added = |x: Duration, y: Duration| x.as_secs_f64() * 1e6 - y.as_secs_f64() * 1e6;
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:+.0} µs | {:+.0} µs | {:.0} |",
            r.name,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            added(r.p50, base.p50),
            added(r.p99, base.p99),
            r.rps
        );
    }
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", pg_server()))
        .await
        .unwrap();
    let _ = admin
        .execute(format!(r#"DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)"#).as_str())
        .await;
}
