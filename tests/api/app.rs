//! `TestApp`: the real router on 127.0.0.1:0 over a fresh database.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use teachd::config::Config;
use teachd::engine::ModelRegistry;
use teachd::AppState;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Server of the Postgres the tests use; override with `TEACHD_TEST_PG`.
pub fn pg_server() -> String {
    std::env::var("TEACHD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub state: AppState,
    pub db: PgPool,
    pub admin_key: String,
    pub http: reqwest::Client,
    /// The database this app owns; dropped with the app (unless handed on by `restart`).
    db_name: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// Extra routes a test mounts next to the app's (e.g. a slow teacher route).
pub type Extra = Arc<dyn Fn(AppState) -> Router<AppState> + Send + Sync>;

/// Creates a fresh database; returns (url, name).
pub async fn create_database() -> (String, String) {
    let server = pg_server();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{server}/postgres"))
        .await
        .expect("Postgres must run at TEACHD_TEST_PG (default 127.0.0.1:5432)");
    let name = format!("teachd_test_{}", Uuid::new_v4().simple());
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .unwrap();
    admin.close().await;
    (format!("{server}/{name}"), name)
}

/// Drops a test database from a thread of its own: `Drop` cannot await.
fn drop_database(name: String) {
    let dropper = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(admin) = PgPoolOptions::new()
                .max_connections(1)
                .connect(&format!("{}/postgres", pg_server()))
                .await
            {
                let _ = admin
                    .execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
                    .await;
                admin.close().await;
            }
        });
    });
    let _ = dropper.join();
}

pub fn test_config(db_url: &str) -> Config {
    let mut config = Config::load_with_env(None, &[]).unwrap();
    config.database.url = db_url.to_string();
    config.database.max_connections = 8;
    config
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(None, |_| {}).await
    }

    /// A fresh database; `extra` routes; `tweak` edits the config.
    pub async fn spawn_with(extra: Option<Extra>, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let (db_url, db_name) = create_database().await;
        let mut config = test_config(&db_url);
        tweak(&mut config);
        let mut app = Self::start(config, extra).await;
        app.db_name = Some(db_name);
        let (_, key) = teachd::auth::bootstrap_admin(&app.db).await.unwrap();
        app.admin_key = key.expose_secret().to_string();
        app
    }

    /// Stops this server and starts a new one on the same database: in-memory state is gone.
    pub async fn restart(mut self, extra: Option<Extra>) -> TestApp {
        self.stop().await;
        let mut next = Self::start((*self.state.config).clone(), extra).await;
        next.admin_key = std::mem::take(&mut self.admin_key);
        next.db_name = self.db_name.take();
        next
    }

    async fn start(config: Config, extra: Option<Extra>) -> TestApp {
        let state = teachd::build_state_with_models(config, ModelRegistry::empty())
            .await
            .unwrap();
        let mut router = teachd::http::router(state.clone());
        if let Some(extra) = extra {
            router = router.merge(extra(state.clone()).with_state(state.clone()));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestApp {
            addr,
            db: state.db.clone(),
            state,
            admin_key: String::new(),
            http: reqwest::Client::new(),
            db_name: None,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        self.db.close().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let rb = self.http.get(self.url(path));
        match key {
            Some(key) => rb.bearer_auth(key),
            None => rb,
        }
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.admin_key)
    }

    /// Creates a client; returns its id.
    pub async fn create_client(&self, name: &str, limits: Value) -> Uuid {
        let resp = self
            .admin(reqwest::Method::POST, "/admin/clients")
            .json(&json!({"name": name, "contact": "ops@example.com", "limits": limits}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let body: Value = resp.json().await.unwrap();
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Issues a key; returns (key id, key).
    pub async fn issue_key(&self, client: Uuid, scopes: &[&str]) -> (Uuid, String) {
        let resp = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/clients/{client}/keys"),
            )
            .json(&json!({ "scopes": scopes }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let body: Value = resp.json().await.unwrap();
        (
            body["id"].as_str().unwrap().parse().unwrap(),
            body["key"].as_str().unwrap().to_string(),
        )
    }

    /// A client with a teacher key; returns (client id, key).
    pub async fn teacher(&self, name: &str, limits: Value) -> (Uuid, String) {
        let client = self.create_client(name, limits).await;
        let (_, key) = self.issue_key(client, &["teacher"]).await;
        (client, key)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(name) = self.db_name.take() {
            drop_database(name);
        }
    }
}

/// Asserts the OpenAI error envelope and returns `error`.
pub async fn error_of(resp: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "errors are JSON envelopes"
    );
    let body: Value = resp.json().await.unwrap();
    let err = body["error"].clone();
    assert_eq!(err["type"], kind, "{body}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    for leak in ["panicked", "stack backtrace", "sqlx", "at src/"] {
        assert!(!err["message"].as_str().unwrap().contains(leak), "{body}");
    }
    err
}

pub const RATE_LIMIT_HEADERS: [&str; 8] = [
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

pub fn assert_rate_limit_headers(resp: &reqwest::Response) {
    for h in RATE_LIMIT_HEADERS {
        assert!(
            resp.headers().contains_key(h),
            "missing {h}: {:?}",
            resp.headers()
        );
    }
}
