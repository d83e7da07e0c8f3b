//! Postgres goes away mid-run (a chaos proxy cuts every connection) and comes back: an outage
//! is a 503 (never a 500), every 2xx keeps its row, and service recovers without a restart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::process::{load, Outcome};
use crate::app::{superuser, ChaosProxy, Options, TestApp, MODEL};

async fn row_count_direct(app: &TestApp) -> i64 {
    let mut su = superuser(&app.db_name).await;
    sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&mut su)
        .await
        .unwrap()
}

async fn wait_for_rows(app: &TestApp, n: i64) {
    for _ in 0..1200 {
        if row_count_direct(app).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached {n} rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_503_and_recovers_without_restart() {
    let proxy = ChaosProxy::start().await;
    let app = TestApp::spawn_opts(
        Options {
            via: Some(proxy.host_port()),
            ..Default::default()
        },
        |c| c.ledger.commit_timeout_ms = 2_000,
    )
    .await;
    app.publish_tos("v1").await;
    let mut keys = Vec::new();
    for i in 0..4 {
        keys.push(
            app.teacher(&format!("c{i}"), serde_json::json!({"rpm": 1000000}))
                .await
                .1,
        );
    }
    let base = format!("http://{}", app.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        // Teacher and admin routes alike: auth, limits, ToS and admin queries need the database.
        let path = if i == 3 { "/admin/clients" } else { "/v1/tos" };
        let key = if i == 3 {
            app.admin_key.clone()
        } else {
            key.clone()
        };
        tasks.push(tokio::spawn(load(base.clone(), path, key, 2, stop.clone())));
    }
    wait_for_rows(&app, 200).await;
    proxy.cut();
    // While it is down: 503 with the envelope and Retry-After, and /readyz says so.
    let probe = reqwest::Client::new();
    let mut refused = 0;
    for _ in 0..400 {
        let r = probe
            .get(format!("{base}/v1/tos"))
            .bearer_auth(&keys[0])
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
            let body: serde_json::Value = r.json().await.unwrap();
            let kind = body["error"]["type"].as_str().unwrap().to_string();
            assert!(
                kind == "service_unavailable" || kind == "ledger_unavailable",
                "{body}"
            );
            refused += 1;
            if refused == 5 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused, 5, "requests are refused while Postgres is down");
    let ready = probe.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.restore();
    let mut recovered = false;
    for _ in 0..400 {
        let r = probe
            .get(format!("{base}/v1/tos"))
            .bearer_auth(&keys[0])
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the service recovers once Postgres is back");
    let settled = row_count_direct(&app).await + 100;
    wait_for_rows(&app, settled).await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes: Vec<Outcome> = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.unwrap());
    }
    let unavailable = outcomes.iter().filter(|o| o.status == 503).count();
    assert!(unavailable > 0, "the load saw the outage");
    let odd: Vec<u16> = outcomes
        .iter()
        .map(|o| o.status)
        .filter(|s| *s != 200 && *s != 503)
        .collect();
    assert!(odd.is_empty(), "only 200/503, never a 500: {odd:?}");
    let committed: HashSet<String> = sqlx::query_scalar("SELECT request_id FROM usage_events")
        .fetch_all(&app.db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for o in outcomes.iter().filter(|o| o.status == 200) {
        assert!(
            committed.contains(&o.request_id),
            "2xx without a row: {}",
            o.request_id
        );
    }
    let report = teachd::ledger::queries::verify(&app.db, Default::default())
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_row_cannot_commit_ends_with_an_error_instead_of_done() {
    let proxy = ChaosProxy::start().await;
    let app = TestApp::spawn_opts(
        Options {
            via: Some(proxy.host_port()),
            model: true,
            ..Default::default()
        },
        |c| c.ledger.commit_timeout_ms = 2_000,
    )
    .await;
    let (client, key) = app.ready_teacher("acme", serde_json::json!({})).await;
    let r = app
        .post(
            "/v1/chat/completions",
            &key,
            serde_json::json!({"model": MODEL, "stream": true, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me about the sea."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = r.bytes_stream();
    let first = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"));
    // Postgres goes away while the stream is running.
    proxy.cut();
    let mut rest = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(!rest.contains("[DONE]"), "{rest}");
    let last = rest.trim_end().rsplit("data: ").next().unwrap();
    let err: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(err["error"]["code"], "ledger_unavailable");
    assert_eq!(err["error"]["request_id"], request_id);

    proxy.restore();
    let mut ok = false;
    for _ in 0..400 {
        if app
            .get("/v1/tos", Some(&key))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok);
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE client_id = $1 AND request_id = $2",
    )
    .bind(client)
    .bind(&request_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(n, 0);
}
