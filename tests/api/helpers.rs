#![allow(dead_code)]
//! The shared model server: one `TestApp` serving the models, with a client whose limits the
//! suite cannot reach, for the tests that check numbers (they isolate themselves by their own
//! inputs). Tests that need a database of their own spawn their own `TestApp`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use teachd::AppState;

use crate::app::TestApp;
pub use crate::app::MODEL;

pub struct SharedServer {
    pub addr: SocketAddr,
    pub state: AppState,
    /// A teacher key of a client with generous limits.
    pub teacher_key: String,
    pub teacher_client: uuid::Uuid,
    pub admin_key: String,
    pub db_name: String,
}

pub fn shared() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        // Built on a thread of its own: `get_or_init` may be called from inside a runtime.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                // Leaked: it serves for the whole test binary (its pools belong to this
                // short-lived runtime; tests use `SharedServer::db` for queries).
                let app: &'static TestApp = Box::leak(Box::new(TestApp::with_model(|_| {}).await));
                let (client, key) = app
                    .ready_teacher(
                        "suite",
                        serde_json::json!({"rpm": 100000, "tpm": 100000000,
                            "max_concurrent": 256, "daily_tokens": 10000000000i64}),
                    )
                    .await;
                SharedServer {
                    addr: app.addr,
                    state: app.state.clone(),
                    teacher_key: key,
                    teacher_client: client,
                    admin_key: app.admin_key.clone(),
                    db_name: app.db_name.clone(),
                }
            })
        })
        .join()
        .expect("shared server failed to start")
    })
}

impl SharedServer {
    /// A pool on the caller's runtime, for queries against the shared server's database.
    pub async fn db(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&format!("{}/{}", crate::app::pg_server(), self.db_name))
            .await
            .unwrap()
    }

    /// A new client of the shared server with a ready teacher key (ToS accepted).
    pub async fn new_teacher(&self, limits: serde_json::Value) -> (uuid::Uuid, String) {
        let http = client();
        let name = format!("c-{}", uuid::Uuid::new_v4().simple());
        let resp = http
            .post(self.url("/admin/clients"))
            .bearer_auth(&self.admin_key)
            .json(&serde_json::json!({"name": name, "limits": limits}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let c: serde_json::Value = resp.json().await.unwrap();
        let id: uuid::Uuid = c["id"].as_str().unwrap().parse().unwrap();
        let k: serde_json::Value = http
            .post(self.url(&format!("/admin/clients/{id}/keys")))
            .bearer_auth(&self.admin_key)
            .json(&serde_json::json!({"scopes": ["teacher"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key = k["key"].as_str().unwrap().to_string();
        let tos: serde_json::Value = http
            .get(self.url("/v1/tos"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let r = http
            .post(self.url("/v1/tos/accept"))
            .bearer_auth(&key)
            .json(
                &serde_json::json!({"version": tos["version"], "purpose": "tests",
                "student_model": "none", "commercial": false}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        (id, key)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Run `fut` on the server's runtime (for direct engine access in reference checks).
    pub async fn on_server<F, T>(&self, fut: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        crate::app::on_server(fut).await
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
