//! The one harness: `TestApp` is the real server (`teachd::serve`: the real router, gate, keys,
//! ledger, serve loop and shutdown drain) on 127.0.0.1:0 over a fresh database, optionally
//! serving the real default model. Every server runs on one long-lived runtime thread shared by
//! the whole test binary, so the engine's tasks never belong to a test's runtime that ends
//! (a dropped engine receiver would kill the engine for every test). The models are loaded
//! once, on that runtime, and shared by every app that asks for them.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

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

/// The default model and three more ids over the same weights with the other licence
/// policies (for the ToS and licence tests).
pub const MODEL: &str = "smollm2-135m-instruct";
pub const MODEL_ATTRIBUTION: &str = "smollm2-attribution";
pub const MODEL_NON_COMMERCIAL: &str = "smollm2-research";
pub const MODEL_PROHIBITED: &str = "smollm2-closed";

/// The runtime every test server runs on.
pub fn server_runtime() -> &'static tokio::runtime::Handle {
    static RT: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv().unwrap()
    })
}

/// Run `fut` on the server runtime.
pub async fn on_server<F, T>(fut: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    server_runtime().spawn(fut).await.unwrap()
}

/// The default teacher GGUF: `TEACHD_TEST_MODEL`, else fetched into the cache by the script.
pub fn model_path() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("TEACHD_TEST_MODEL") {
        return p.into();
    }
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "fetch-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// The `[[models]]` of a test server that serves the model.
fn models_toml() -> String {
    let path = model_path();
    let model = |id: &str, licence: &str| {
        format!(
            "[[models]]\nid = \"{id}\"\nsource = {{ kind = \"gguf\", path = \"{}\" }}\nlicence = {licence}\nmax_top_k = 49152\n",
            path.display()
        )
    };
    [
        model(MODEL, r#"{ id = "apache-2.0", distillation = "allowed" }"#),
        model(
            MODEL_ATTRIBUTION,
            r#"{ id = "llama-style", distillation = "attribution_required", attribution = "Built with SmolLM2" }"#,
        ),
        model(
            MODEL_NON_COMMERCIAL,
            r#"{ id = "research-only", distillation = "non_commercial" }"#,
        ),
        model(
            MODEL_PROHIBITED,
            r#"{ id = "closed", distillation = "prohibited" }"#,
        ),
    ]
    .join("\n")
}

/// The models, loaded once on the server runtime.
pub async fn models() -> ModelRegistry {
    static MODELS: tokio::sync::OnceCell<ModelRegistry> = tokio::sync::OnceCell::const_new();
    MODELS.get_or_init(load_models).await.clone()
}

/// The test models, freshly loaded on the server runtime (engines of their own).
async fn load_models() -> ModelRegistry {
    on_server(async {
        let config = config_from(&format!("{}\n", models_toml()), &[]);
        ModelRegistry::load(&config.models, &config.engine)
            .await
            .expect("load the test models")
    })
    .await
}

/// Creates a fresh database; returns (url, name).
pub async fn create_database(host_port: &str) -> (String, String) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", pg_server()))
        .await
        .expect("Postgres must run at TEACHD_TEST_PG (default 127.0.0.1:5432)");
    let name = format!("teachd_test_{}", Uuid::new_v4().simple());
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .unwrap();
    admin.close().await;
    (format!("postgres://postgres@{host_port}/{name}"), name)
}

/// Drops a test database from a thread of its own (`Drop` cannot await), unless the test is
/// failing: then it stays for inspection.
pub fn drop_database(name: String) {
    if std::thread::panicking() {
        eprintln!("keeping database {name} of a failed test");
        return;
    }
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

/// A config from TOML text plus `TEACHD__…` overrides.
pub fn config_from(toml: &str, env: &[(String, String)]) -> Config {
    let dir = std::env::temp_dir().join(format!("teachd-test-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("teachd.toml");
    std::fs::write(&file, toml).unwrap();
    let config = Config::load_with_env(Some(&file), env).expect("test config");
    let _ = std::fs::remove_dir_all(&dir);
    config
}

/// The ledger signing key every test server shares (created by the first one).
pub fn test_key_file() -> std::path::PathBuf {
    std::env::temp_dir().join("teachd-test-ledger-signing.key")
}

pub fn test_config(db_url: &str, with_model: bool) -> Config {
    let mut toml = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[database]\nurl = \"{db_url}\"\nmax_connections = 8\n\
         [tlog]\nkey_file = \"{}\"\ncheckpoint_interval_secs = 0\n",
        test_key_file().display()
    );
    if with_model {
        toml.push_str(&models_toml());
    } else {
        // Replaces the embedded default's model list.
        toml.insert_str(0, "models = []\n");
    }
    config_from(&toml, &[])
}

/// Extra routes a test mounts next to the app's (e.g. a slow route behind the real gate).
pub type Extra = Arc<dyn Fn(AppState) -> Router<AppState> + Send + Sync>;

/// What an app is started with.
#[derive(Clone, Default)]
pub struct Options {
    pub extra: Option<Extra>,
    /// Serve the models (loaded once per test binary).
    pub model: bool,
    /// Serve the models from a registry of this app's own, loaded for it (its engines are
    /// used by no other test).
    pub own_models: bool,
    /// Reach Postgres through this `host:port` (e.g. a [`ChaosProxy`]).
    pub via: Option<String>,
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The server's state (lives on the server runtime; fine for synchronous reads).
    pub state: AppState,
    /// A pool of this test's own runtime, for the test's queries.
    pub db: PgPool,
    pub db_name: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    options: Options,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<oneshot::Receiver<()>>,
    owns_db: bool,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(None, |_| {}).await
    }

    /// A fresh database; `extra` routes; `tweak` edits the config.
    pub async fn spawn_with(extra: Option<Extra>, tweak: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_opts(
            Options {
                extra,
                ..Default::default()
            },
            tweak,
        )
        .await
    }

    /// An app serving the models.
    pub async fn with_model(tweak: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_opts(
            Options {
                model: true,
                ..Default::default()
            },
            tweak,
        )
        .await
    }

    pub async fn spawn_opts(options: Options, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let host = options.via.clone().unwrap_or_else(|| {
            pg_server()
                .trim_start_matches("postgres://postgres@")
                .to_string()
        });
        let (db_url, db_name) = create_database(&host).await;
        let mut config = test_config(&db_url, options.model);
        tweak(&mut config);
        let mut app = Self::start(config, options, db_name).await;
        app.owns_db = true;
        let (_, key) = teachd::auth::bootstrap_admin(&app.db).await.unwrap();
        app.admin_key = key.expose_secret().to_string();
        app
    }

    async fn start(config: Config, options: Options, db_name: String) -> TestApp {
        let registry = if options.own_models {
            load_models().await
        } else if options.model {
            models().await
        } else {
            ModelRegistry::empty()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (served_tx, served_rx) = oneshot::channel();
        let extra = options.extra.clone();
        server_runtime().spawn(async move {
            let state = teachd::build_state_with_models(config, registry)
                .await
                .unwrap();
            let extra = extra.map(|e| e(state.clone())).unwrap_or_default();
            let router = teachd::http::router_with(state.clone(), extra);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            ready_tx.send((addr, state.clone())).ok().unwrap();
            teachd::serve_with(listener, state, router, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
            let _ = served_tx.send(());
        });
        let (addr, state) = ready_rx.await.unwrap();
        let db = PgPoolOptions::new()
            .max_connections(4)
            .connect(&format!("{}/{db_name}", pg_server()))
            .await
            .unwrap();
        TestApp {
            addr,
            state,
            db,
            db_name,
            admin_key: String::new(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(600))
                .build()
                .unwrap(),
            options,
            shutdown: Some(tx),
            served: Some(served_rx),
            owns_db: false,
        }
    }

    /// Shuts the server down as SIGTERM would (in-flight requests finish, every row drains) and
    /// waits until it has.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = served.await;
        }
    }

    /// A second server (another "process") on the same database, with this one's config.
    pub async fn second(&self) -> TestApp {
        let mut next = Self::start(
            (*self.state.config).clone(),
            self.options.clone(),
            self.db_name.clone(),
        )
        .await;
        next.admin_key = self.admin_key.clone();
        next
    }

    /// Stops this server and starts a new one on the same database: in-memory state is gone.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        let options = self.options.clone();
        let mut next = Self::start(
            (*self.state.config).clone(),
            options,
            std::mem::take(&mut self.db_name),
        )
        .await;
        next.admin_key = std::mem::take(&mut self.admin_key);
        next.owns_db = std::mem::replace(&mut self.owns_db, false);
        next
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

    /// `teachd_engine_raw_passes_total` of the test model: (scoring engine, generation engine).
    pub async fn raw_passes(&self) -> (u64, u64) {
        let text = self.metrics_text().await;
        let count = |engine: &str| {
            let series =
                format!("teachd_engine_raw_passes_total{{model=\"{MODEL}\",engine=\"{engine}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series} in /metrics"))
                .parse()
                .unwrap()
        };
        (count("scoring"), count("generation"))
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        let r = self.get("/metrics", None).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// POSTs `body` with `key`; the answer must be 200, and is returned as JSON.
    pub async fn post_ok(&self, path: &str, key: &str, body: Value) -> Value {
        let r = self.post(path, key, body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.unwrap()
    }

    pub fn post(&self, path: &str, key: &str, body: Value) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(key).json(&body)
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

    /// Publishes a ToS version as the admin.
    pub async fn publish_tos(&self, version: &str) {
        let r = self
            .admin(reqwest::Method::POST, "/admin/tos")
            .json(&json!({"version": version, "text": "Distil responsibly."}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    /// Accepts `version` for the key's client.
    pub async fn accept_tos(&self, key: &str, version: &str, commercial: bool) {
        let r = self
            .post(
                "/v1/tos/accept",
                key,
                json!({"version": version, "purpose": "distil a student",
                       "student_model": "tiny-1m", "commercial": commercial}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// A client ready for the teacher endpoints: key issued, current ToS (`t1`, published if
    /// none is) accepted. Returns (client id, key).
    pub async fn ready_teacher(&self, name: &str, limits: Value) -> (Uuid, String) {
        let current: Option<String> =
            sqlx::query_scalar("SELECT version FROM tos_versions ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.db)
                .await
                .unwrap();
        let version = match current {
            Some(v) => v,
            None => {
                self.publish_tos("t1").await;
                "t1".into()
            }
        };
        let (client, key) = self.teacher(name, limits).await;
        self.accept_tos(&key, &version, false).await;
        (client, key)
    }

    pub async fn row_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// The row of `request_id`, once it is committed (rows of dropped requests are written
    /// when their work ends).
    pub async fn row(&self, client: Uuid, request_id: &str) -> Row {
        row_of(&self.db, client, request_id).await
    }

    /// Tokens the client spent today (the persisted daily quota).
    pub async fn tokens_used(&self, client: Uuid) -> i64 {
        tokens_used(&self.db, client).await
    }

    /// Waits until the client's spent tokens settle at `want` (refunds land in a task).
    pub async fn wait_tokens_used(&self, client: Uuid, want: i64) {
        wait_tokens_used(&self.db, client, want).await
    }
}

/// The row of `request_id` of `client`, once it is committed.
pub async fn row_of(db: &PgPool, client: Uuid, request_id: &str) -> Row {
    {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let row: Option<Row> = sqlx::query_as(
                "SELECT status, error_code, model, weights_sha256, prompt_tokens, scored_tokens,
                        generated_tokens, judgments, top_k, request_sha256, response_sha256, refusals
                 FROM usage_events WHERE client_id = $1 AND request_id = $2",
            )
            .bind(client)
            .bind(request_id)
            .fetch_optional(db)
            .await
            .unwrap();
            if let Some(row) = row {
                return row;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no row for request {request_id}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Tokens the client spent today (the persisted daily quota).
pub async fn tokens_used(db: &PgPool, client: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(tokens), 0)::int8 FROM client_daily_usage WHERE client_id = $1",
    )
    .bind(client)
    .fetch_one(db)
    .await
    .unwrap()
}

/// Waits until the client's spent tokens settle at `want` (refunds land in a task).
pub async fn wait_tokens_used(db: &PgPool, client: Uuid, want: i64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let used = tokens_used(db, client).await;
        if used == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tokens used {used}, expected {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The facts of one ledger row that tests check.
#[derive(Debug, Clone, sqlx::FromRow)]
#[allow(dead_code)] // read through Debug in failure messages
pub struct Row {
    pub status: i16,
    pub error_code: Option<String>,
    pub model: Option<String>,
    pub weights_sha256: Option<String>,
    pub prompt_tokens: i64,
    pub scored_tokens: i64,
    pub generated_tokens: i64,
    pub judgments: i64,
    pub top_k: Option<i32>,
    pub request_sha256: Vec<u8>,
    pub response_sha256: Vec<u8>,
    pub refusals: i64,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if self.owns_db {
            drop_database(std::mem::take(&mut self.db_name));
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

/// A TCP proxy between the app and Postgres that a test can cut (closing every connection and
/// refusing new ones) and restore: Postgres "goes down" without stopping anything else.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    down: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl ChaosProxy {
    pub async fn start() -> ChaosProxy {
        use std::sync::atomic::Ordering;
        // Bound and served on the server runtime, like the apps that connect through it.
        let listener =
            on_server(async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() }).await;
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (d, c) = (down.clone(), conns.clone());
        let upstream = pg_server()
            .trim_start_matches("postgres://postgres@")
            .to_string();
        // On the server runtime: the proxy must outlive nothing but the test that holds it.
        server_runtime().spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        ChaosProxy { addr, down, conns }
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Postgres becomes unreachable: open connections are closed, new ones refused.
    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A superuser connection to an app's database (direct, not through any proxy).
pub async fn superuser(db_name: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(&format!("{}/{db_name}", pg_server()))
        .await
        .unwrap()
}
