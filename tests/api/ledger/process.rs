//! The real `teachd serve` binary under load with real keys: SIGKILL loses no acknowledged row,
//! SIGTERM drains every row (open streams' included) before it exits.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::app::{create_database, drop_database, pg_server, superuser};

pub struct Server {
    pub child: Child,
    pub base: String,
    pub db_name: String,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub key: String,
}

/// Starts `teachd serve` on a fresh database (with `env` overrides), bootstraps an admin key
/// with `teachd admin bootstrap`, creates a client with a teacher key and publishes a ToS.
pub async fn start_server(env: &[(&str, String)]) -> Server {
    let host = pg_server()
        .trim_start_matches("postgres://postgres@")
        .to_string();
    let (url, db_name) = create_database(&host).await;
    start_server_on(url, db_name, env).await
}

/// `teachd serve` on the database at `url` (with `env` overrides), up and listening; nothing
/// else set up (a second life of a server on its database keeps the first one's keys).
pub async fn spawn_server(url: String, db_name: String, env: &[(&str, String)]) -> Server {
    let bin = env!("CARGO_BIN_EXE_teachd");
    // Without a model unless the caller's config names one (the embedded default has one).
    let no_models = std::env::temp_dir().join(format!(
        "teachd-nomodel-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&no_models, "models = []\n").unwrap();
    let mut child = Command::new(bin)
        .arg("serve")
        .env("TEACHD_CONFIG", &no_models)
        .env("TEACHD__DATABASE__URL", &url)
        .env("TEACHD__SERVER__BIND", "127.0.0.1:0")
        .env("TEACHD__TLOG__KEY_FILE", crate::app::test_key_file())
        .env("RUST_LOG", "info,mistralrs_core=warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("teachd serve did not start: {:?}", child.try_wait()));
        if let Some(at) = line.find("addr=") {
            let rest = &line[at + "addr=".len()..];
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    Server {
        child,
        base: format!("http://{addr}"),
        db_name,
        lines,
        key: String::new(),
    }
}

/// [`start_server`] on the database at `url` (a superuser's URL; `env` may make the server log
/// in as another role).
pub async fn start_server_on(url: String, db_name: String, env: &[(&str, String)]) -> Server {
    let bin = env!("CARGO_BIN_EXE_teachd");
    let mut server = spawn_server(url.clone(), db_name, env).await;
    let out = Command::new(bin)
        .args(["admin", "bootstrap"])
        .env("TEACHD__DATABASE__URL", &url)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let client: serde_json::Value = http
        .post(format!("{base}/admin/clients"))
        .bearer_auth(&admin)
        .json(
            &serde_json::json!({"name": "load", "limits": {"rpm": 10000000,
            "max_concurrent": 1000, "tpm": 100000000, "daily_tokens": 1000000000000i64}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: serde_json::Value = http
        .post(format!(
            "{base}/admin/clients/{}/keys",
            client["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"scopes": ["teacher"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = http
        .post(format!("{base}/admin/tos"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"version": "v1", "text": "terms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    server.key = key["key"].as_str().unwrap().to_string();
    server
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failed assertion must not leave an orphan server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop_database(std::mem::take(&mut self.db_name));
    }
}

/// One response the load generator received.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub status: u16,
}

/// `workers` concurrent clients calling `GET path` with `key` until `stop` is set or the
/// server goes away.
pub async fn load(
    base: String,
    path: &'static str,
    key: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, base, stop, key) = (http.clone(), base.clone(), stop.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut errors = 0;
            while !stop.load(Ordering::SeqCst) {
                match http
                    .get(format!("{base}{path}"))
                    .bearer_auth(&key)
                    .send()
                    .await
                {
                    Ok(r) => {
                        errors = 0;
                        let request_id = r
                            .headers()
                            .get("x-request-id")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        out.push(Outcome {
                            request_id,
                            status: r.status().as_u16(),
                        });
                    }
                    Err(_) => {
                        errors += 1;
                        if errors >= 3 {
                            break; // the server is gone
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

async fn committed_ids(db_name: &str) -> Vec<String> {
    let mut su = superuser(db_name).await;
    sqlx::query_scalar("SELECT request_id FROM usage_events")
        .fetch_all(&mut su)
        .await
        .unwrap()
}

async fn wait_for_rows(db_name: &str, n: usize) {
    for _ in 0..1200 {
        if committed_ids(db_name).await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached {n} rows");
}

fn assert_every_response_has_its_row(outcomes: &[Outcome], committed: &[String], statuses: &[u16]) {
    let set: HashSet<&String> = committed.iter().collect();
    let mut acked = 0;
    for o in outcomes {
        assert!(
            statuses.contains(&o.status),
            "unexpected status {}",
            o.status
        );
        if (200..300).contains(&o.status) {
            acked += 1;
            assert!(
                set.contains(&o.request_id),
                "a 2xx without its row: {}",
                o.request_id
            );
        }
    }
    assert!(acked > 100, "the load got through ({acked} acknowledged)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_row() {
    let mut server = start_server(&[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(
        server.base.clone(),
        "/v1/tos",
        server.key.clone(),
        16,
        stop,
    ));
    wait_for_rows(&server.db_name, 2_000).await;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let outcomes = load_task.await.unwrap();
    let committed = committed_ids(&server.db_name).await;
    assert_every_response_has_its_row(&outcomes, &committed, &[200]);
    let mut su = superuser(&server.db_name).await;
    let (n, max): (i64, i64) = sqlx::query_as("SELECT count(*), max(id) FROM usage_events")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(n, max, "ids are gapless");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_with_every_row_written() {
    let mut server = start_server(&[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(
        server.base.clone(),
        "/v1/tos",
        server.key.clone(),
        16,
        stop,
    ));
    wait_for_rows(&server.db_name, 2_000).await;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    let mut said = Vec::new();
    while let Ok(line) = server.lines.recv_timeout(Duration::from_secs(10)) {
        said.push(line);
    }
    assert!(
        said.iter().any(|l| l.contains("ledger drained")),
        "{said:?}"
    );
    let outcomes = load_task.await.unwrap();
    let committed = committed_ids(&server.db_name).await;
    assert_every_response_has_its_row(&outcomes, &committed, &[200]);
    let received: HashSet<&String> = outcomes.iter().map(|o| &o.request_id).collect();
    let committed_set: HashSet<&String> = committed.iter().collect();
    assert!(received.is_subset(&committed_set));
}

/// SIGTERM while streams are open and the grace period is shorter than they: the streams are
/// cut, and each still gets its row (status 499, the tokens it was served) before the process
/// exits; none is lost to the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_streams_writes_their_rows_before_exit() {
    let dir =
        std::env::temp_dir().join(format!("teachd-sigterm-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("teachd.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nid = \"{}\"\nsource = {{ kind = \"gguf\", path = \"{}\" }}\nlicence = {{ id = \"apache-2.0\", distillation = \"allowed\" }}\n",
            crate::app::MODEL,
            crate::app::model_path().display()
        ),
    )
    .unwrap();
    let mut server = start_server(&[
        ("TEACHD_CONFIG", config.display().to_string()),
        ("TEACHD__SERVER__SHUTDOWN_GRACE_SECS", "1".into()),
    ])
    .await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/tos/accept", server.base))
        .bearer_auth(&server.key)
        .json(&serde_json::json!({"version": "v1", "purpose": "p", "student_model": "s", "commercial": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut streams = Vec::new();
    for i in 0..3 {
        let r = http
            .post(format!("{}/v1/chat/completions", server.base))
            .bearer_auth(&server.key)
            .json(&serde_json::json!({"model": crate::app::MODEL, "stream": true, "max_tokens": 400,
                "temperature": 1.0, "seed": i,
                "messages": [{"role": "user", "content": format!("Write a long story about ship number {i}.")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let mut body = r.bytes_stream();
        // Wait for real output before the signal.
        let mut seen = String::new();
        while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 3 {
            let chunk = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        streams.push((id, body));
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    let mut su = superuser(&server.db_name).await;
    let mut cut = 0;
    for (id, _) in &streams {
        let (status, generated, model): (i16, i64, Option<String>) = sqlx::query_as(
            "SELECT status, generated_tokens, model FROM usage_events WHERE request_id = $1",
        )
        .bind(id)
        .fetch_one(&mut su)
        .await
        .unwrap_or_else(|e| panic!("the cut stream {id} has no row: {e}"));
        // Finished within the grace period (200), or cut at its end (499): either way its row
        // is there, with what it was served.
        assert!(status == 200 || status == 499, "{status}");
        cut += usize::from(status == 499);
        assert!(generated > 0, "the tokens it was served are recorded");
        assert_eq!(model.as_deref(), Some(crate::app::MODEL));
    }
    assert!(
        cut > 0,
        "at least one stream outlived the 1 s grace period and was cut"
    );
    drop(streams);
}

#[tokio::test]
async fn serves_as_the_least_privileged_runtime_role() {
    let host = pg_server()
        .trim_start_matches("postgres://postgres@")
        .to_string();
    let (url, db_name) = create_database(&host).await;
    let bin = env!("CARGO_BIN_EXE_teachd");
    let no_models = std::env::temp_dir().join(format!(
        "teachd-nomodel-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&no_models, "models = []\n").unwrap();
    // As a superuser, with privilege_check = refuse, it does not start.
    let out = Command::new(bin)
        .arg("serve")
        .env("TEACHD_CONFIG", &no_models)
        .env("TEACHD__DATABASE__URL", &url)
        .env("TEACHD__DATABASE__PRIVILEGE_CHECK", "refuse")
        .env("TEACHD__SERVER__BIND", "127.0.0.1:0")
        .env("TEACHD__TLOG__KEY_FILE", crate::app::test_key_file())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve") && stderr.contains("superuser"),
        "{stderr}"
    );
    // The runtime role may log in (roles are cluster-wide; migration 0002 creates it).
    let mut su = superuser(&db_name).await;
    sqlx::query("ALTER ROLE teachd_app LOGIN")
        .execute(&mut su)
        .await
        .unwrap();
    let app_url = url.replacen("postgres://postgres@", "postgres://teachd_app@", 1);
    let server = start_server_on(
        url.clone(),
        db_name,
        &[
            ("TEACHD__DATABASE__URL", app_url),
            ("TEACHD__DATABASE__MIGRATE_URL", url),
            ("TEACHD__DATABASE__PRIVILEGE_CHECK", "refuse".into()),
        ],
    )
    .await;
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", server.base))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-teachd-receipt"));
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(user, "postgres");
    let committed = committed_ids(&server.db_name).await;
    assert_eq!(
        committed.len(),
        4,
        "client, key, ToS, models: {committed:?}"
    );
}
