//! The admin console (issue 15), server side: sign-in, sessions, CSRF, every page with data,
//! actions that take effect and are ledgered like the admin API's, and pages that reference no
//! other host.

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::app::TestApp;

/// A browser-like client that follows no redirects (the tests check each one).
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A signed-in console session: its cookie and CSRF token.
pub struct Console<'a> {
    pub app: &'a TestApp,
    pub http: reqwest::Client,
    pub cookie: String,
    pub csrf: String,
}

pub async fn sign_in_with(app: &TestApp, key: &str) -> reqwest::Response {
    browser()
        .post(app.url("/console/login"))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap()
}

/// The value of `name="csrf"` in a page.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token");
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

impl<'a> Console<'a> {
    pub async fn sign_in(app: &'a TestApp) -> Console<'a> {
        let r = sign_in_with(app, &app.admin_key).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[LOCATION], "/console");
        let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        let mut console = Console {
            app,
            http: browser(),
            cookie,
            csrf: String::new(),
        };
        let (status, html) = console.get("/console/clients").await;
        assert_eq!(status, 200, "{html}");
        console.csrf = csrf_of(&html);
        console
    }

    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(self.app.url(path))
            .header(COOKIE, &self.cookie)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// Posts a form with the session's CSRF token added.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        let mut form: Vec<(&str, &str)> = vec![("csrf", &self.csrf)];
        form.extend_from_slice(fields);
        self.post_raw(path, &form).await
    }

    pub async fn post_raw(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(self.app.url(path))
            .header(COOKIE, &self.cookie)
            .form(form)
            .send()
            .await
            .unwrap()
    }
}

async fn admin_key_id(app: &TestApp) -> Uuid {
    sqlx::query_scalar("SELECT id FROM api_keys WHERE client_id = $1 ORDER BY created_at DESC")
        .bind(teachd::auth::BOOTSTRAP_ADMIN_ID)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_and_wrong_keys_are_refused() {
    let app = TestApp::spawn().await;
    // Not signed in: pages send the browser to the sign-in form.
    let r = browser().get(app.url("/console")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/console/login");
    let r = browser()
        .get(app.url("/console/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("name=\"key\""));

    // Wrong keys: a malformed one, a well-formed unknown one, a teacher key.
    let (_, teacher_key) = app.teacher("lab", json!({})).await;
    let unknown = teachd::auth::ApiKey::generate();
    for (key, status) in [
        ("tk_nope", 401),
        (unknown.expose_secret(), 401),
        (teacher_key.as_str(), 403),
    ] {
        let r = sign_in_with(&app, key).await;
        assert_eq!(r.status().as_u16(), status, "{key}");
        assert!(r.headers().get(SET_COOKIE).is_none());
        assert!(r.text().await.unwrap().contains("id=\"login-error\""));
    }
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM console_sessions")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(sessions, 0);

    let r = sign_in_with(&app, &app.admin_key).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    // Behind a TLS proxy the cookie is Secure.
    let r = browser()
        .post(app.url("/console/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("key", app.admin_key.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("; Secure"));

    // The sign-in is a ledger row of the admin's key, without the key in its body hash.
    let (status, req_hash): (i16, Vec<u8>) = sqlx::query_as(
        "SELECT status, request_sha256 FROM usage_events WHERE endpoint = '/console/login'
         ORDER BY id LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(status, 303);
    assert_eq!(
        req_hash,
        <sha2::Sha256 as sha2::Digest>::digest(b"").to_vec()
    );
    // The token is stored only as a hash.
    let token = cookie.split(';').next().unwrap().split('=').nth(1).unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM console_sessions WHERE encode(token_hash, 'hex') = $1 OR csrf_token = $1",
    )
    .bind(token)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn expired_signed_out_and_revoked_sessions_end() {
    let app = TestApp::spawn().await;
    let console = Console::sign_in(&app).await;
    assert_eq!(console.get("/console").await.0, 200);
    sqlx::query("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(console.get("/console").await.0, StatusCode::SEE_OTHER);
    let r = console
        .post("/console/tos", &[("version", "x"), ("text", "y")])
        .await;
    assert_eq!(r.status(), 401);

    // Sign-out deletes the session server-side: the old cookie is dead even if replayed.
    let console = Console::sign_in(&app).await;
    let r = console.post("/console/logout", &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM console_sessions WHERE expires_at > now()")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(live, 0);
    assert_eq!(console.get("/console").await.0, StatusCode::SEE_OTHER);

    // A session dies with its key.
    let (key_id, key) = app
        .issue_key(teachd::auth::BOOTSTRAP_ADMIN_ID, &["admin"])
        .await;
    let r = sign_in_with(&app, &key).await;
    let cookie = r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let get = |cookie: String| {
        let url = app.url("/console");
        async move {
            browser()
                .get(url)
                .header(COOKIE, cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get(cookie.clone()).await, 200);
    let r = app
        .admin(Method::DELETE, &format!("/admin/keys/{key_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(cookie).await, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn forms_without_the_sessions_csrf_token_are_refused() {
    let app = TestApp::spawn().await;
    let (client, _) = app.teacher("lab", json!({})).await;
    let console = Console::sign_in(&app).await;
    let path = format!("/console/clients/{client}/suspension");
    let r = console
        .post_raw(&path, &[("csrf", "0000"), ("suspended", "true")])
        .await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("CSRF"));
    let r = console.post_raw(&path, &[("suspended", "true")]).await;
    assert!(r.status().is_client_error(), "{}", r.status());
    // Another session's token does not do either.
    let other = Console::sign_in(&app).await;
    assert_ne!(other.csrf, console.csrf);
    let r = console
        .post_raw(&path, &[("csrf", &other.csrf), ("suspended", "true")])
        .await;
    assert_eq!(r.status(), 403);
    let suspended: bool = sqlx::query_scalar("SELECT suspended FROM clients WHERE id = $1")
        .bind(client)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!suspended);
    // The refused attempts are in the ledger, as the admin's.
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE endpoint = '/console/clients/{id}/suspension'
         AND status = 403 AND key_id = $1",
    )
    .bind(admin_key_id(&app).await)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(refused, 2);
}

#[tokio::test]
async fn a_suspend_from_the_console_takes_effect_on_the_next_call_and_is_ledgered() {
    let app = TestApp::spawn().await;
    let (client, key) = app.teacher("lab", json!({})).await;
    let models = || app.get("/v1/models", Some(&key)).send();
    assert_eq!(models().await.unwrap().status(), 200);
    let console = Console::sign_in(&app).await;
    let path = format!("/console/clients/{client}/suspension");
    let r = console.post(&path, &[("suspended", "true")]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], format!("/console/clients/{client}"));
    let r = models().await.unwrap();
    let err = crate::app::error_of(r, 403, "permission_error").await;
    assert_eq!(err["code"], "client_suspended");
    let (status, key_id, client_id): (i16, Uuid, Uuid) = sqlx::query_as(
        "SELECT status, key_id, client_id FROM usage_events
         WHERE endpoint = '/console/clients/{id}/suspension' AND method = 'POST'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(status, 303);
    assert_eq!(key_id, admin_key_id(&app).await);
    assert_eq!(client_id, teachd::auth::BOOTSTRAP_ADMIN_ID);
    let (_, html) = console.get(&format!("/console/clients/{client}")).await;
    assert!(html.contains("id=\"resume\""));

    let r = console.post(&path, &[("suspended", "false")]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(models().await.unwrap().status(), 200);
}

#[tokio::test]
async fn keys_issued_in_the_console_are_shown_once_and_revocable_and_limits_edit() {
    let app = TestApp::spawn().await;
    let client = app.create_client("lab", json!({})).await;
    let console = Console::sign_in(&app).await;
    let r = console
        .post(
            &format!("/console/clients/{client}/keys"),
            &[("teacher", "on")],
        )
        .await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    let at = html.find("<code>tk_").expect("the new key on the page") + "<code>".len();
    let key = html[at..at + teachd::store::apikey::KEY_LEN].to_string();
    assert_eq!(
        app.get("/v1/models", Some(&key))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Shown once: the client page does not show it again.
    let (_, page) = console.get(&format!("/console/clients/{client}")).await;
    assert!(!page.contains(&key));
    let key_id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE client_id = $1")
        .bind(client)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let r = console
        .post(&format!("/console/keys/{key_id}/revoke"), &[])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        app.get("/v1/models", Some(&key))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // Limits: numbers override, blanks go back to the default, bad input is the API's 400.
    let limits = format!("/console/clients/{client}/limits");
    let fields = [
        ("rpm", "7"),
        ("tpm", ""),
        ("max_concurrent", "2"),
        ("daily_tokens", ""),
    ];
    assert_eq!(
        console.post(&limits, &fields).await.status(),
        StatusCode::SEE_OTHER
    );
    let view: serde_json::Value = app
        .admin(Method::GET, &format!("/admin/clients/{client}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["overrides"]["rpm"], 7);
    assert_eq!(view["overrides"]["max_concurrent"], 2);
    assert!(view["overrides"]["tpm"].is_null());
    let bad = [
        ("rpm", "0"),
        ("tpm", ""),
        ("max_concurrent", ""),
        ("daily_tokens", ""),
    ];
    let r = console.post(&limits, &bad).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("limits.rpm"));
}
