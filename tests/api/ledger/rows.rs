use serde_json::json;
use sha2::{Digest, Sha256};

use crate::app::{TestApp, MODEL_ATTRIBUTION};

#[tokio::test]
async fn every_authenticated_request_leaves_one_row_with_its_facts() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("acme", json!({})).await;
    let key_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE client_id = $1")
        .bind(client)
        .fetch_one(&app.db)
        .await
        .unwrap();

    let body = json!({"model": MODEL_ATTRIBUTION, "token_ids": [1, 504, 3458, 28, 9], "top_k": 3});
    let r = app
        .post("/v1/logprobs", &key, body.clone())
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

    let rows = teachd::ledger::queries::events_after(&app.db, &Default::default(), 0, 1_000)
        .await
        .unwrap();
    let row = rows
        .iter()
        .find(|r| r.event.request_id == request_id)
        .expect("its row");
    let e = &row.event;
    assert_eq!(e.client_id, client);
    assert_eq!(e.key_id, key_id);
    assert_eq!(
        (e.method.as_str(), e.endpoint.as_str()),
        ("POST", "/v1/logprobs")
    );
    assert_eq!(e.model.as_deref(), Some(MODEL_ATTRIBUTION));
    assert_eq!(
        (e.status, e.prompt_tokens, e.scored_tokens, e.top_k),
        (200, 5, 4, Some(3))
    );
    assert_eq!(
        e.request_sha256.to_vec(),
        Sha256::digest(serde_json::to_vec(&body).unwrap()).to_vec()
    );
    assert_eq!(
        e.response_sha256.to_vec(),
        Sha256::digest(&response_bytes).to_vec()
    );
    assert_eq!(
        e.response_bytes,
        response_bytes.len() as i64,
        "bytes served"
    );
    assert_eq!(e.tos_version.as_deref(), Some("t1"));
    let digest = &app
        .state
        .models
        .get(MODEL_ATTRIBUTION)
        .unwrap()
        .info
        .weights_sha256;
    assert_eq!(e.weights_sha256.as_deref(), Some(digest.as_str()));
    assert!(e.latency_ms > 0.0);

    let report = teachd::ledger::queries::verify(&app.db, Default::default())
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
}

/// Request ids are per client: a reused id is refused for its own client only (and costs
/// nothing), another tenant cannot burn it.
#[tokio::test]
async fn caller_request_ids_are_unique_per_client() {
    let app = TestApp::spawn().await;
    app.publish_tos("t1").await;
    let (a, key_a) = app.teacher("a", json!({})).await;
    let (b, key_b) = app.teacher("b", json!({})).await;
    let get = |key: &str| {
        app.get("/v1/tos", Some(key))
            .header("x-request-id", "shared-id-1")
    };
    let r = get(&key_a).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "shared-id-1");
    // Another tenant using the same id is served (it is its own id space).
    assert_eq!(get(&key_b).send().await.unwrap().status(), 200);
    let r = get(&key_a).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "duplicate_request_id");
    for (client, want) in [(a, 1), (b, 1)] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM usage_events WHERE client_id = $1 AND request_id = 'shared-id-1'",
        )
        .bind(client)
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(n, want);
    }
}

#[tokio::test]
async fn a_streamed_response_is_recorded_with_the_hash_of_every_byte() {
    let app = TestApp::spawn().await;
    app.teacher("acme", json!({})).await; // rows to export
    let r = app
        .admin(reqwest::Method::GET, "/admin/audit/export?format=jsonl")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let bytes = r.bytes().await.unwrap();
    assert!(!bytes.is_empty());
    let (status, hash, served): (i16, Vec<u8>, i64) = sqlx::query_as(
        "SELECT status, response_sha256, response_bytes FROM usage_events WHERE request_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(hash, Sha256::digest(&bytes).to_vec());
    assert_eq!(served, bytes.len() as i64, "bytes served by the stream");
}

#[tokio::test]
async fn opt_in_body_storage_keeps_bodies_but_never_a_key() {
    let app = TestApp::spawn_with(None, |c| c.ledger.store_bodies = true).await;
    app.publish_tos("t1").await;
    let (client, key) = app.teacher("acme", json!({})).await;
    let body =
        json!({"version": "t1", "purpose": "distil", "student_model": "s", "commercial": false});
    let r = app
        .post("/v1/tos/accept", &key, body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let response = r.bytes().await.unwrap();
    let (req, resp): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT request_body, response_body FROM usage_bodies WHERE client_id = $1 AND request_id = $2",
    )
    .bind(client)
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(req, serde_json::to_vec(&body).unwrap());
    assert_eq!(resp, response.to_vec());

    // The response that shows a new key in plaintext is hashed, never stored.
    let r = app
        .admin(
            reqwest::Method::POST,
            &format!("/admin/clients/{client}/keys"),
        )
        .json(&json!({"scopes": ["teacher"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let issued = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let created: serde_json::Value = r.json().await.unwrap();
    let secret = created["key"].as_str().unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_bodies WHERE request_id = $1")
        .bind(&issued)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0, "the key-issuing response is not stored");
    let leaks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_bodies WHERE position($1::bytea in response_body) > 0",
    )
    .bind(secret.as_bytes())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(leaks, 0, "no stored body holds a plaintext key");
    let row: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE request_id = $1")
        .bind(&issued)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(row, 1, "it still has its row");

    // Off by default.
    let plain = TestApp::spawn().await;
    plain
        .admin(reqwest::Method::GET, "/admin/clients")
        .send()
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_bodies")
        .fetch_one(&plain.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
}
