//! The transparency log through the real server: receipts, checkpoints, proofs and leaves as a
//! client checks them (also with `scripts/verify-receipt.py`, which shares no code with teachd),
//! and the audit against saved checkpoints after a superuser rewrote the database.

use base64::prelude::{Engine as _, BASE64_STANDARD};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use teachd::ledger::chain::{row_hash, GENESIS};
use teachd::ledger::queries::{self, EventFilter};
use teachd::ledger::signing::{open_checkpoint, open_receipt};
use teachd::ledger::tree::{self, MemStore};

use crate::app::{superuser, test_key_file, TestApp};

fn b32(s: &str) -> [u8; 32] {
    BASE64_STANDARD.decode(s).unwrap().try_into().unwrap()
}

/// A JSON array of base64 hashes (a proof).
fn hashes(v: &Value) -> Vec<[u8; 32]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| b32(h.as_str().unwrap()))
        .collect()
}

async fn text(app: &TestApp, path: &str, key: &str) -> String {
    let r = app.get(path, Some(key)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

async fn json_of(app: &TestApp, path: &str, key: &str) -> Value {
    let r = app.get(path, Some(key)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// The Ed25519 key inside a verifier key string, as a client decodes it.
fn public_key(vkey: &str) -> ed25519_dalek::VerifyingKey {
    let raw = BASE64_STANDARD
        .decode(vkey.trim().splitn(3, '+').nth(2).unwrap())
        .unwrap();
    assert_eq!(raw[0], 1);
    ed25519_dalek::VerifyingKey::from_bytes(&raw[1..].try_into().unwrap()).unwrap()
}

/// A response's receipt, the response bytes.
async fn served(app: &TestApp, path: &str, key: &str) -> (String, Vec<u8>, u16) {
    let r = app.get(path, Some(key)).send().await.unwrap();
    let status = r.status().as_u16();
    let receipt = r
        .headers()
        .get("x-teachd-receipt")
        .expect("every response with a row carries a receipt")
        .to_str()
        .unwrap()
        .to_string();
    (receipt, r.bytes().await.unwrap().to_vec(), status)
}

fn py(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify-receipt.py"
        ))
        .args(args)
        .output()
        .expect("python3");
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), msg)
}

#[tokio::test]
async fn receipts_checkpoints_and_proofs_verify_as_a_client_checks_them() {
    let app = TestApp::spawn().await;
    let (_, key) = app.teacher("acme", json!({})).await;
    let (_, other) = app.teacher("globex", json!({})).await;
    let vkey = text(&app, "/v1/ledger/key", &key).await;
    let vkey = vkey.trim().to_string();
    assert_eq!(vkey, app.state.ledger.tlog().key.verifier_key());
    let origin = app.state.ledger.tlog().key.origin().to_string();

    // A 404 and a 200 both have rows, so both have receipts.
    let (r404, body404, s404) = served(&app, "/v1/tos", &key).await;
    assert_eq!(s404, 404);
    let (receipt, body, status) = served(&app, "/v1/models", &key).await;
    assert_eq!(status, 200);
    let fields = open_receipt(&public_key(&vkey), &origin, &receipt).unwrap();
    assert_eq!(
        fields.response_sha256,
        <[u8; 32]>::from(Sha256::digest(&body))
    );
    let f404 = open_receipt(&public_key(&vkey), &origin, &r404).unwrap();
    assert_eq!(
        f404.response_sha256,
        <[u8; 32]>::from(Sha256::digest(&body404))
    );
    assert_eq!(f404.leaf_index + 1, fields.leaf_index);

    // The row is in the next checkpoint's tree.
    let cp = text(&app, "/v1/ledger/checkpoint", &key).await;
    let opened = open_checkpoint(&vkey, &cp).unwrap();
    assert_eq!(opened.origin, origin);
    assert!(opened.size > fields.leaf_index);
    let proof = json_of(
        &app,
        &format!(
            "/v1/ledger/proof/inclusion?leaf_index={}&tree_size={}",
            fields.leaf_index, opened.size
        ),
        &key,
    )
    .await;
    let path = hashes(&proof["audit_path"]);
    assert!(tree::check_inclusion(
        &path,
        opened.size,
        opened.root,
        fields.leaf_index,
        tree::leaf_hash(&fields.row_hash)
    ));

    // The same with the independent Python verifier; one changed bit fails it.
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (kf, rf, cf, pf, bf) = (
        put("key", vkey.as_bytes()),
        put("receipt", receipt.as_bytes()),
        put("checkpoint", cp.as_bytes()),
        put("proof", proof.to_string().as_bytes()),
        put("body", &body),
    );
    let (ok, msg) = py(&[
        "receipt",
        "--key",
        &kf,
        "--receipt",
        &rf,
        "--checkpoint",
        &cf,
        "--proof",
        &pf,
        "--response",
        &bf,
    ]);
    assert!(ok, "{msg}");
    let mut json = BASE64_STANDARD.decode(&receipt).unwrap();
    let at = json.len() / 2;
    json[at] ^= 0x01;
    let bad = put("bad", BASE64_STANDARD.encode(&json).as_bytes());
    let (ok, msg) = py(&[
        "receipt",
        "--key",
        &kf,
        "--receipt",
        &bad,
        "--checkpoint",
        &cf,
        "--proof",
        &pf,
    ]);
    assert!(!ok, "a flipped bit must not verify: {msg}");
    let mut other_body = body.clone();
    other_body[0] ^= 1;
    let ob = put("other-body", &other_body);
    let (ok, _) = py(&[
        "receipt",
        "--key",
        &kf,
        "--receipt",
        &rf,
        "--checkpoint",
        &cf,
        "--proof",
        &pf,
        "--response",
        &ob,
    ]);
    assert!(!ok);

    // More rows, a newer checkpoint, consistent with the first.
    for _ in 0..5 {
        served(&app, "/v1/models", &other).await;
    }
    let cp2 = text(&app, "/v1/ledger/checkpoint", &key).await;
    let opened2 = open_checkpoint(&vkey, &cp2).unwrap();
    assert!(opened2.size > opened.size);
    let cons = json_of(
        &app,
        &format!(
            "/v1/ledger/proof/consistency?first={}&second={}",
            opened.size, opened2.size
        ),
        &key,
    )
    .await;
    let proof2 = hashes(&cons["proof"]);
    assert!(tree::check_consistency(
        &proof2,
        opened.size,
        opened.root,
        opened2.size,
        opened2.root
    ));
    let (c2, cons_f) = (
        put("cp2", cp2.as_bytes()),
        put("cons", cons.to_string().as_bytes()),
    );
    let (ok, msg) = py(&[
        "consistency",
        "--key",
        &kf,
        "--old",
        &cf,
        "--new",
        &c2,
        "--proof",
        &cons_f,
    ]);
    assert!(ok, "{msg}");
    let (ok, _) = py(&[
        "consistency",
        "--key",
        &kf,
        "--old",
        &c2,
        "--new",
        &cf,
        "--proof",
        &cons_f,
    ]);
    assert!(!ok);

    // Leaves: own rows only for a teacher key; any row for an admin key.
    let leaf = json_of(
        &app,
        &format!("/v1/ledger/leaf/{}", fields.leaf_index),
        &key,
    )
    .await;
    assert_eq!(leaf["row_hash"], BASE64_STANDARD.encode(fields.row_hash));
    let canonical = BASE64_STANDARD
        .decode(leaf["canonical"].as_str().unwrap())
        .unwrap();
    let mut h = Sha256::new();
    h.update(b32(leaf["prev_hash"].as_str().unwrap()));
    h.update(&canonical);
    assert_eq!(<[u8; 32]>::from(h.finalize()), fields.row_hash);
    let r = app
        .get(
            &format!("/v1/ledger/leaf/{}", fields.leaf_index),
            Some(&other),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another client's row is not visible");
    let r = app
        .admin(
            Method::GET,
            &format!("/v1/ledger/leaf/{}", fields.leaf_index),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "admins see every row");

    // Bad proof requests are 400s that name the parameter.
    for (path, param) in [
        (
            "/v1/ledger/proof/inclusion?leaf_index=5&tree_size=5",
            "leaf_index",
        ),
        (
            "/v1/ledger/proof/inclusion?leaf_index=0&tree_size=99999",
            "tree_size",
        ),
        ("/v1/ledger/proof/consistency?first=0&second=1", "first"),
        (
            "/v1/ledger/proof/consistency?first=3&second=99999",
            "second",
        ),
    ] {
        let r = app.get(path, Some(&key)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{path}");
    }
}

#[tokio::test]
async fn admin_responses_carry_receipts_too() {
    let app = TestApp::spawn().await;
    let r = app
        .admin(Method::GET, "/admin/clients")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-teachd-receipt"));
}

/// The rows as the database holds them.
async fn all_rows(app: &TestApp) -> Vec<teachd::ledger::ChainedEvent> {
    queries::events_after(&app.db, &EventFilter::default(), 0, 100_000)
        .await
        .unwrap()
}

/// `teachd audit verify --checkpoint FILE…` against the app's database.
fn audit_cli(app: &TestApp, checkpoints: &[&str]) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["audit".to_string(), "verify".to_string()];
    for (i, cp) in checkpoints.iter().enumerate() {
        let p = dir.path().join(format!("cp{i}"));
        std::fs::write(&p, cp).unwrap();
        args.push("--checkpoint".into());
        args.push(p.to_str().unwrap().into());
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teachd"))
        .args(&args)
        .env(
            "TEACHD__DATABASE__URL",
            format!("{}/{}", crate::app::pg_server(), app.db_name),
        )
        .env("TEACHD__TLOG__KEY_FILE", test_key_file())
        .env("TEACHD__TLOG__GENERATE_KEY", "false")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "stdout: {stdout} stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), json)
}

fn kinds(report: &Value) -> Vec<String> {
    report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect()
}

/// An app with rows and a checkpoint over them.
async fn app_with_checkpoint() -> (TestApp, String) {
    let app = TestApp::spawn().await;
    let (_, key) = app.teacher("acme", json!({})).await;
    for _ in 0..6 {
        served(&app, "/v1/models", &key).await;
    }
    let cp = text(&app, "/v1/ledger/checkpoint", &key).await;
    (app, cp)
}

async fn as_superuser(app: &TestApp, sql: &str) {
    let mut su = superuser(&app.db_name).await;
    sqlx::raw_sql(&format!(
        "ALTER TABLE usage_events DISABLE TRIGGER USER; ALTER TABLE ledger_tree DISABLE TRIGGER USER; \
         {sql}; ALTER TABLE usage_events ENABLE TRIGGER USER; ALTER TABLE ledger_tree ENABLE TRIGGER USER;"
    ))
    .execute(&mut su)
    .await
    .unwrap();
}

/// Rewrites the rows with a recomputed chain after `edit` (what an attacker with the database
/// but not the key can do); with `tree_too`, also rebuilds the stored tree to match.
async fn rewrite(
    app: &TestApp,
    edit: impl Fn(&mut teachd::ledger::UsageEvent, i64),
    tree_too: bool,
) {
    let mut prev = GENESIS;
    let mut sql = String::new();
    let mut hashes = Vec::new();
    for r in all_rows(app).await {
        let mut e = r.event.clone();
        edit(&mut e, r.id);
        let h = row_hash(&prev, r.id, &e);
        sql.push_str(&format!(
            "UPDATE usage_events SET status = {}, prev_hash = '\\x{}'::bytea, row_hash = '\\x{}'::bytea \
             WHERE id = {};",
            e.status,
            hex(&prev),
            hex(&h),
            r.id
        ));
        hashes.push(h);
        prev = h;
    }
    if tree_too {
        sql.push_str("DELETE FROM ledger_tree;");
        for (i, h) in MemStore::build(&hashes).0.iter().enumerate() {
            sql.push_str(&format!(
                "INSERT INTO ledger_tree VALUES ({i}, '\\x{}'::bytea);",
                hex(h)
            ));
        }
    }
    as_superuser(app, &sql).await;
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn an_intact_ledger_verifies_against_its_checkpoints_over_http_and_cli() {
    let (app, cp) = app_with_checkpoint().await;
    let (code, report) = audit_cli(&app, &[&cp]);
    assert_eq!((code, report["ok"].clone()), (0, json!(true)), "{report}");
    let r = app
        .admin(Method::POST, "/admin/audit/verify")
        .json(&json!({ "checkpoints": [cp.clone()] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["checkpoints_checked"], 1);
    // A checkpoint signed by another key, or a forged size, is named.
    let forged = cp.replacen('\n', "\n1", 1);
    let r = app
        .admin(Method::POST, "/admin/audit/verify")
        .json(&json!({ "checkpoints": [forged] }))
        .send()
        .await
        .unwrap();
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(kinds(&report), ["bad_signature"], "{report}");
}

#[tokio::test]
async fn deleting_the_newest_rows_is_named_truncated() {
    let (app, cp) = app_with_checkpoint().await;
    let n = app.row_count().await;
    as_superuser(
        &app,
        &format!("DELETE FROM usage_events WHERE id > {}", n - 3),
    )
    .await;
    // The chain alone still verifies: only the checkpoint shows it.
    let (code, report) = audit_cli(&app, &[]);
    assert_eq!((code, report["ok"].clone()), (0, json!(true)));
    let (code, report) = audit_cli(&app, &[&cp]);
    assert_eq!(code, 1);
    assert!(
        kinds(&report).contains(&"truncated".to_string()),
        "{report}"
    );
}

#[tokio::test]
async fn an_edited_row_with_a_recomputed_chain_is_named() {
    let (app, cp) = app_with_checkpoint().await;
    rewrite(
        &app,
        |e, id| {
            if id == 3 {
                e.status = 500;
            }
        },
        false,
    )
    .await;
    let (code, report) = audit_cli(&app, &[]);
    assert_eq!(
        (code, report["ok"].clone()),
        (0, json!(true)),
        "the chain was recomputed"
    );
    let (code, report) = audit_cli(&app, &[&cp]);
    assert_eq!(code, 1);
    let k = kinds(&report);
    assert!(k.contains(&"root_mismatch".to_string()), "{report}");
    assert!(k.contains(&"tree_mismatch".to_string()), "{report}");
    assert_eq!(report["first_bad_event_id"], 3, "{report}");
}

#[tokio::test]
async fn a_replaced_history_with_a_rebuilt_tree_is_named() {
    let (app, cp) = app_with_checkpoint().await;
    rewrite(
        &app,
        |e, id| {
            if id == 2 {
                e.status = 500;
            }
        },
        true,
    )
    .await;
    let (code, report) = audit_cli(&app, &[&cp]);
    assert_eq!(code, 1);
    assert_eq!(kinds(&report), ["root_mismatch"], "{report}");
}

#[tokio::test]
async fn two_processes_on_one_database_keep_one_tree() {
    let a = TestApp::spawn().await;
    let b = a.second().await;
    let (_, key) = a
        .teacher("acme", json!({"max_concurrent": 100, "rpm": 100000}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            a.url("/v1/models")
        } else {
            b.url("/v1/models")
        };
        let (http, key) = (a.http.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let cp_a = text(&a, "/v1/ledger/checkpoint", &key).await;
    let cp_b = text(&b, "/v1/ledger/checkpoint", &key).await;
    let (code, report) = audit_cli(&a, &[&cp_a, &cp_b]);
    assert_eq!((code, report["ok"].clone()), (0, json!(true)), "{report}");
    assert_eq!(report["tree_size"], a.row_count().await);
}
