//! Per-client limits through the real gate and the Postgres-backed quota.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Query;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use governor::clock::FakeRelativeClock;
use serde_json::json;
use teachd::auth::{ClientCtx, Scope};
use teachd::error::ApiError;
use teachd::http::gate::teacher_gate;
use teachd::limits::{Limiter, Limits};
use teachd::usage::Meter;
use teachd::AppState;
use tokio::sync::{mpsc, Semaphore};

use crate::app::{assert_rate_limit_headers, error_of, Extra, TestApp};

#[derive(serde::Deserialize)]
struct Generate {
    reserve: u64,
    actual: u64,
}

/// A route of this test behind the real gate, standing in for a generation endpoint: reserves
/// prompt + max_tokens through the request's meter and records what it "produced".
async fn generate(meter: Meter, Query(q): Query<Generate>) -> Result<Response, ApiError> {
    meter.reserve(q.reserve).await?;
    meter.record(|u| u.prompt_tokens = q.actual);
    Ok("ok".into_response())
}

fn generate_route() -> Extra {
    Arc::new(|state: AppState| {
        Router::new()
            .route("/v1/test/generate", get(generate))
            .route_layer(from_fn_with_state(state, teacher_gate))
    })
}

#[tokio::test]
async fn rpm_429_carries_every_header_and_retry_after() {
    let app = TestApp::spawn().await;
    let (_, key) = app.teacher("acme", json!({"rpm": 2})).await;
    for remaining in ["1", "0"] {
        let resp = app.get("/v1/models", Some(&key)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_rate_limit_headers(&resp);
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], remaining);
        assert!(resp.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("\"rpm\";q=2;w=60"));
    }
    let resp = app.get("/v1/models", Some(&key)).send().await.unwrap();
    assert_rate_limit_headers(&resp);
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=30).contains(&retry_after),
        "2 rpm: one request per 30 s, got {retry_after}"
    );
    let err = error_of(resp, 429, "rate_limit_exceeded").await;
    assert_eq!(err["code"], "rate_limit_exceeded");

    // Another client is not affected.
    let (_, other) = app.teacher("other", json!({"rpm": 2})).await;
    assert_eq!(
        app.get("/v1/models", Some(&other))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn concurrency_cap_holds_under_parallel_requests() {
    let release = Arc::new(Semaphore::new(0));
    let gate = release.clone();
    let extra: Extra = Arc::new(move |state: AppState| {
        let gate = gate.clone();
        Router::new()
            .route(
                "/v1/test/slow",
                get(move || {
                    let gate = gate.clone();
                    async move {
                        let _permit = gate.acquire().await.unwrap();
                        "done"
                    }
                }),
            )
            .route_layer(from_fn_with_state(state, teacher_gate))
    });
    let app = TestApp::spawn_with(Some(extra), |_| {}).await;
    let (client, key) = app
        .teacher("acme", json!({"max_concurrent": 2, "rpm": 1000}))
        .await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..6 {
        let req = app.get("/v1/test/slow", Some(&key));
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            let retry = resp.headers().contains_key("retry-after");
            tx.send((resp.status().as_u16(), retry)).unwrap();
        });
    }
    // Two are held in the handler; the other four are refused at once.
    for _ in 0..4 {
        let (status, retry) = rx.recv().await.unwrap();
        assert_eq!(status, 429);
        assert!(retry);
    }
    assert_eq!(app.state.limits.in_flight(client), 2);
    release.add_permits(2);
    for _ in 0..2 {
        assert_eq!(rx.recv().await.unwrap().0, 200);
    }
    // Slots are free again.
    release.add_permits(1);
    let resp = app.get("/v1/test/slow", Some(&key)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.state.limits.in_flight(client), 0);
}

#[tokio::test]
async fn daily_quota_is_still_spent_after_a_restart() {
    let app = TestApp::spawn_with(Some(generate_route()), |_| {}).await;
    let (client, key) = app.teacher("acme", json!({"daily_tokens": 100})).await;
    let spend = |app: &TestApp, n: u64| {
        app.get(
            &format!("/v1/test/generate?reserve={n}&actual={n}"),
            Some(&key),
        )
        .send()
    };
    assert_eq!(spend(&app, 60).await.unwrap().status(), 200);

    let app = app.restart().await;
    let resp = spend(&app, 60).await.unwrap();
    assert_rate_limit_headers(&resp);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(resp.headers()["ratelimit"]
        .to_str()
        .unwrap()
        .contains("\"daily\";r=40"));
    let err = error_of(resp, 429, "insufficient_quota").await;
    assert_eq!(err["code"], "insufficient_quota");

    assert_eq!(spend(&app, 40).await.unwrap().status(), 200);
    let resp = spend(&app, 1).await.unwrap();
    error_of(resp, 429, "insufficient_quota").await;
    app.wait_tokens_used(client, 100).await;
}

#[tokio::test]
async fn tpm_refund_after_a_short_generation_over_http() {
    let app = TestApp::spawn_with(Some(generate_route()), |_| {}).await;
    let (_, key) = app.teacher("acme", json!({"tpm": 1000})).await;
    // Reserves 600 (prompt + max_tokens), uses 100: 500 come back.
    let resp = app
        .get("/v1/test/generate?reserve=600&actual=100", Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let remaining: u64 = resp.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((900..=910).contains(&remaining), "{remaining}");
    // Without the refund only 400 would be left.
    let resp = app
        .get("/v1/test/generate?reserve=850&actual=850", Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .get("/v1/test/generate?reserve=600&actual=600", Some(&key))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    error_of(resp, 429, "rate_limit_exceeded").await;
}

#[tokio::test]
async fn a_cost_over_the_burst_is_refused_for_good() {
    let app = TestApp::spawn_with(Some(generate_route()), |_| {}).await;
    let (_, key) = app.teacher("acme", json!({"tpm": 100})).await;
    let resp = app
        .get("/v1/test/generate?reserve=101&actual=0", Some(&key))
        .send()
        .await
        .unwrap();
    assert_rate_limit_headers(&resp);
    assert!(
        !resp.headers().contains_key("retry-after"),
        "waiting cannot help"
    );
    let err = error_of(resp, 429, "rate_limit_exceeded").await;
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("can never be admitted"));
}

/// The reservation API the /v1 handlers call, with the real Postgres quota and a hand-moved
/// clock: a generation reserves prompt + max_tokens and gets back what it did not use.
#[tokio::test]
async fn reservation_api_refunds_tpm_and_daily_quota() {
    let app = TestApp::spawn().await;
    let client = app.create_client("acme", json!({})).await;
    let clock = FakeRelativeClock::default();
    let limiter = Arc::new(Limiter::with_clock(Some(app.db.clone()), clock.clone()));
    let ctx = ClientCtx {
        client_id: client,
        key_id: uuid::Uuid::nil(),
        client_name: "acme".into(),
        scopes: vec![Scope::Teacher],
        limits: Limits {
            rpm: 10,
            tpm: 1000,
            max_concurrent: 1,
            daily_tokens: 10_000,
        },
    };
    let prompt = 100;
    let max_tokens = 400;
    let r = limiter
        .reserve_tokens(ctx.client_id, &ctx.limits, prompt + max_tokens)
        .await
        .unwrap();
    assert_eq!(limiter.tokens_remaining(ctx.client_id, &ctx.limits), 500);
    assert_eq!(limiter.daily_tokens_used(client).await.unwrap(), 500);
    r.settle(prompt + 30).await; // stopped after 30 tokens
    assert_eq!(limiter.tokens_remaining(ctx.client_id, &ctx.limits), 870);
    assert_eq!(limiter.daily_tokens_used(client).await.unwrap(), 130);

    // A request that fails before it settles costs nothing (the refund runs in a task).
    let r = limiter
        .reserve_tokens(ctx.client_id, &ctx.limits, 800)
        .await
        .unwrap();
    assert_eq!(limiter.daily_tokens_used(client).await.unwrap(), 930);
    drop(r);
    assert_eq!(limiter.tokens_remaining(ctx.client_id, &ctx.limits), 870);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while limiter.daily_tokens_used(client).await.unwrap() != 130 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "daily refund never landed"
        );
        tokio::task::yield_now().await;
    }

    // tpm refills with time: 1000/min.
    clock.advance(Duration::from_secs(6));
    assert_eq!(limiter.tokens_remaining(ctx.client_id, &ctx.limits), 970);
}
