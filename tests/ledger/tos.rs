use uuid::Uuid;

use crate::helpers::spawn_app;

async fn teacher(app: &crate::helpers::TestApp, client: Uuid, model: &str) -> reqwest::Response {
    app.post(
        client,
        &format!("/v1/test/teacher/{model}"),
        serde_json::json!({"tokens": 4}),
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
    let app = spawn_app().await;
    let (admin, client) = (Uuid::new_v4(), Uuid::new_v4());

    // Nothing published: nothing can have been accepted.
    let r = teacher(&app, client, "open").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "tos_not_accepted");
    assert_eq!(
        app.get(client, "/v1/tos").send().await.unwrap().status(),
        404
    );

    app.publish_tos(admin, "v1").await;
    let tos: serde_json::Value = app
        .get(client, "/v1/tos")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tos["version"], "v1");
    assert_eq!(tos["text"], "Be nice.");
    assert!(tos["published_at"].is_string());

    let r = teacher(&app, client, "open").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "tos_not_accepted");

    // Accepting a version that is not current is refused.
    let r = app
        .post(
            client,
            "/v1/tos/accept",
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
            client,
            "/v1/tos/accept",
            serde_json::json!({"version": "v1", "purpose": "p",
            "student_model": "s", "commercial": false, "extra": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = app
        .post(
            client,
            "/v1/tos/accept",
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

    assert_eq!(teacher(&app, client, "open").await.status(), 200);
    // Another client has not accepted.
    assert_eq!(teacher(&app, Uuid::new_v4(), "open").await.status(), 403);

    // A new version must be accepted again.
    app.publish_tos(admin, "v2").await;
    let r = teacher(&app, client, "open").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "tos_not_accepted");
    app.accept_tos(client, "v2", false).await;
    assert_eq!(teacher(&app, client, "open").await.status(), 200);

    // Republishing a version is refused.
    let r = app
        .post(
            admin,
            "/admin/tos",
            serde_json::json!({"version": "v2", "text": "again"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "tos_version_exists");

    // The ledger rows carry the ToS version in force and the refusal codes.
    let rows: Vec<(Option<String>, i16, Option<String>)> = sqlx::query_as(
        "SELECT tos_version, status, error_code FROM usage_events
         WHERE client_id = $1 AND endpoint = '/v1/test/teacher/{model}' ORDER BY id",
    )
    .bind(client)
    .fetch_all(&app.state.db)
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
    let app = spawn_app().await;
    let admin = Uuid::new_v4();
    let (hobbyist, company) = (Uuid::new_v4(), Uuid::new_v4());
    app.publish_tos(admin, "v1").await;
    app.accept_tos(hobbyist, "v1", false).await;
    app.accept_tos(company, "v1", true).await;

    for client in [hobbyist, company] {
        let r = teacher(&app, client, "open").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-teacher-model"], "open");
        assert_eq!(r.headers()["x-teacher-weights-sha256"].len(), 64);
        assert!(r.headers().get("x-teacher-attribution").is_none());

        let r = teacher(&app, client, "llama").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-teacher-attribution"], "Built with Llama");
        assert_eq!(r.headers()["x-teacher-model"], "llama");

        let r = teacher(&app, client, "closed").await;
        assert_eq!(r.status(), 403);
        assert_eq!(error_code(r).await, "licence_forbids");
    }
    assert_eq!(teacher(&app, hobbyist, "research").await.status(), 200);
    let r = teacher(&app, company, "research").await;
    assert_eq!(r.status(), 403);
    assert!(
        r.headers().get("x-teacher-model").is_none(),
        "no provenance on a refusal"
    );
    assert_eq!(error_code(r).await, "licence_forbids");

    // A company that re-accepts declaring non-commercial use may use it.
    app.accept_tos(company, "v1", false).await;
    assert_eq!(teacher(&app, company, "research").await.status(), 200);
}
