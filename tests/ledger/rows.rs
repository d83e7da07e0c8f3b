use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn every_authenticated_request_leaves_one_row_with_its_facts() {
    let app = spawn_app().await;
    let (admin, client) = (Uuid::new_v4(), Uuid::new_v4());
    app.publish_tos(admin, "v1").await;
    app.accept_tos(client, "v1", false).await;

    let body = serde_json::json!({"tokens": 7});
    let r = app
        .post(client, "/v1/test/teacher/llama", body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let response_bytes = r.bytes().await.unwrap();

    // Unauthenticated: refused before the ledger, no row.
    let before = app.row_count().await;
    let r = app.http.get(app.url("/v1/tos")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(app.row_count().await, before);

    let rows = teachd::ledger::queries::events_after(&app.state.db, &Default::default(), 0, 1_000)
        .await
        .unwrap();
    let row = rows
        .iter()
        .find(|r| r.event.request_id == request_id)
        .expect("its row");
    let e = &row.event;
    assert_eq!(e.client_id, client);
    assert_eq!(e.key_id, Uuid::from_u128(client.as_u128() ^ 1));
    assert_eq!(
        (e.method.as_str(), e.endpoint.as_str()),
        ("POST", "/v1/test/teacher/{model}")
    );
    assert_eq!(e.model.as_deref(), Some("llama"));
    assert_eq!(
        (e.status, e.prompt_tokens, e.scored_tokens, e.top_k),
        (200, 7, 6, Some(3))
    );
    assert_eq!(
        e.request_sha256.to_vec(),
        Sha256::digest(serde_json::to_vec(&body).unwrap()).to_vec()
    );
    assert_eq!(
        e.response_sha256.to_vec(),
        Sha256::digest(&response_bytes).to_vec()
    );
    assert_eq!(e.tos_version.as_deref(), Some("v1"));
    assert_eq!(
        e.weights_sha256.as_deref(),
        Some(format!("{:0>64}", 5).as_str())
    );
    assert!(e.latency_ms > 0.0);

    // A caller-chosen request id is echoed and recorded; reusing it is refused.
    let r = app
        .get(client, "/v1/tos")
        .header("x-request-id", "my-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "my-id-1");
    let r = app
        .get(client, "/v1/tos")
        .header("x-request-id", "my-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "duplicate_request_id");

    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE request_id = 'my-id-1'")
            .fetch_one(&app.state.db)
            .await
            .unwrap();
    assert_eq!(n, 1);
    let report = teachd::ledger::queries::verify(&app.state.db, Default::default())
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.rows_checked as i64, app.row_count().await);
}

#[tokio::test]
async fn a_streamed_response_is_recorded_with_the_hash_of_every_byte() {
    let app = spawn_app().await;
    let client = Uuid::new_v4();
    let r = app.get(client, "/v1/test/stream").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let bytes = r.bytes().await.unwrap();
    assert!(bytes.ends_with(b"data: [DONE]\n\n"));
    let (status, hash): (i16, Vec<u8>) =
        sqlx::query_as("SELECT status, response_sha256 FROM usage_events WHERE request_id = $1")
            .bind(&id)
            .fetch_one(&app.state.db)
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert_eq!(hash, Sha256::digest(&bytes).to_vec());
}

#[tokio::test]
async fn opt_in_body_storage_keeps_the_bodies_as_evidence() {
    let app = spawn_app_with(|c| c.ledger.store_bodies = true).await;
    let (admin, client) = (Uuid::new_v4(), Uuid::new_v4());
    app.publish_tos(admin, "v1").await;
    app.accept_tos(client, "v1", false).await;
    let body = serde_json::json!({"tokens": 2});
    let r = app
        .post(client, "/v1/test/teacher/open", body.clone())
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let response = r.bytes().await.unwrap();
    let (req, resp): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT request_body, response_body FROM usage_bodies WHERE request_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.state.db)
    .await
    .unwrap();
    assert_eq!(req, serde_json::to_vec(&body).unwrap());
    assert_eq!(resp, response.to_vec());

    // Off by default.
    let plain = spawn_app().await;
    plain.get(client, "/v1/tos").send().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_bodies")
        .fetch_one(&plain.state.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(plain.row_count().await, 1);
}
