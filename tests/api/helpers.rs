#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use teachd::config::Config;
use teachd::AppState;

/// Postgres server the tests create their databases on.
pub fn pg_admin_url() -> String {
    std::env::var("TEACHD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh, empty database; returns its URL.
pub async fn fresh_database() -> String {
    use sqlx::Connection;
    let name = format!("teachd_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", pg_admin_url()))
        .await
        .expect("connect to Postgres (is it running on 127.0.0.1:5432?)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    format!("{}/{name}", pg_admin_url())
}

/// The default teacher GGUF: `TEACHD_TEST_MODEL`, else fetched into the cache by the script.
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("TEACHD_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "fetch-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub const MODEL: &str = "smollm2-135m-instruct";

/// Config for a test server on `db_url` serving the default model (or none).
pub fn test_config(db_url: &str, with_model: bool) -> Config {
    let mut toml = format!(
        r#"
[server]
bind = "127.0.0.1:0"
[database]
url = "{db_url}"
max_connections = 8
"#
    );
    if with_model {
        toml.push_str(&format!(
            r#"
[[models]]
id = "{MODEL}"
source = {{ kind = "gguf", path = "{}" }}
licence = {{ id = "apache-2.0", distillation = "allowed" }}
max_top_k = 49152
"#,
            model_path().display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("teachd-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("teachd.toml");
    std::fs::write(&file, toml).unwrap();
    Config::load_with_env(Some(&file), &[]).expect("test config")
}

/// One server with the real model, shared by every test of this binary: loading the model
/// once keeps the suite fast. It runs on its own runtime thread, so no test's runtime ever
/// owns the engine's tasks. Tests isolate themselves by their own inputs.
pub struct SharedServer {
    pub addr: SocketAddr,
    pub state: AppState,
    pub handle: tokio::runtime::Handle,
    /// A teacher key of a client with generous limits.
    pub teacher_key: String,
}

pub fn shared() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let handle = rt.handle().clone();
            rt.block_on(async move {
                let db = fresh_database().await;
                let state = teachd::build_state(test_config(&db, true))
                    .await
                    .expect("build state with the default model");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let server = tokio::spawn(teachd::serve(
                    listener,
                    state.clone(),
                    std::future::pending(),
                ));
                let teacher_key = teacher_key(addr, &state).await;
                tx.send(SharedServer {
                    addr,
                    state,
                    handle,
                    teacher_key,
                })
                .unwrap();
                server.await.unwrap().unwrap();
            });
        });
        rx.recv().expect("shared server failed to start")
    })
}

/// Bootstrap an admin key, create a client with room for the suite, issue it a teacher key.
async fn teacher_key(addr: SocketAddr, state: &AppState) -> String {
    let (_, admin) = teachd::auth::bootstrap_admin(&state.db).await.unwrap();
    let http = client();
    let base = format!("http://{addr}");
    let resp = http
        .post(format!("{base}/admin/clients"))
        .bearer_auth(admin.expose_secret())
        .json(
            &serde_json::json!({"name": "suite", "limits": {"rpm": 100000, "tpm": 100000000,
            "max_concurrent": 256, "daily_tokens": 10000000000i64}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let client: serde_json::Value = resp.json().await.unwrap();
    let resp = http
        .post(format!(
            "{base}/admin/clients/{}/keys",
            client["id"].as_str().unwrap()
        ))
        .bearer_auth(admin.expose_secret())
        .json(&serde_json::json!({"scopes": ["teacher"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let key: serde_json::Value = resp.json().await.unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    // Teacher endpoints answer 403 until the client accepted the current ToS.
    let resp = http
        .post(format!("{base}/admin/tos"))
        .bearer_auth(admin.expose_secret())
        .json(&serde_json::json!({"version": "2026-11", "text": "Distil responsibly."}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let resp = http
        .post(format!("{base}/v1/tos/accept"))
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"version": "2026-11", "purpose": "test suite",
            "student_model": "none", "commercial": false}),
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    key
}

impl SharedServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Run `fut` on the server's runtime (for direct engine access in reference checks).
    pub async fn on_server<F, T>(&self, fut: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.handle.spawn(fut).await.unwrap()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()
        .unwrap()
}

/// POST JSON with the shared server's credentials; returns (status, headers, body bytes).
pub async fn post(
    path: &str,
    body: serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let s = shared();
    let resp = with_auth(client().post(s.url(path)).json(&body))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

pub async fn post_json(path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (status, _, bytes) = post(path, body).await;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

/// Adds the shared client's teacher key.
pub fn with_auth(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    rb.bearer_auth(&shared().teacher_key)
}
