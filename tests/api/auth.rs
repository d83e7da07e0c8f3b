//! Keys: lifecycle, refusals, scopes, suspension, storage.

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::app::{assert_rate_limit_headers, error_of, TestApp};

#[tokio::test]
async fn key_lifecycle_issue_use_revoke() {
    let app = TestApp::spawn().await;
    let client = app.create_client("acme", json!({})).await;
    let (key_id, key) = app.issue_key(client, &["teacher"]).await;
    assert!(key.starts_with("tk_"));

    let resp = app.get("/v1/models", Some(&key)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_rate_limit_headers(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "list");

    let resp = app
        .admin(Method::DELETE, &format!("/admin/keys/{key_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let revoked: Value = resp.json().await.unwrap();
    assert!(revoked["revoked_at"].is_string());
    assert!(
        revoked.get("key").is_none(),
        "a revoked key's view has no secret"
    );

    let resp = app.get("/v1/models", Some(&key)).send().await.unwrap();
    let err = error_of(resp, 401, "authentication_error").await;
    assert!(err["message"].as_str().unwrap().contains("revoked"));

    // Other keys of the client keep working.
    let (_, other) = app.issue_key(client, &["teacher"]).await;
    let resp = app.get("/v1/models", Some(&other)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn missing_garbled_unknown_and_expired_keys_get_401() {
    let app = TestApp::spawn().await;
    let (client, key) = app.teacher("acme", json!({})).await;

    let resp = app.get("/v1/models", None).send().await.unwrap();
    error_of(resp, 401, "authentication_error").await;

    let resp = app
        .http
        .get(app.url("/v1/models"))
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    error_of(resp, 401, "authentication_error").await;

    // One character changed: the checksum refuses it.
    let mut garbled = key.clone();
    let c = if &key[10..11] == "A" { "B" } else { "A" };
    garbled.replace_range(10..11, c);
    let resp = app.get("/v1/models", Some(&garbled)).send().await.unwrap();
    let err = error_of(resp, 401, "authentication_error").await;
    assert!(
        !err.to_string().contains(&garbled[3..]),
        "the key is not echoed"
    );

    // Well-formed but never issued.
    let unknown = teachd::auth::ApiKey::generate();
    let resp = app
        .get("/v1/models", Some(unknown.expose_secret()))
        .send()
        .await
        .unwrap();
    error_of(resp, 401, "authentication_error").await;

    sqlx::query(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE client_id = $1",
    )
    .bind(client)
    .execute(&app.db)
    .await
    .unwrap();
    let resp = app.get("/v1/models", Some(&key)).send().await.unwrap();
    let err = error_of(resp, 401, "authentication_error").await;
    assert!(err["message"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn suspension_takes_effect_on_the_next_request() {
    let app = TestApp::spawn().await;
    let (client, key) = app.teacher("acme", json!({})).await;
    assert_eq!(
        app.get("/v1/models", Some(&key))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let patch = |suspended: bool| {
        app.admin(Method::PATCH, &format!("/admin/clients/{client}"))
            .json(&json!({ "suspended": suspended }))
            .send()
    };
    let resp = patch(true).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["suspended"], true);

    let resp = app.get("/v1/models", Some(&key)).send().await.unwrap();
    let err = error_of(resp, 403, "permission_error").await;
    assert_eq!(err["code"], "client_suspended");

    assert_eq!(patch(false).await.unwrap().status(), 200);
    assert_eq!(
        app.get("/v1/models", Some(&key))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn scopes_are_enforced() {
    let app = TestApp::spawn().await;
    let (_, teacher_key) = app.teacher("acme", json!({})).await;

    let resp = app
        .get("/admin/clients", Some(&teacher_key))
        .send()
        .await
        .unwrap();
    let err = error_of(resp, 403, "permission_error").await;
    assert_eq!(err["code"], "insufficient_scope");

    let resp = app
        .get("/v1/models", Some(&app.admin_key))
        .send()
        .await
        .unwrap();
    let err = error_of(resp, 403, "permission_error").await;
    assert_eq!(err["code"], "insufficient_scope");

    let resp = app.get("/admin/clients", None).send().await.unwrap();
    error_of(resp, 401, "authentication_error").await;

    // Open endpoints need no key.
    assert_eq!(
        app.get("/healthz", None).send().await.unwrap().status(),
        200
    );
    assert_ne!(app.get("/readyz", None).send().await.unwrap().status(), 401);

    // A key with both scopes reaches both.
    let client = app.create_client("both", json!({})).await;
    let (_, both) = app.issue_key(client, &["teacher", "admin"]).await;
    assert_eq!(
        app.get("/v1/models", Some(&both))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.get("/admin/clients", Some(&both))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn no_plaintext_key_in_the_database() {
    let app = TestApp::spawn().await;
    let (_, key) = app.teacher("acme", json!({})).await;
    let secret_part = &key[12..]; // beyond the stored display prefix
    let rows: Vec<(String,)> = sqlx::query_as("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "the bootstrap admin key and the teacher key");
    for (row,) in &rows {
        assert!(!row.contains(&key), "{row}");
        assert!(!row.contains(secret_part), "{row}");
        assert!(!row.contains(&app.admin_key[12..]), "{row}");
    }
    let hash = Sha256::digest(key.as_bytes()).to_vec();
    let (prefix, stored): (String, Vec<u8>) =
        sqlx::query_as("SELECT prefix, key_hash FROM api_keys WHERE key_hash = $1")
            .bind(&hash)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored, hash);
    assert!(key.starts_with(&prefix) && prefix.len() < 12);
}

#[tokio::test]
async fn bootstrap_keys_are_admin_keys() {
    let app = TestApp::spawn().await;
    let (record, key) = teachd::auth::bootstrap_admin(&app.db).await.unwrap();
    assert_eq!(record.scopes, vec![teachd::auth::Scope::Admin]);
    let resp = app
        .get("/admin/clients", Some(key.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let list: Value = resp.json().await.unwrap();
    let admins = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == teachd::auth::BOOTSTRAP_ADMIN_ID.to_string())
        .count();
    assert_eq!(admins, 1, "a second bootstrap reuses the admin client");
}

/// `teachd admin bootstrap` always yields a working admin key: neither a tenant named `admin`
/// nor a suspended admin client can break it, and a tenant is never given admin.
#[tokio::test]
async fn bootstrap_survives_a_tenant_named_admin_and_a_suspended_admin_client() {
    let app = TestApp::spawn().await;
    let tenant = app.create_client("admin", json!({})).await;
    // The admin suspends the admin client (by mistake, or an attacker with an admin key).
    let resp = app
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/clients/{}", teachd::auth::BOOTSTRAP_ADMIN_ID),
        )
        .json(&json!({"suspended": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .admin(reqwest::Method::GET, "/admin/clients")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        403,
        "the suspended admin client's keys stop working"
    );

    let (record, key) = teachd::auth::bootstrap_admin(&app.db).await.unwrap();
    assert_eq!(record.client_id, teachd::auth::BOOTSTRAP_ADMIN_ID);
    assert_ne!(record.client_id, tenant);
    let resp = app
        .get("/admin/clients", Some(key.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "bootstrap yields a working key");
    let keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE client_id = ANY($1) AND 'admin' = ANY(scopes)",
    )
    .bind(vec![tenant])
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(keys, 0, "no tenant was given an admin key");
}

#[tokio::test]
async fn disable_auth_runs_teacher_requests_as_anonymous() {
    let app = TestApp::spawn_with(None, |c| c.server.disable_auth = true).await;
    let resp = app.get("/v1/models", None).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_rate_limit_headers(&resp);
    // Admin routes still need an admin key.
    let resp = app.get("/admin/clients", None).send().await.unwrap();
    error_of(resp, 401, "authentication_error").await;
}
