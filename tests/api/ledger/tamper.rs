use crate::app::{superuser, TestApp};

/// An app with `n >= 2` ledger rows (ids 1..=n): creating a client and its key, then 404s of
/// `GET /v1/tos` (nothing published).
async fn app_with_rows(n: usize) -> TestApp {
    let app = TestApp::spawn().await;
    let (_, key) = app.teacher("acme", serde_json::json!({})).await;
    for _ in 2..n {
        assert_eq!(
            app.get("/v1/tos", Some(&key))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
    assert_eq!(app.row_count().await, n as i64);
    app
}

async fn verify_http(app: &TestApp) -> serde_json::Value {
    let r = app
        .admin(reqwest::Method::GET, "/admin/audit/verify")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `teachd audit verify` against the app's database: (exit code, JSON report).
fn verify_cli(app: &TestApp, args: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teachd"))
        .args(["audit", "verify"])
        .args(args)
        .env(
            "TEACHD__DATABASE__URL",
            format!("{}/{}", crate::app::pg_server(), app.db_name),
        )
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|_| panic!("stdout: {stdout}"));
    (out.status.code().unwrap(), json)
}

/// Run `sql` as a superuser with the append-only triggers disabled, as an attacker with full
/// database access would.
async fn tamper(app: &TestApp, sql: &str) {
    let mut su = superuser(&app.db_name).await;
    sqlx::raw_sql(&format!(
        "ALTER TABLE usage_events DISABLE TRIGGER USER; {sql}; ALTER TABLE usage_events ENABLE TRIGGER USER;"
    ))
    .execute(&mut su)
    .await
    .unwrap();
}

#[tokio::test]
async fn an_intact_ledger_verifies_over_http_and_cli() {
    let app = app_with_rows(6).await;
    let report = verify_http(&app).await;
    assert_eq!(
        report,
        serde_json::json!({"ok": true, "rows_checked": 6, "first_bad_event_id": null})
    );
    let (code, report) = verify_cli(&app, &[]);
    assert_eq!(code, 0);
    assert_eq!(report["ok"], true);
    // The verify request itself is row 7.
    assert_eq!(report["rows_checked"], 7);
    let (code, report) = verify_cli(&app, &["--from", "2000-01-01", "--to", "2999-01-01"]);
    assert_eq!((code, report["ok"].clone()), (0, serde_json::json!(true)));
}

#[tokio::test]
async fn an_edited_field_is_named() {
    let app = app_with_rows(10).await;
    tamper(&app, "UPDATE usage_events SET status = 200 WHERE id = 5").await;
    let report = verify_http(&app).await;
    assert_eq!(report["ok"], false);
    assert_eq!(report["first_bad_event_id"], 5);
    let (code, report) = verify_cli(&app, &[]);
    assert_eq!(code, 1);
    assert_eq!(report["first_bad_event_id"], 5);
}

#[tokio::test]
async fn a_deleted_row_is_named_by_its_successor() {
    let app = app_with_rows(10).await;
    tamper(&app, "DELETE FROM usage_events WHERE id = 4").await;
    let report = verify_http(&app).await;
    assert_eq!(report["ok"], false);
    assert_eq!(report["first_bad_event_id"], 5);
    let (code, report) = verify_cli(&app, &[]);
    assert_eq!(
        (code, report["first_bad_event_id"].clone()),
        (1, serde_json::json!(5))
    );
}

#[tokio::test]
async fn swapped_rows_are_named() {
    let app = app_with_rows(10).await;
    // Swap the positions of rows 6 and 7 (ids exchanged, contents and hashes kept).
    tamper(
        &app,
        "UPDATE usage_events SET id = id + 1000000 WHERE id IN (6, 7);
         UPDATE usage_events SET id = CASE id WHEN 1000006 THEN 7 ELSE 6 END WHERE id > 1000000",
    )
    .await;
    let report = verify_http(&app).await;
    assert_eq!(report["ok"], false);
    assert_eq!(report["first_bad_event_id"], 6);
    let (code, report) = verify_cli(&app, &[]);
    assert_eq!(
        (code, report["first_bad_event_id"].clone()),
        (1, serde_json::json!(6))
    );
}

#[tokio::test]
async fn the_app_role_cannot_change_the_ledger_and_the_owner_is_stopped_by_the_trigger() {
    let app = app_with_rows(3).await;
    let mut conn = superuser(&app.db_name).await;
    sqlx::query("SET ROLE teachd_app")
        .execute(&mut conn)
        .await
        .unwrap();
    // It may read and append...
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 3);
    // ...but not change anything.
    for sql in [
        "UPDATE usage_events SET status = 200 WHERE id = 1",
        "DELETE FROM usage_events WHERE id = 1",
        "TRUNCATE usage_events",
        "UPDATE tos_acceptances SET commercial = false",
        "DELETE FROM tos_versions",
        "DELETE FROM usage_bodies",
        "UPDATE ledger_tree SET hash = hash",
        "DELETE FROM ledger_tree",
        "TRUNCATE ledger_tree",
        "DELETE FROM ledger_checkpoints",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
    // Nor disable the append-only triggers: only the owner may alter the tables.
    for table in [
        "usage_events",
        "usage_bodies",
        "ledger_tree",
        "ledger_checkpoints",
    ] {
        let sql = format!("ALTER TABLE {table} DISABLE TRIGGER USER");
        let err = sqlx::query(&sql).execute(&mut conn).await.unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
        assert!(err.to_string().contains("must be owner"), "{sql}: {err}");
    }
    sqlx::query("RESET ROLE").execute(&mut conn).await.unwrap();
    // Even a superuser is refused while the triggers are on.
    for sql in [
        "UPDATE usage_events SET status = 200 WHERE id = 1",
        "DELETE FROM usage_events WHERE id = 1",
        "TRUNCATE usage_events",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(app.row_count().await, 3);
    assert_eq!(verify_http(&app).await["ok"], true);
}
