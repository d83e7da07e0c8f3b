//! Test harness: a fresh database per test, the app on 127.0.0.1:0, and a stand-in auth gate.
//!
//! Auth (issue 3) is written in parallel, so the routes here sit behind [`test_gate`], which
//! trusts an `x-test-client: <uuid>` header and then does exactly what the real gate does after
//! authenticating: put the `ClientCtx` in the request and run it under
//! `ledger_layer::record_usage`. When merging, replace `x-test-client` with real bearer keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use teachd::auth::{ClientCtx, Scope};
use teachd::config::{Config, DistillationPolicy, LicenceConfig};
use teachd::engine::ModelInfo;
use teachd::error::ApiError;
use teachd::http::ledger_layer::record_usage;
use teachd::http::tos::{check_tos_and_licence, provenance_headers};
use teachd::usage::Usage;
use teachd::AppState;
use uuid::Uuid;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A new, empty database; returns its URL (on `host:port`, which may be a proxy).
pub async fn fresh_database(host_port: &str) -> (String, String) {
    use sqlx::Connection;
    let name = format!("teachd_ledger_test_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(PG_ADMIN_URL)
        .await
        .expect("postgres is up");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    (format!("postgres://postgres@{host_port}/{name}"), name)
}

/// Drop a test database (from synchronous `Drop`), unless the test is failing: then it stays
/// for inspection.
pub fn drop_database(name: &str) {
    if std::thread::panicking() {
        eprintln!("keeping database {name} of a failed test");
        return;
    }
    let name = name.to_string();
    let _ = std::thread::spawn(move || {
        use sqlx::Connection;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(mut admin) = sqlx::PgConnection::connect(PG_ADMIN_URL).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        });
    })
    .join();
}

/// A superuser connection to the test database (direct, not through any proxy).
pub async fn superuser(db_name: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap()
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub state: AppState,
    pub db_name: String,
    pub http: reqwest::Client,
}

pub fn test_config(db_url: &str) -> Config {
    let mut config = Config::load_with_env(None, &[]).unwrap();
    config.database.url = db_url.to_string();
    config.database.max_connections = 8;
    config
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Start the app on a fresh database, `tweak` adjusting the config first.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_via("127.0.0.1:5432", tweak).await
}

/// As [`spawn_app_with`], reaching Postgres through `host_port` (e.g. a chaos proxy).
pub async fn spawn_app_via(host_port: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let (url, db_name) = fresh_database(host_port).await;
    let mut config = test_config(&url);
    tweak(&mut config);
    let state = teachd::build_state(config).await.expect("state builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = test_router(state.clone());
    let s = state.clone();
    tokio::spawn(
        async move { teachd::serve_router(listener, s, app, std::future::pending()).await },
    );
    TestApp {
        addr,
        state,
        db_name,
        http: reqwest::Client::new(),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        drop_database(&self.db_name);
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn get(&self, client: Uuid, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.url(path))
            .header("x-test-client", client.to_string())
    }

    pub fn post(
        &self,
        client: Uuid,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .header("x-test-client", client.to_string())
            .json(&body)
    }

    /// Publish a ToS version (as `admin`) and return it.
    pub async fn publish_tos(&self, admin: Uuid, version: &str) {
        let r = self
            .post(
                admin,
                "/admin/tos",
                serde_json::json!({"version": version, "text": "Be nice."}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    pub async fn accept_tos(&self, client: Uuid, version: &str, commercial: bool) {
        let r = self
            .post(
                client,
                "/v1/tos/accept",
                serde_json::json!({"version": version, "purpose": "distil a student",
                                   "student_model": "tiny-1m", "commercial": commercial}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    pub async fn row_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(&self.state.db)
            .await
            .unwrap()
    }
}

/// The router under test: the ledger's routes plus stand-ins for teacher endpoints, all behind
/// the stand-in gate.
pub fn test_router(state: AppState) -> Router {
    let (api, _openapi) = teachd::http::ledger_routes().split_for_parts();
    api.route("/v1/test/teacher/{model}", post(fake_teacher))
        .route("/v1/test/stream", get(fake_stream))
        .route("/v1/test/slow-stream", get(fake_slow_stream))
        .route_layer(from_fn_with_state(state.clone(), test_gate))
        .with_state(state)
}

/// Stand-in for the auth gate: `x-test-client: <uuid>` authenticates (scopes teacher+admin).
pub async fn test_gate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let client = req
        .headers()
        .get("x-test-client")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Uuid>().ok());
    let Some(client_id) = client else {
        return ApiError::Unauthorized("missing test client".into()).into_response();
    };
    let ctx = ClientCtx {
        client_id,
        key_id: Uuid::from_u128(client_id.as_u128() ^ 1),
        scopes: vec![Scope::Teacher, Scope::Admin],
        client_name: "bench".into(),
        limits: teachd::limits::Limits::from(&teachd::config::DefaultLimits::default()),
    };
    req.extensions_mut().insert(ctx.clone());
    record_usage(&state, &ctx, req, next).await
}

pub fn test_models() -> BTreeMap<&'static str, ModelInfo> {
    let model = |id: &str, distillation, attribution: Option<&str>| ModelInfo {
        id: id.into(),
        architecture: "llama".into(),
        quantization: "Q4_1".into(),
        weights_sha256: format!("{:0>64}", id.len()),
        tokenizer_sha256: "00".into(),
        vocab_size: 10,
        context_length: 64,
        max_top_k: 5,
        licence: LicenceConfig {
            id: format!("{id}-licence"),
            distillation,
            attribution: attribution.map(str::to_string),
        },
    };
    BTreeMap::from([
        ("open", model("open", DistillationPolicy::Allowed, None)),
        (
            "llama",
            model(
                "llama",
                DistillationPolicy::AttributionRequired,
                Some("Built with Llama"),
            ),
        ),
        (
            "research",
            model("research", DistillationPolicy::NonCommercial, None),
        ),
        (
            "closed",
            model("closed", DistillationPolicy::Prohibited, None),
        ),
    ])
}

/// Stand-in teacher endpoint: the ToS/licence check, provenance headers and a `Usage`, as the
/// real handlers do. Body: `{"tokens": n}` -> usage with n prompt tokens.
async fn fake_teacher(
    State(state): State<AppState>,
    Path(model): Path<String>,
    ctx: ClientCtx,
    teachd::error::Json(body): teachd::error::Json<serde_json::Value>,
) -> Result<Response, ApiError> {
    let models = test_models();
    let info = models
        .get(model.as_str())
        .ok_or_else(|| ApiError::model_not_found(&model))?;
    check_tos_and_licence(&state.tos, &ctx, info).await?;
    let tokens = body["tokens"].as_u64().unwrap_or(1);
    let mut response = (
        provenance_headers(info),
        axum::Json(serde_json::json!({"model": info.id, "tokens": tokens})),
    )
        .into_response();
    response.extensions_mut().insert(Usage {
        model: Some(info.id.clone()),
        prompt_tokens: tokens,
        scored_tokens: tokens.saturating_sub(1),
        generated_tokens: 0,
        top_k: Some(3),
        judgments: 0,
        weights_sha256: Some(info.weights_sha256.clone()),
    });
    Ok(response)
}

/// Stand-in streaming endpoint: three SSE events then `data: [DONE]`.
async fn fake_stream() -> Response {
    let events = [
        "data: {\"n\":1}\n\n",
        "data: {\"n\":2}\n\n",
        "data: {\"n\":3}\n\n",
        "data: [DONE]\n\n",
    ];
    let stream =
        futures::stream::iter(events.map(|e| Ok::<_, std::io::Error>(axum::body::Bytes::from(e))));
    let mut r = axum::body::Body::from_stream(stream).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// Stand-in streaming endpoint that takes its time: an event, a pause, an event, `[DONE]`.
async fn fake_slow_stream() -> Response {
    let stream = futures::stream::unfold(0u8, |n| async move {
        let chunk = match n {
            0 => "data: {\"n\":1}\n\n",
            1 => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                "data: {\"n\":2}\n\n"
            }
            2 => "data: [DONE]\n\n",
            _ => return None,
        };
        Some((
            Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk)),
            n + 1,
        ))
    });
    let mut r = axum::body::Body::from_stream(stream).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// A TCP proxy between the app and Postgres that a test can cut (closing every connection and
/// refusing new ones) and restore: Postgres "goes down" without stopping the shared server.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    down: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl ChaosProxy {
    pub async fn start() -> ChaosProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (d, c) = (down.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
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
