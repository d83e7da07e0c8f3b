//! Postgres goes away mid-run (a chaos proxy cuts every connection) and comes back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::helpers::{spawn_app_via, ChaosProxy};
use crate::process::{load, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_closed_and_recovers_without_restart() {
    let proxy = ChaosProxy::start().await;
    let app = spawn_app_via(&proxy.host_port(), |c| c.ledger.commit_timeout_ms = 2_000).await;
    let admin = Uuid::new_v4();
    app.publish_tos(admin, "v1").await;
    let base = format!("http://{}", app.addr);

    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(base.clone(), "/v1/tos", 8, stop.clone()));

    // Run until a few hundred requests are served, then cut Postgres.
    wait_for_rows(&app.state.db, 200).await;
    proxy.cut();
    // While it is down, requests are refused with 503 ledger_unavailable (wait until we see some).
    let probe = reqwest::Client::new();
    let mut refused = 0;
    for _ in 0..200 {
        let r = probe
            .get(format!("{base}/v1/tos"))
            .header("x-test-client", Uuid::new_v4().to_string())
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["type"], "ledger_unavailable");
            assert_eq!(body["error"]["code"], "ledger_unavailable");
            refused += 1;
            if refused == 5 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused, 5, "requests are refused while Postgres is down");

    proxy.restore();
    // Service resumes by itself: wait (bounded) for a 200.
    let mut recovered = false;
    for _ in 0..200 {
        let r = probe
            .get(format!("{base}/v1/tos"))
            .header("x-test-client", Uuid::new_v4().to_string())
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
    let settled = app.row_count_direct().await + 100;
    wait_for_rows(&app.state.db, settled).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = load_task.await.unwrap();

    // Only 200s and 503 ledger_unavailable, and every 200 has its row.
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 200).collect();
    let unavailable = outcomes.iter().filter(|o| o.status == 503).count();
    assert!(unavailable > 0, "the load saw the outage");
    assert!(
        outcomes.iter().all(|o| o.status == 200 || o.status == 503),
        "only 200/503"
    );
    let committed: HashSet<String> = sqlx::query_scalar("SELECT request_id FROM usage_events")
        .fetch_all(&app.state.db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for o in &ok {
        assert!(
            committed.contains(&o.request_id),
            "2xx without a row: {}",
            o.request_id
        );
    }
    // The chain is intact across the reconnect.
    let report = teachd::ledger::queries::verify(&app.state.db, Default::default())
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_row_cannot_commit_ends_with_an_error_instead_of_done() {
    let proxy = ChaosProxy::start().await;
    let app = spawn_app_via(&proxy.host_port(), |c| c.ledger.commit_timeout_ms = 2_000).await;
    let client = Uuid::new_v4();
    let r = app
        .get(client, "/v1/test/slow-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = r.bytes_stream();
    let first = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: {\"n\":1}\n\n");
    // Postgres goes away while the stream is running.
    proxy.cut();
    let mut rest = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(!rest.contains("[DONE]"), "{rest}");
    assert!(rest.trim_end().ends_with('}'), "{rest}");
    let last = rest.trim_end().rsplit("data: ").next().unwrap();
    let err: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(err["error"]["code"], "ledger_unavailable");
    assert_eq!(err["error"]["request_id"], request_id);

    proxy.restore();
    // The ledger comes back; the refused stream has no row, later requests do.
    let mut ok = false;
    for _ in 0..200 {
        if app.get(client, "/v1/tos").send().await.unwrap().status() != 503 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok);
    let mut su = crate::helpers::superuser(&app.db_name).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE request_id = $1")
        .bind(&request_id)
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

async fn wait_for_rows(db: &sqlx::PgPool, n: i64) {
    for _ in 0..600 {
        let c: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(db)
            .await;
        if matches!(c, Ok(c) if c >= n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached {n} rows");
}

impl crate::helpers::TestApp {
    /// Row count through a direct connection (the app's pool may still be reconnecting).
    pub async fn row_count_direct(&self) -> i64 {
        let mut su = crate::helpers::superuser(&self.db_name).await;
        sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(&mut su)
            .await
            .unwrap()
    }
}
