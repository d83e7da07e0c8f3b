//! Real server processes under load: SIGKILL loses no acknowledged row, SIGTERM drains.
//!
//! The server process is this test binary re-executed (`zz_child_server_entry`) so it can run
//! the real `teachd::serve_router` (same graceful shutdown and ledger drain as `teachd serve`)
//! behind the stand-in auth gate. Once keys exist (issue 3), this can spawn
//! `env!("CARGO_BIN_EXE_teachd") serve` with a bootstrap admin key instead.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::helpers::{fresh_database, superuser, test_router};

const CHILD_ENV: &str = "TEACHD_LEDGER_TEST_CHILD";

/// Not a test: the entry point of the server child process (does nothing otherwise).
#[test]
fn zz_child_server_entry() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = teachd::config::Config::load(None).unwrap();
        assert!(config.models.is_empty());
        let state = teachd::build_state(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        let app = test_router(state.clone());
        teachd::serve_router(listener, state, app, teachd::shutdown_signal())
            .await
            .unwrap();
        println!("DRAINED");
    });
    std::process::exit(0);
}

struct Server {
    child: Child,
    base: String,
    db_name: String,
    lines: std::sync::mpsc::Receiver<String>,
}

async fn start_server() -> Server {
    let (url, db_name) = fresh_database("127.0.0.1:5432").await;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "process::zz_child_server_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("TEACHD__DATABASE__URL", url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("child server starts");
        // libtest may print "test ... " on the same line first.
        if let Some(at) = line.find("LISTENING ") {
            break line[at + "LISTENING ".len()..].trim().to_string();
        }
    };
    Server {
        child,
        base: format!("http://{addr}"),
        db_name,
        lines,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failed assertion must not leave an orphan server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::helpers::drop_database(&self.db_name);
    }
}

/// One response the load generator received.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub status: u16,
}

/// `workers` concurrent clients hammering `GET path` until `stop` is set or the server goes away.
pub async fn load(
    base: String,
    path: &'static str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        let client = Uuid::new_v4();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut errors = 0;
            while !stop.load(Ordering::SeqCst) {
                let sent = http
                    .get(format!("{base}{path}"))
                    .header("x-test-client", client.to_string())
                    .send()
                    .await;
                match sent {
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

async fn publish_tos(base: &str) {
    let r = reqwest::Client::new()
        .post(format!("{base}/admin/tos"))
        .header("x-test-client", Uuid::new_v4().to_string())
        .json(&serde_json::json!({"version": "v1", "text": "terms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

async fn committed_ids(db_name: &str) -> Vec<String> {
    let mut su = superuser(db_name).await;
    sqlx::query_scalar("SELECT request_id FROM usage_events")
        .fetch_all(&mut su)
        .await
        .unwrap()
}

async fn wait_for_rows(db_name: &str, n: usize) {
    for _ in 0..600 {
        if committed_ids(db_name).await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached {n} rows");
}

fn assert_every_response_has_its_row(outcomes: &[Outcome], committed: &[String], statuses: &[u16]) {
    let set: HashSet<&String> = committed.iter().collect();
    assert_eq!(set.len(), committed.len(), "no duplicate rows");
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
    let mut server = start_server().await;
    publish_tos(&server.base).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(server.base.clone(), "/v1/tos", 16, stop.clone()));
    wait_for_rows(&server.db_name, 2_000).await;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let outcomes = load_task.await.unwrap();
    let committed = committed_ids(&server.db_name).await;
    assert_every_response_has_its_row(&outcomes, &committed, &[200]);
    // Rows may exist for requests whose response was lost with the process, never the reverse.
    assert!(committed.len() >= outcomes.len());
    let mut su = superuser(&server.db_name).await;
    let (n, max): (i64, i64) = sqlx::query_as("SELECT count(*), max(id) FROM usage_events")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(n, max, "ids are gapless");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_with_every_row_written() {
    let mut server = start_server().await;
    publish_tos(&server.base).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(server.base.clone(), "/v1/tos", 16, stop.clone()));
    wait_for_rows(&server.db_name, 2_000).await;
    let pid = server.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    // The reader thread may still be forwarding the last lines: read until it reaches EOF.
    let mut said = Vec::new();
    while let Ok(line) = server.lines.recv_timeout(Duration::from_secs(10)) {
        said.push(line);
    }
    assert!(said.iter().any(|l| l.contains("DRAINED")), "{said:?}");
    let outcomes = load_task.await.unwrap();
    let committed = committed_ids(&server.db_name).await;
    // Every response that left the server (all 200s here) has its row, and since the drain
    // finished, so does every request the server accepted.
    assert_every_response_has_its_row(&outcomes, &committed, &[200]);
    let received: HashSet<&String> = outcomes.iter().map(|o| &o.request_id).collect();
    let committed_set: HashSet<&String> = committed.iter().collect();
    assert!(received.is_subset(&committed_set));
}
