//! Admin API: validation and shapes.

use reqwest::Method;
use serde_json::{json, Value};

use crate::app::{error_of, TestApp};

async fn post_client(app: &TestApp, body: Value) -> reqwest::Response {
    app.admin(Method::POST, "/admin/clients")
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn create_get_list_patch_clients() {
    let app = TestApp::spawn().await;
    let resp = post_client(&app, json!({"name": "acme", "contact": "ml@acme.test", "limits": {"rpm": 5, "daily_tokens": 1000}})).await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["limits"]["rpm"], 5);
    assert_eq!(created["limits"]["daily_tokens"], 1000);
    let defaults = &app.state.config.limits;
    assert_eq!(
        created["limits"]["tpm"], defaults.tpm,
        "unset limits use the defaults"
    );
    assert_eq!(created["overrides"]["tpm"], Value::Null);
    assert_eq!(created["suspended"], false);

    let resp = app
        .admin(Method::GET, "/admin/clients")
        .send()
        .await
        .unwrap();
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == id.as_str()));

    let (key_id, _) = app.issue_key(id.parse().unwrap(), &["teacher"]).await;
    let resp = app
        .admin(Method::GET, &format!("/admin/clients/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let one: Value = resp.json().await.unwrap();
    assert_eq!(one["keys"][0]["id"], key_id.to_string());
    assert!(one["keys"][0].get("key").is_none());
    assert_eq!(one["tokens_today"], 0);

    let resp = app
        .admin(Method::PATCH, &format!("/admin/clients/{id}"))
        .json(&json!({"limits": {"rpm": null, "tpm": 77}, "contact": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let patched: Value = resp.json().await.unwrap();
    assert_eq!(
        patched["limits"]["rpm"], defaults.rpm,
        "null restores the default"
    );
    assert_eq!(patched["limits"]["tpm"], 77);
    assert_eq!(
        patched["limits"]["daily_tokens"], 1000,
        "absent fields are kept"
    );
    assert_eq!(patched["contact"], Value::Null);
    assert_eq!(patched["name"], "acme");
}

#[tokio::test]
async fn invalid_admin_input_is_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({"name": ""}), "name"),
        (json!({"name": "x", "limits": {"rpm": 0}}), "limits.rpm"),
        (json!({"name": "x", "limits": {"tpm": -5}}), "limits.tpm"),
        (
            json!({"name": "x", "limits": {"max_concurrent": 3000000000u64}}),
            "limits.max_concurrent",
        ),
        (
            json!({"name": "x", "limits": {"daily_tokens": 0}}),
            "limits.daily_tokens",
        ),
        (json!({"name": "x", "contact": "c".repeat(400)}), "contact"),
    ];
    for (body, param) in cases {
        let resp = post_client(&app, body.clone()).await;
        let err = error_of(resp, 400, "invalid_request_error").await;
        assert_eq!(err["param"], param, "{body}");
    }
    // Unknown fields and wrong types are refused too, with the field in the message.
    let resp = post_client(&app, json!({"name": "x", "colour": "red"})).await;
    let err = error_of(resp, 400, "invalid_request_error").await;
    assert!(err["message"].as_str().unwrap().contains("colour"), "{err}");
    let resp = post_client(&app, json!({"name": "x", "limits": {"rpm": "ten"}})).await;
    let err = error_of(resp, 400, "invalid_request_error").await;
    assert!(err["message"].as_str().unwrap().contains("rpm"), "{err}");

    // Names are unique.
    assert_eq!(
        post_client(&app, json!({"name": "dup"})).await.status(),
        201
    );
    let err = error_of(
        post_client(&app, json!({"name": "dup"})).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert_eq!(err["param"], "name");

    let client = app.create_client("acme", json!({})).await;
    let keys = format!("/admin/clients/{client}/keys");
    for (body, param) in [
        (json!({"scopes": []}), "scopes"),
        (json!({"scopes": ["root"]}), "scopes"),
        (
            json!({"scopes": ["teacher"], "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
    ] {
        let resp = app
            .admin(Method::POST, &keys)
            .json(&body)
            .send()
            .await
            .unwrap();
        let err = error_of(resp, 400, "invalid_request_error").await;
        assert_eq!(err["param"], param, "{body}");
    }

    let resp = app
        .admin(Method::GET, "/admin/clients/not-a-uuid")
        .send()
        .await
        .unwrap();
    let err = error_of(resp, 400, "invalid_request_error").await;
    assert_eq!(err["param"], "id");
    let missing = uuid::Uuid::new_v4();
    let resp = app
        .admin(Method::GET, &format!("/admin/clients/{missing}"))
        .send()
        .await
        .unwrap();
    error_of(resp, 404, "not_found_error").await;
    let resp = app
        .admin(Method::POST, &format!("/admin/clients/{missing}/keys"))
        .json(&json!({"scopes": ["teacher"]}))
        .send()
        .await
        .unwrap();
    error_of(resp, 404, "not_found_error").await;
    let resp = app
        .admin(Method::DELETE, &format!("/admin/keys/{missing}"))
        .send()
        .await
        .unwrap();
    error_of(resp, 404, "not_found_error").await;
    let resp = app
        .admin(Method::PATCH, &format!("/admin/clients/{client}"))
        .json(&json!({"suspended": "yes"}))
        .send()
        .await
        .unwrap();
    error_of(resp, 400, "invalid_request_error").await;
}

/// The store functions the admin console calls: pages of clients, limits, suspension and keys,
/// each seen by the very next request.
#[tokio::test]
async fn store_pages_clients_and_manages_their_keys() {
    use teachd::store::{self, LimitsPatch, NewClient, NewKey, NewLimits, Page, Scope, StoreError};
    let app = TestApp::spawn().await;
    let mut made = Vec::new();
    for name in ["page-one", "page-two", "page-three"] {
        let new = NewClient {
            name: name.into(),
            contact: None,
            limits: NewLimits::default(),
        };
        made.push(store::create_client(&app.db, &new).await.unwrap().id);
    }
    let all = store::list_clients(&app.db, Page::ALL).await.unwrap();
    assert_eq!(all.next, None);
    let ids: Vec<_> = all.clients.iter().map(|c| c.id).collect();
    assert!(ids.ends_with(&made), "oldest first: {ids:?}");
    for size in [1, 2, 3, 4, 5] {
        let (mut walked, mut after) = (Vec::new(), None);
        loop {
            let page = store::list_clients(
                &app.db,
                Page {
                    after,
                    limit: Some(size),
                },
            )
            .await
            .unwrap();
            assert!(page.clients.len() <= size as usize);
            walked.extend(page.clients.iter().map(|c| c.id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(walked, ids, "pages of {size} walk the whole list once");
    }

    let client = made[0];
    let set_rpm = |rpm| LimitsPatch {
        rpm: Some(rpm),
        ..LimitsPatch::default()
    };
    let changed = store::update_limits(&app.db, client, &set_rpm(Some(9)))
        .await
        .unwrap();
    assert_eq!(changed.overrides.rpm, Some(9));
    assert_eq!(changed.limits(app.state.auth.defaults()).rpm, 9);
    let refused = store::update_limits(&app.db, client, &set_rpm(Some(0))).await;
    assert!(
        matches!(refused, Err(StoreError::Invalid { ref param, .. }) if param == "limits.rpm"),
        "{refused:?}"
    );

    let new_key = NewKey {
        scopes: vec![Scope::Teacher, Scope::Teacher],
        expires_at: None,
    };
    let (key, secret) = store::issue_key(&app.db, client, &new_key).await.unwrap();
    assert_eq!(key.scopes, vec![Scope::Teacher]);
    let status = |app: &TestApp| {
        let req = app.get("/v1/models", Some(secret.expose_secret()));
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(status(&app).await, 200);
    assert!(
        store::set_suspended(&app.db, client, true)
            .await
            .unwrap()
            .suspended
    );
    assert_eq!(status(&app).await, 403, "suspended at the next request");
    store::set_suspended(&app.db, client, false).await.unwrap();
    assert_eq!(status(&app).await, 200, "resumed at the next request");

    let detail = store::client_detail(&app.db, client).await.unwrap();
    assert_eq!(detail.client.id, client);
    assert_eq!(
        detail.keys.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![key.id]
    );
    let revoked = store::revoke_key(&app.db, key.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(status(&app).await, 401, "revoked at the next request");

    let nobody = uuid::Uuid::now_v7();
    assert!(matches!(
        store::issue_key(&app.db, nobody, &new_key).await,
        Err(StoreError::NoSuchClient(id)) if id == nobody
    ));
    assert!(matches!(
        store::revoke_key(&app.db, nobody).await,
        Err(StoreError::NoSuchKey(_))
    ));
}
