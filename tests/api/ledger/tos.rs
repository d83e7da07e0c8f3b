use serde_json::json;

use crate::app::{TestApp, MODEL, MODEL_ATTRIBUTION, MODEL_NON_COMMERCIAL, MODEL_PROHIBITED};

/// A cheap teacher call that goes through the ToS and licence checks.
async fn teacher(app: &TestApp, key: &str, model: &str) -> reqwest::Response {
    app.post(
        "/v1/tokenize",
        key,
        json!({"model": model, "prompt": "hello"}),
    )
    .send()
    .await
    .unwrap()
}

async fn error_code(r: reqwest::Response) -> String {
    let body: serde_json::Value = r.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn teacher_endpoints_need_the_current_tos_accepted() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.teacher("acme", json!({})).await;
    let (_, other) = app.teacher("other", json!({})).await;

    // Nothing published: nothing can have been accepted.
    let r = teacher(&app, &key, MODEL).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "tos_not_accepted");
    assert_eq!(
        app.get("/v1/tos", Some(&key))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    app.publish_tos("v1").await;
    let tos: serde_json::Value = app
        .get("/v1/tos", Some(&key))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tos["version"], "v1");
    assert_eq!(tos["text"], "Distil responsibly.");
    assert!(tos["published_at"].is_string());

    let r = teacher(&app, &key, MODEL).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "tos_not_accepted");

    // Accepting a version that is not current is refused.
    let r = app
        .post(
            "/v1/tos/accept",
            &key,
            serde_json::json!({"version": "v0", "purpose": "p",
            "student_model": "s", "commercial": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "tos_version_not_current");
    // Unknown fields are refused.
    let r = app
        .post(
            "/v1/tos/accept",
            &key,
            serde_json::json!({"version": "v1", "purpose": "p",
            "student_model": "s", "commercial": false, "extra": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = app
        .post(
            "/v1/tos/accept",
            &key,
            serde_json::json!({"version": "v1", "purpose": "distil",
            "student_model": "tiny", "commercial": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let acc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(acc["version"], "v1");
    assert_eq!(acc["client_id"], client.to_string());
    assert_eq!(acc["commercial"], false);
    assert_eq!(acc["student_model"], "tiny");

    assert_eq!(teacher(&app, &key, MODEL).await.status(), 200);
    // Another client has not accepted.
    assert_eq!(teacher(&app, &other, MODEL).await.status(), 403);

    // A new version must be accepted again.
    app.publish_tos("v2").await;
    let r = teacher(&app, &key, MODEL).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "tos_not_accepted");
    app.accept_tos(&key, "v2", false).await;
    assert_eq!(teacher(&app, &key, MODEL).await.status(), 200);

    // Republishing a version is refused.
    let r = app
        .admin(reqwest::Method::POST, "/admin/tos")
        .json(&serde_json::json!({"version": "v2", "text": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "tos_version_exists");

    // The ledger rows carry the ToS version in force and the refusal codes.
    let rows: Vec<(Option<String>, i16, Option<String>)> = sqlx::query_as(
        "SELECT tos_version, status, error_code FROM usage_events
         WHERE client_id = $1 AND endpoint = '/v1/tokenize' ORDER BY id",
    )
    .bind(client)
    .fetch_all(&app.db)
    .await
    .unwrap();
    let got: Vec<(Option<&str>, i16, Option<&str>)> = rows
        .iter()
        .map(|(v, s, c)| (v.as_deref(), *s, c.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (None, 403, Some("tos_not_accepted")),
            (Some("v1"), 403, Some("tos_not_accepted")),
            (Some("v1"), 200, None),
            (Some("v2"), 403, Some("tos_not_accepted")),
            (Some("v2"), 200, None),
        ]
    );
}

#[tokio::test]
async fn licence_policies_and_provenance_headers() {
    let app = TestApp::with_model(|_| {}).await;
    app.publish_tos("v1").await;
    let (_, hobbyist) = app.teacher("hobbyist", json!({})).await;
    let (_, company) = app.teacher("company", json!({})).await;
    app.accept_tos(&hobbyist, "v1", false).await;
    app.accept_tos(&company, "v1", true).await;

    for key in [&hobbyist, &company] {
        let r = teacher(&app, key, MODEL).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-teacher-model"], MODEL);
        assert_eq!(r.headers()["x-teacher-weights-sha256"].len(), 64);
        assert!(r.headers().get("x-teacher-attribution").is_none());

        let r = teacher(&app, key, MODEL_ATTRIBUTION).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-teacher-attribution"], "Built with SmolLM2");
        assert_eq!(r.headers()["x-teacher-model"], MODEL_ATTRIBUTION);

        let r = teacher(&app, key, MODEL_PROHIBITED).await;
        assert_eq!(r.status(), 403);
        assert_eq!(error_code(r).await, "licence_forbids");
    }
    assert_eq!(
        teacher(&app, &hobbyist, MODEL_NON_COMMERCIAL)
            .await
            .status(),
        200
    );
    let r = teacher(&app, &company, MODEL_NON_COMMERCIAL).await;
    assert_eq!(r.status(), 403);
    assert!(
        r.headers().get("x-teacher-model").is_none(),
        "no provenance on a refusal"
    );
    assert_eq!(error_code(r).await, "licence_forbids");

    // A company that re-accepts declaring non-commercial use may use it.
    app.accept_tos(&company, "v1", false).await;
    assert_eq!(
        teacher(&app, &company, MODEL_NON_COMMERCIAL).await.status(),
        200
    );
}
