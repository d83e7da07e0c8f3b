//! Batch jobs (issue 14) against the real server, Postgres and model: files and their owners,
//! a logprobs batch whose JSONL and Parquet outputs equal the interactive endpoint, bad lines
//! and malformed files, the quota reservation, cancellation, resumption after a restart, and
//! the `teachd batch` CLI.

use std::time::Duration;

use serde_json::{json, Value};

use crate::app::{error_of, Options, TestApp, MODEL, MODEL_PROHIBITED};

fn roomy() -> Value {
    json!({"rpm": 100000, "tpm": 100000000, "max_concurrent": 64, "daily_tokens": 1000000000i64})
}

/// A batch input line for `url` (no newline).
fn line_to(url: &str, custom_id: &str, body: &Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

fn line(custom_id: &str, body: Value) -> String {
    line_to("/v1/logprobs", custom_id, &body)
}

fn seq(i: u32, len: u32) -> Vec<u32> {
    (0..len).map(|j| 1 + (i * 131 + j * 17) % 4000).collect()
}

async fn upload(app: &TestApp, key: &str, bytes: Vec<u8>, name: &str) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
        );
    app.http
        .post(app.url("/v1/files"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn upload_ok(app: &TestApp, key: &str, text: &str) -> String {
    let r = upload(app, key, text.as_bytes().to_vec(), "in.jsonl").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn post_batch(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.post("/v1/batches", key, body).send().await.unwrap()
}

/// Creates the batch `body` asks for (200 asserted); its batch object.
async fn started(app: &TestApp, key: &str, body: Value) -> Value {
    let r = post_batch(app, key, body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

/// Starts a batch of `file` for `endpoint` with a 24 h window; its id.
async fn started_id(app: &TestApp, key: &str, file: &str, endpoint: &str) -> String {
    let b = started(
        app,
        key,
        json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"}),
    )
    .await;
    b["id"].as_str().unwrap().to_string()
}

async fn create(app: &TestApp, key: &str, file: &str, format: &str) -> reqwest::Response {
    post_batch(
        app,
        key,
        json!({"input_file_id": file, "endpoint": "/v1/logprobs", "completion_window": "24h",
               "output_format": format}),
    )
    .await
}

async fn create_ok(app: &TestApp, key: &str, file: &str, format: &str) -> Value {
    started(
        app,
        key,
        json!({"input_file_id": file, "endpoint": "/v1/logprobs", "completion_window": "24h",
               "output_format": format}),
    )
    .await
}

async fn batch(app: &TestApp, key: &str, id: &str) -> Value {
    let r = app
        .get(&format!("/v1/batches/{id}"), Some(key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Polls until the batch is in a final state.
async fn finished(app: &TestApp, key: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let b = batch(app, key, id).await;
        if ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap())
        {
            return b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "batch never finished: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn content(app: &TestApp, key: &str, file: &str) -> Vec<u8> {
    let r = app
        .get(&format!("/v1/files/{file}/content"), Some(key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap().to_vec()
}

fn jsonl(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn files_are_listed_read_and_deleted_by_their_owner_only() {
    let app = TestApp::spawn().await;
    let (_, key) = app.teacher("owner", roomy()).await;
    let (_, other) = app.teacher("other", roomy()).await;
    let text = line("a", json!({"model": MODEL, "token_ids": [1, 2, 3]})) + "\n";
    let id = upload_ok(&app, &key, &text).await;

    let f: Value = app
        .get(&format!("/v1/files/{id}"), Some(&key))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (f["object"].clone(), f["purpose"].clone()),
        (json!("file"), json!("batch"))
    );
    assert_eq!(f["bytes"], text.len());
    assert_eq!(content(&app, &key, &id).await, text.as_bytes());
    let list: Value = app
        .get("/v1/files", Some(&key))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // Another client sees nothing of it.
    let theirs: Value = app
        .get("/v1/files", Some(&other))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(theirs["data"].as_array().unwrap().is_empty());
    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        error_of(
            app.get(&path, Some(&other)).send().await.unwrap(),
            404,
            "not_found_error",
        )
        .await;
    }
    let del = app
        .http
        .delete(app.url(&format!("/v1/files/{id}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    error_of(del, 404, "not_found_error").await;
    error_of(
        create(&app, &other, &id, "jsonl").await,
        404,
        "not_found_error",
    )
    .await;

    // Uploads that are not batch files.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(text.clone().into_bytes()).file_name("x.jsonl"),
        );
    let r = app
        .http
        .post(app.url("/v1/files"))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    error_of(r, 400, "invalid_request_error").await;
    error_of(
        upload(&app, &key, vec![0xff, 0xfe], "bin").await,
        400,
        "invalid_request_error",
    )
    .await;

    let del = app
        .http
        .delete(app.url(&format!("/v1/files/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    assert_eq!(del.json::<Value>().await.unwrap()["deleted"], true);
    error_of(
        app.get(&format!("/v1/files/{id}"), Some(&key))
            .send()
            .await
            .unwrap(),
        404,
        "not_found_error",
    )
    .await;
}

#[tokio::test]
async fn uploads_over_the_line_cap_are_refused() {
    let app = TestApp::spawn_with(None, |c| c.batch.max_lines = 2).await;
    let (_, key) = app.teacher("capped", roomy()).await;
    let text: String = (0..3)
        .map(|i| line(&format!("l{i}"), json!({})) + "\n")
        .collect();
    let err = error_of(
        upload(&app, &key, text.into_bytes(), "in.jsonl").await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(
        err["message"].as_str().unwrap().contains("at most 2"),
        "{err}"
    );
}

/// The lines of the logprobs batch tests: two good ones, a bad one on line 3 (top_k over the
/// model's cap), a prompt line, and one for a model whose licence forbids distillation.
fn logprobs_lines() -> (Vec<Value>, String) {
    let bodies = vec![
        json!({"model": MODEL, "token_ids": seq(1, 12), "top_k": 4}),
        json!({"model": MODEL, "token_ids": seq(2, 9), "top_k": 4, "score_from": 3}),
        json!({"model": MODEL, "token_ids": seq(3, 9), "top_k": 4_000_000}),
        json!({"model": MODEL, "prompt": "The capital of France is Paris.", "top_k": 4}),
        json!({"model": MODEL_PROHIBITED, "token_ids": seq(5, 9), "top_k": 4}),
    ];
    let text = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| line(&format!("req-{}", i + 1), b.clone()) + "\n")
        .collect();
    (bodies, text)
}

#[tokio::test]
async fn a_logprobs_batch_equals_the_interactive_endpoint_in_jsonl_and_parquet() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("lab", roomy()).await;
    let (bodies, text) = logprobs_lines();
    let file = upload_ok(&app, &key, &text).await;
    let created = create_ok(&app, &key, &file, "jsonl").await;
    assert_eq!(created["status"], "in_progress", "{created}");
    assert_eq!(created["request_counts"]["total"], 5);
    let done = finished(&app, &key, created["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 3, "failed": 2})
    );
    assert_eq!(
        done["progress"]["scored_tokens"],
        done["progress"]["total_tokens"]
    );

    let mut interactive = Vec::new();
    for (i, body) in bodies
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2 && *i != 4)
    {
        let r = app
            .post("/v1/logprobs", &key, body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        interactive.push((format!("req-{}", i + 1), r.json::<Value>().await.unwrap()));
    }
    let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
    assert_eq!(out.len(), 3);
    for (o, (custom_id, want)) in out.iter().zip(&interactive) {
        assert_eq!(&o["custom_id"], custom_id);
        assert_eq!(o["response"]["status_code"], 200);
        assert_eq!(
            &o["response"]["body"], want,
            "line {custom_id} differs from /v1/logprobs"
        );
        // Each line is a ledger row of its own, under the batch's id.
        let request_id = o["response"]["request_id"].as_str().unwrap();
        assert!(request_id.starts_with(done["id"].as_str().unwrap()));
        let row = app.row(client, request_id).await;
        assert_eq!(
            (row.status, row.prompt_tokens),
            (200, want["usage"]["prompt_tokens"].as_i64().unwrap())
        );
    }
    let errors = jsonl(&content(&app, &key, done["error_file_id"].as_str().unwrap()).await);
    let found: Vec<_> = errors
        .iter()
        .map(|e| {
            (
                e["custom_id"].clone(),
                e["error"]["line"].clone(),
                e["response"]["status_code"].clone(),
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            (json!("req-3"), json!(3), json!(400)),
            (json!("req-5"), json!(5), json!(403))
        ]
    );
    assert_eq!(errors[1]["error"]["code"], "licence_forbids");
    assert_eq!(
        errors[1]["response"]["body"]["error"]["type"],
        "permission_error"
    );

    // The same file as a Parquet dataset: one row per sequence, the same numbers.
    let created = create_ok(&app, &key, &file, "parquet").await;
    let done = finished(&app, &key, created["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let bytes = content(&app, &key, done["output_file_id"].as_str().unwrap()).await;
    check_parquet(bytes, &interactive, done["id"].as_str().unwrap());
    // Billing: every token run through the teacher, once per batch; refused lines cost nothing.
    let per_run: i64 = interactive
        .iter()
        .map(|(_, r)| r["usage"]["prompt_tokens"].as_i64().unwrap())
        .sum();
    app.wait_tokens_used(client, 3 * per_run).await;
}

/// Runs the batch file `text` to completion; returns the finished batch and the raw passes it
/// added on each engine (scoring, generation), read from `/metrics`.
async fn run_counting(app: &TestApp, key: &str, text: &str) -> (Value, (u64, u64)) {
    let file = upload_ok(app, key, text).await;
    let before = app.raw_passes().await;
    let created = create_ok(app, key, &file, "jsonl").await;
    let done = finished(app, key, created["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let after = app.raw_passes().await;
    (done, (after.0 - before.0, after.1 - before.1))
}

/// With the generation engine idle and no interactive caller about, a batch runs two lines at
/// once, the second on the generation engine; the numbers are the same either way; right
/// after interactive calls it runs one line at a time; and a chat that arrives meanwhile still
/// gets exactly what it gets alone.
#[tokio::test]
async fn a_batch_runs_two_lines_at_once_on_an_idle_generation_engine() {
    // Engines of its own: no other test's generation keeps the generation engine busy.
    let app = TestApp::spawn_opts(
        Options {
            own_models: true,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let (_, key) = app.ready_teacher("pairs", roomy()).await;
    let bodies: Vec<Value> = (0..6)
        .map(|i| json!({"model": MODEL, "token_ids": seq(40 + i, 24 + 8 * i), "top_k": 5}))
        .collect();
    let text: String = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| line(&format!("p{i}"), b.clone()) + "\n")
        .collect();
    let (done, passes) = run_counting(&app, &key, &text).await;
    // Lines (1, 2), (3, 4), (5, 6): the second of each pair on the generation engine.
    assert_eq!(passes, (3, 3), "raw passes (scoring, generation)");
    let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
    assert_eq!(out.len(), 6);
    for (i, (o, body)) in out.iter().zip(&bodies).enumerate() {
        assert_eq!(o["custom_id"], format!("p{i}"));
        let want = app.post_ok("/v1/logprobs", &key, body.clone()).await;
        assert_eq!(
            o["response"]["body"],
            want,
            "line {i} (on the {} engine) differs from /v1/logprobs",
            if i % 2 == 1 { "generation" } else { "scoring" }
        );
    }

    // Interactive calls were just made: for `engine.spare_quiet_ms` (5 s) the batch leaves the
    // generation engine alone and runs one line at a time.
    let (_, passes) = run_counting(&app, &key, &text).await;
    assert_eq!(
        passes,
        (6, 0),
        "right after interactive calls: raw passes (scoring, generation)"
    );

    // A chat sent while a batch may hold the generation engine waits for that pass, then is
    // answered as it is alone (greedy, so the same tokens and logprobs); once the interactive
    // calls stop, the batch pairs its lines again.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let alone = app
        .post_ok("/v1/chat/completions", &key, chat.clone())
        .await;
    let file = upload_ok(&app, &key, &many_lines(30, 200)).await;
    let paired_before = app.raw_passes().await.1;
    let created = create_ok(&app, &key, &file, "jsonl").await;
    let mut beside = Vec::new();
    for _ in 0..4 {
        beside.push(
            app.post_ok("/v1/chat/completions", &key, chat.clone())
                .await,
        );
    }
    let done = finished(&app, &key, created["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 30, "{done}");
    for r in beside {
        assert_eq!(
            r["choices"][0]["message"], alone["choices"][0]["message"],
            "{r}"
        );
        assert_eq!(
            r["choices"][0]["logprobs"], alone["choices"][0]["logprobs"],
            "{r}"
        );
    }
    let paired = app.raw_passes().await.1 - paired_before;
    assert!(paired > 0, "no line paired after the chats stopped");
}

#[tokio::test]
async fn a_large_parquet_output_is_sharded_in_row_order() {
    // One row per row group and a 1-byte shard size: every row is a shard of its own.
    let app = TestApp::with_model(|c| {
        c.batch.parquet_row_group_rows = 1;
        c.batch.parquet_shard_bytes = 1;
    })
    .await;
    let (_, key) = app.ready_teacher("sharded", roomy()).await;
    let bodies: Vec<Value> = (0..4)
        .map(|i| json!({"model": MODEL, "token_ids": seq(20 + i, 6 + i), "top_k": 4}))
        .collect();
    let text: String = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| line(&format!("s{i}"), b.clone()) + "\n")
        .collect();
    let file = upload_ok(&app, &key, &text).await;
    let created = create_ok(&app, &key, &file, "parquet").await;
    let id = created["id"].as_str().unwrap().to_string();
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let shards: Vec<String> = done["output_file_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(shards.len(), 4, "{done}");
    assert_eq!(done["output_file_id"], json!(shards[0]));
    for (i, (shard, body)) in shards.iter().zip(&bodies).enumerate() {
        let meta: Value = app
            .get(&format!("/v1/files/{shard}"), Some(&key))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            meta["filename"],
            format!("{id}_output-{i:05}-of-00004.parquet")
        );
        let want: Value = app
            .post("/v1/logprobs", &key, body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let bytes = content(&app, &key, shard).await;
        let (_, kv) = parquet_reader(bytes.clone());
        assert_eq!(kv["teachd.shard_index"], i.to_string());
        assert_eq!(kv["teachd.shard_first_row"], i.to_string());
        check_parquet(bytes, &[(format!("s{i}"), want)], &id);
    }
    // The CLI downloads every shard.
    let out = tempfile::tempdir().unwrap();
    let (dir, server) = (out.path().to_path_buf(), app.url(""));
    let (id2, key2) = (id.clone(), key.clone());
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_teachd"))
            .args(["batch", "download", &id2, "--out"])
            .arg(&dir)
            .args(["--server", &server, "--key", &key2])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.status.success(), "{status:?}");
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        (0..4)
            .map(|i| format!("{id}_output-{i:05}-of-00004.parquet"))
            .collect::<Vec<_>>()
    );
}

/// A Parquet file's reader and its key-value metadata.
fn parquet_reader(
    bytes: Vec<u8>,
) -> (
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<bytes::Bytes>,
    std::collections::HashMap<String, String>,
) {
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes),
    )
    .unwrap();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
        .collect();
    (builder, kv)
}

/// The numbers of a Parquet output: (token_logprobs, top_ids, top_logprobs) of every row.
type Numbers = Vec<(Vec<f32>, Vec<Vec<u32>>, Vec<Vec<f32>>)>;

fn parquet_numbers(bytes: Vec<u8>) -> (Numbers, std::collections::HashMap<String, String>) {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type};
    use arrow_array::Array;
    let (builder, kv) = parquet_reader(bytes);
    let mut out = Vec::new();
    for b in builder.build().unwrap() {
        let b = b.unwrap();
        for row in 0..b.num_rows() {
            let list = |name: &str| b.column_by_name(name).unwrap().as_list::<i32>().value(row);
            let lps = list("token_logprobs")
                .as_primitive::<Float32Type>()
                .values()
                .to_vec();
            let ids = list("top_ids");
            let ids = ids.as_fixed_size_list();
            let top = list("top_logprobs");
            let top = top.as_fixed_size_list();
            out.push((
                lps,
                (0..ids.len())
                    .map(|j| ids.value(j).as_primitive::<UInt32Type>().values().to_vec())
                    .collect(),
                (0..top.len())
                    .map(|j| top.value(j).as_primitive::<Float32Type>().values().to_vec())
                    .collect(),
            ));
        }
    }
    (out, kv)
}

#[tokio::test]
async fn rounded_top_logprobs_make_a_smaller_parquet_and_keep_the_token_logprobs() {
    let app = TestApp::with_model(|_| {}).await;
    let (_, key) = app.ready_teacher("compact", roomy()).await;
    let text: String = (0..3)
        .map(|i| {
            line(
                &format!("r{i}"),
                json!({"model": MODEL, "token_ids": seq(40 + i, 48), "top_k": 64}),
            ) + "\n"
        })
        .collect();
    let file = upload_ok(&app, &key, &text).await;
    let mut runs = Vec::new();
    for bits in [23, 8] {
        let created = started(
            &app,
            &key,
            json!({"input_file_id": file, "endpoint": "/v1/logprobs",
                   "completion_window": "24h", "output_format": "parquet",
                   "top_logprobs_mantissa_bits": bits}),
        )
        .await;
        assert_eq!(created["top_logprobs_mantissa_bits"], bits);
        let done = finished(&app, &key, created["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done}");
        let bytes = content(&app, &key, done["output_file_id"].as_str().unwrap()).await;
        let size = bytes.len();
        let (numbers, kv) = parquet_numbers(bytes);
        assert_eq!(kv["top_logprobs_mantissa_bits"], bits.to_string());
        runs.push((size, numbers));
    }
    let (exact_size, exact) = &runs[0];
    let (small_size, small) = &runs[1];
    assert!(small_size < exact_size, "{small_size} >= {exact_size}");
    assert_eq!(exact.len(), 3);
    for ((lp, ids, top), (lp8, ids8, top8)) in exact.iter().zip(small) {
        assert_eq!(lp, lp8, "token_logprobs are never rounded");
        assert_eq!(ids, ids8);
        for (a, b) in top.iter().flatten().zip(top8.iter().flatten()) {
            assert!((a - b).abs() <= a.abs() / 512.0, "{a} vs {b}");
            assert_eq!(
                b.to_bits() & 0x7fff,
                0,
                "{b} keeps more than 8 mantissa bits"
            );
        }
    }
    // Only for Parquet outputs, and only 1 to 23 bits.
    for (format, bits) in [("jsonl", 8), ("parquet", 0), ("parquet", 24)] {
        let r = post_batch(
            &app,
            &key,
            json!({"input_file_id": file, "endpoint": "/v1/logprobs",
                   "completion_window": "24h", "output_format": format,
                   "top_logprobs_mantissa_bits": bits}),
        )
        .await;
        let e = error_of(r, 400, "invalid_request_error").await;
        assert_eq!(e["param"], "top_logprobs_mantissa_bits", "{e}");
    }
}

fn check_parquet(bytes: Vec<u8>, want: &[(String, Value)], batch_id: &str) {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type};
    use arrow_array::Array;
    let (builder, kv) = parquet_reader(bytes);
    assert_eq!(kv["teachd.batch_id"], batch_id);
    assert_eq!(kv["model"], MODEL);
    assert_eq!(kv["top_k"], "4");
    assert_eq!(
        kv["weights_sha256"],
        want[0].1["teacher"]["weights_sha256"].as_str().unwrap()
    );
    assert!(
        !kv["ledger_first_id"].is_empty() && !kv["tos_version"].is_empty(),
        "{kv:?}"
    );
    let batches: Vec<_> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, want.len());
    let b = &batches[0];
    let f32s = |name: &str, row: usize| -> Vec<f32> {
        b.column_by_name(name)
            .unwrap()
            .as_list::<i32>()
            .value(row)
            .as_primitive::<Float32Type>()
            .values()
            .to_vec()
    };
    let u32s = |name: &str, row: usize| -> Vec<u32> {
        b.column_by_name(name)
            .unwrap()
            .as_list::<i32>()
            .value(row)
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec()
    };
    let as_f32 = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for (row, (custom_id, r)) in want.iter().enumerate() {
        assert_eq!(
            b.column_by_name("custom_id")
                .unwrap()
                .as_string::<i32>()
                .value(row),
            custom_id
        );
        assert_eq!(json!(u32s("token_ids", row)), r["token_ids"]);
        assert_eq!(json!(u32s("token_ranks", row)), r["token_ranks"]);
        assert_eq!(f32s("token_logprobs", row), as_f32(&r["token_logprobs"]));
        assert_eq!(f32s("entropy", row), as_f32(&r["entropy"]));
        assert_eq!(f32s("tail_logmass", row), as_f32(&r["tail_logmass"]));
        let top = b
            .column_by_name("top_ids")
            .unwrap()
            .as_list::<i32>()
            .value(row);
        let top = top.as_fixed_size_list();
        let top_lp = b
            .column_by_name("top_logprobs")
            .unwrap()
            .as_list::<i32>()
            .value(row);
        let top_lp = top_lp.as_fixed_size_list();
        assert_eq!(top.len(), r["top_ids"].as_array().unwrap().len());
        for j in 0..top.len() {
            assert_eq!(
                json!(top.value(j).as_primitive::<UInt32Type>().values().to_vec()),
                r["top_ids"][j]
            );
            assert_eq!(
                top_lp
                    .value(j)
                    .as_primitive::<Float32Type>()
                    .values()
                    .to_vec(),
                as_f32(&r["top_logprobs"][j])
            );
        }
    }
}

#[tokio::test]
async fn a_malformed_file_fails_the_batch_with_line_numbers() {
    let app = TestApp::spawn().await;
    let (client, key) = app.teacher("sloppy", roomy()).await;
    let text = [
        line("a", json!({"model": MODEL, "token_ids": [1, 2, 3]})),
        "{not json".to_string(),
        line("a", json!({"model": MODEL, "token_ids": [1, 2, 3]})),
    ]
    .join("\n");
    let file = upload_ok(&app, &key, &text).await;
    let b = create_ok(&app, &key, &file, "jsonl").await;
    assert_eq!(b["status"], "failed", "{b}");
    let errors = b["errors"]["data"].as_array().unwrap();
    let found: Vec<(Value, Value)> = errors
        .iter()
        .map(|e| (e["code"].clone(), e["line"].clone()))
        .collect();
    assert_eq!(
        found,
        vec![
            (json!("invalid_json_line"), json!(2)),
            (json!("duplicate_custom_id"), json!(3))
        ]
    );
    assert_eq!(
        app.tokens_used(client).await,
        0,
        "a failed batch reserves nothing"
    );
}

#[tokio::test]
async fn a_batch_over_the_daily_quota_is_refused_before_it_runs() {
    let app = TestApp::with_model(|_| {}).await;
    let limits = json!({"rpm": 1000, "tpm": 1000000, "max_concurrent": 8, "daily_tokens": 30});
    let (client, key) = app.ready_teacher("thrifty", limits).await;
    // 2 x 20 tokens: each line fits the quota alone, the job does not.
    let text: String = (0..2)
        .map(|i| {
            line(
                &format!("q{i}"),
                json!({"model": MODEL, "token_ids": seq(i, 20), "top_k": 2}),
            ) + "\n"
        })
        .collect();
    let file = upload_ok(&app, &key, &text).await;
    let err = error_of(
        create(&app, &key, &file, "jsonl").await,
        429,
        "insufficient_quota",
    )
    .await;
    assert_eq!(err["code"], "insufficient_quota");
    assert_eq!(app.tokens_used(client).await, 0);
    let list: Value = app
        .get("/v1/batches", Some(&key))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list["data"].as_array().unwrap().is_empty(), "{list}");
}

fn many_lines(n: u32, len: u32) -> String {
    (0..n)
        .map(|i| {
            line(
                &format!("m{i}"),
                json!({"model": MODEL, "token_ids": seq(i, len), "top_k": 2}),
            ) + "\n"
        })
        .collect()
}

#[tokio::test]
async fn a_cancelled_batch_stops_keeps_its_output_and_refunds_the_rest() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("fickle", roomy()).await;
    let file = upload_ok(&app, &key, &many_lines(300, 16)).await;
    let b = create_ok(&app, &key, &file, "jsonl").await;
    let id = b["id"].as_str().unwrap();
    let r = app
        .post(&format!("/v1/batches/{id}/cancel"), &key, json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let done = finished(&app, &key, id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let completed = done["request_counts"]["completed"].as_i64().unwrap();
    assert!(completed < 300, "{done}");
    if completed > 0 {
        let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
        assert_eq!(out.len() as i64, completed);
    }
    // Charged for the lines that ran, refunded the rest of the reservation.
    app.wait_tokens_used(client, completed * 16).await;
    let list: Value = app
        .get("/v1/batches?limit=1", Some(&key))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], id);
}

#[tokio::test]
async fn a_restarted_server_resumes_the_batch_without_losing_or_repeating_a_line() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("patient", roomy()).await;
    let n = 40;
    let file = upload_ok(&app, &key, &many_lines(n, 24)).await;
    let b = create_ok(&app, &key, &file, "jsonl").await;
    let id = b["id"].as_str().unwrap().to_string();
    loop {
        let b = batch(&app, &key, &id).await;
        if b["request_counts"]["completed"].as_i64().unwrap() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let app = app.restart().await;
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
    let ids: Vec<String> = out
        .iter()
        .map(|o| o["custom_id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want, "every line exactly once, in order");
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE client_id = $1 AND request_id LIKE $2",
    )
    .bind(client)
    .bind(format!("{id}:%"))
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(rows, n as i64, "one ledger row per line");
    app.wait_tokens_used(client, n as i64 * 24).await;
}

#[tokio::test]
async fn the_cli_submits_follows_and_downloads() {
    let app = TestApp::with_model(|_| {}).await;
    let (_, key) = app.ready_teacher("cli", roomy()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, many_lines(3, 10)).unwrap();
    let out = dir.path().join("out");
    let (server, k, i, o) = (app.url(""), key.clone(), input.clone(), out.clone());
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_teachd"))
            .args(["batch", "submit"])
            .arg(&i)
            .args([
                "--endpoint",
                "/v1/logprobs",
                "--top-k",
                "3",
                "--format",
                "parquet",
                "--server",
                &server,
                "--key",
                &k,
                "--out",
            ])
            .arg(&o)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let printed = String::from_utf8(run.stdout).unwrap();
    let path = printed
        .lines()
        .next()
        .expect("the CLI prints the output's path");
    assert!(path.ends_with("_output.parquet"), "{printed}");
    let (reader, kv) = parquet_reader(std::fs::read(path).unwrap());
    assert_eq!(kv["top_k"], "3", "--top-k applied");
    let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn a_parquet_input_runs_with_the_batch_metadata_and_streams_its_progress() {
    use arrow_array::builder::{ListBuilder, UInt32Builder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let app = TestApp::with_model(|_| {}).await;
    let (_, key) = app.ready_teacher("columnar", roomy()).await;
    let seqs: Vec<Vec<u32>> = (0..3).map(|i| seq(10 + i, 8 + i)).collect();
    let mut ids = ListBuilder::new(UInt32Builder::new());
    for s in &seqs {
        ids.values().append_slice(s);
        ids.append(true);
    }
    let batch = RecordBatch::try_from_iter([
        (
            "custom_id",
            Arc::new(StringArray::from(vec!["p0", "p1", "p2"])) as ArrayRef,
        ),
        ("input_ids", Arc::new(ids.finish()) as ArrayRef),
    ])
    .unwrap();
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let r = upload(&app, &key, bytes, "in.parquet").await;
    assert_eq!(r.status(), 200);
    let f: Value = r.json().await.unwrap();
    assert_eq!(f["format"], "parquet");
    let created = started(
        &app,
        &key,
        json!({"input_file_id": f["id"], "endpoint": "/v1/logprobs", "completion_window": "24h",
               "metadata": {"model": MODEL, "top_k": "3", "score_from": "2"}}),
    )
    .await;
    let id = created["id"].as_str().unwrap();

    // Live progress: batch objects as they change, ending with the completed one.
    let events = app
        .get(&format!("/v1/batches/{id}/events"), Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(events.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = events.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let objects: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let scored: Vec<i64> = objects
        .iter()
        .map(|o| o["progress"]["scored_tokens"].as_i64().unwrap())
        .collect();
    assert!(scored.windows(2).all(|w| w[0] <= w[1]), "{scored:?}");
    let last = objects.last().unwrap();
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(
        last["progress"]["scored_tokens"],
        last["progress"]["total_tokens"]
    );
    // The console's overview shows the same token progress (issue 15).
    let console = crate::console::Console::sign_in(&app).await;
    let (status, html) = console.get("/console").await;
    assert_eq!(status, 200);
    let total = last["progress"]["total_tokens"].as_i64().unwrap();
    assert!(
        html.contains(&format!("<td class=\"tokens\">{total} / {total}</td>")),
        "token progress on the overview: {html}"
    );

    let out = jsonl(&content(&app, &key, last["output_file_id"].as_str().unwrap()).await);
    assert_eq!(out.len(), 3);
    for (i, (o, s)) in out.iter().zip(&seqs).enumerate() {
        assert_eq!(o["custom_id"], format!("p{i}"));
        let want: Value = app
            .post(
                "/v1/logprobs",
                &key,
                json!({"model": MODEL, "token_ids": s, "top_k": 3, "score_from": 2}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(o["response"]["body"], want);
    }
}

#[tokio::test]
async fn lines_not_run_within_the_completion_window_expire() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("late", roomy()).await;
    let file = upload_ok(&app, &key, &many_lines(400, 32)).await;
    let created = started(
        &app,
        &key,
        json!({"input_file_id": file, "endpoint": "/v1/logprobs", "completion_window": "1s"}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["status"], "expired", "{done}");
    let counts = &done["request_counts"];
    let completed = counts["completed"].as_i64().unwrap();
    assert_eq!(
        completed + counts["failed"].as_i64().unwrap(),
        400,
        "{done}"
    );
    let errors = jsonl(&content(&app, &key, done["error_file_id"].as_str().unwrap()).await);
    assert_eq!(errors.len() as i64, 400 - completed);
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_expired"));
    app.wait_tokens_used(client, completed * 32).await;
}

#[tokio::test]
async fn a_completions_batch_answers_like_the_endpoint_and_bills_what_ran() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("vllm-style", roomy()).await;
    let bodies = [
        // A vLLM teacher pipeline's prompt-logprobs request.
        json!({"model": MODEL, "prompt": [seq(7, 10)], "max_tokens": 0, "echo": true, "prompt_logprobs": 3}),
        // A greedy generation with logprobs.
        json!({"model": MODEL, "prompt": "Name three colours:", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
        json!({"model": MODEL, "prompt": "hi", "stream": true}),
    ];
    let text: String = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| line_to("/v1/completions", &format!("c{i}"), b) + "\n")
        .collect();
    let file = upload_ok(&app, &key, &text).await;
    let id = started_id(&app, &key, &file, "/v1/completions").await;
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );
    let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
    let billed: i64 = out
        .iter()
        .map(|o| {
            o["response"]["body"]["usage"]["total_tokens"]
                .as_i64()
                .unwrap()
        })
        .sum();
    // Billed what ran; the unused part of each generation's max_tokens refunded.
    app.wait_tokens_used(client, billed).await;
    let errors = jsonl(&content(&app, &key, done["error_file_id"].as_str().unwrap()).await);
    assert_eq!(errors[0]["error"]["line"], 3);
    for (o, body) in out.iter().zip(&bodies) {
        let mut want: Value = app
            .post("/v1/completions", &key, body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut got = o["response"]["body"].clone();
        for v in [&mut want, &mut got] {
            v.as_object_mut().unwrap().remove("id");
            v.as_object_mut().unwrap().remove("created");
        }
        assert_eq!(got, want, "{}", o["custom_id"]);
    }
}

#[tokio::test]
async fn a_chat_batch_answers_like_the_endpoint() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("chatty", roomy()).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let text = line_to("/v1/chat/completions", "chat-1", &body);
    let file = upload_ok(&app, &key, &text).await;
    let id = started_id(&app, &key, &file, "/v1/chat/completions").await;
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["request_counts"]["completed"], 1, "{done}");
    let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
    let mut got = out[0]["response"]["body"].clone();
    app.wait_tokens_used(client, got["usage"]["total_tokens"].as_i64().unwrap())
        .await;
    let mut want: Value = app
        .post("/v1/chat/completions", &key, body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for v in [&mut want, &mut got] {
        v.as_object_mut().unwrap().remove("id");
        v.as_object_mut().unwrap().remove("created");
    }
    assert_eq!(got, want);
}

/// `pg_try_advisory_lock(namespace, hashtext(batch id))` on a connection of its own: what a
/// second `teachd serve` process would try before running the batch.
async fn other_process_claims(db: &sqlx::PgPool, id: &str) -> bool {
    let mut conn = db.acquire().await.unwrap().detach();
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(teachd::batch::runner::CLAIM_NAMESPACE)
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_running_batch_is_claimed_by_one_process_and_released_when_done() {
    let app = TestApp::with_model(|_| {}).await;
    let (_, key) = app.ready_teacher("claimed", roomy()).await;
    let file = upload_ok(&app, &key, &many_lines(40, 16)).await;
    let b = create_ok(&app, &key, &file, "jsonl").await;
    let id = b["id"].as_str().unwrap().to_string();
    loop {
        let b = batch(&app, &key, &id).await;
        if b["request_counts"]["completed"].as_i64().unwrap() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !other_process_claims(&app.db, &id).await,
        "a second process could take a batch that is running"
    );
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !other_process_claims(&app.db, &id).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the finished batch's claim was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real binary, SIGKILLed mid-batch, then started again on the same database and data
/// directory: the batch completes with every line exactly once.
#[tokio::test]
async fn a_sigkilled_server_resumes_the_batch_without_losing_or_repeating_a_line() {
    use crate::ledger::process::{spawn_server, start_server, Server};
    let data = tempfile::tempdir().unwrap();
    // An empty config file: the embedded default, model included.
    let cfg = data.path().join("teachd.toml");
    std::fs::write(&cfg, "").unwrap();
    let env = vec![
        ("TEACHD_CONFIG", cfg.display().to_string()),
        (
            "TEACHD__BATCH__DATA_DIR",
            data.path().join("batch").display().to_string(),
        ),
    ];
    let mut first: Server = start_server(&env).await;
    let http = reqwest::Client::new();
    let key = first.key.clone();
    let r = http
        .post(format!("{}/v1/tos/accept", first.base))
        .bearer_auth(&key)
        .json(
            &json!({"version": "v1", "purpose": "tests", "student_model": "none",
                      "commercial": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let n = 60;
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(many_lines(n, 24).into_bytes()).file_name("in.jsonl"),
        );
    let f: Value = http
        .post(format!("{}/v1/files", first.base))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b: Value = http
        .post(format!("{}/v1/batches", first.base))
        .bearer_auth(&key)
        .json(
            &json!({"input_file_id": f["id"], "endpoint": "/v1/logprobs",
                      "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    let status = |base: String, key: String, id: String| async move {
        reqwest::Client::new()
            .get(format!("{base}/v1/batches/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    loop {
        let b = status(first.base.clone(), key.clone(), id.clone()).await;
        if b["request_counts"]["completed"].as_i64().unwrap() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child.kill().unwrap(); // SIGKILL, mid-line most likely
    first.child.wait().unwrap();
    // Keep the database for the second life.
    let db_name = std::mem::take(&mut first.db_name);
    drop(first);
    let url = format!("{}/{db_name}", crate::app::pg_server());
    let second = spawn_server(url, db_name, &env).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let done = loop {
        let b = status(second.base.clone(), key.clone(), id.clone()).await;
        if b["status"] == "completed" {
            break b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never finished: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["request_counts"]["completed"], n, "{done}");
    let out = http
        .get(format!(
            "{}/v1/files/{}/content",
            second.base,
            done["output_file_id"].as_str().unwrap()
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let ids: Vec<String> = jsonl(&out)
        .iter()
        .map(|o| o["custom_id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want, "every line exactly once, in order");
}

#[tokio::test]
async fn a_judgments_batch_answers_like_the_endpoint_and_refuses_bad_lines() {
    let app = TestApp::with_model(|_| {}).await;
    let (client, key) = app.ready_teacher("judge", roomy()).await;
    let absolute = json!({"model": MODEL, "mode": "absolute",
        "instruction": "What is the capital of France?", "response": "Paris", "reference": "Paris",
        "rubric": {"criteria": "Is the answer correct?", "scale": [1, 5]}});
    let pairwise = json!({"model": MODEL, "mode": "pairwise", "instruction": "What is 2 + 2?",
        "responses": ["4", "5"]});
    let bad =
        json!({"model": MODEL, "mode": "pairwise", "instruction": "x", "responses": ["only one"]});
    let items = json!({"model": MODEL, "items": [absolute.clone()]});
    let text: String = [
        ("j-abs", &absolute),
        ("j-pair", &pairwise),
        ("j-bad", &bad),
        ("j-items", &items),
    ]
    .iter()
    .map(|(id, body)| line_to("/v1/judgments", id, body) + "\n")
    .collect();
    let file = upload_ok(&app, &key, &text).await;
    let id = started_id(&app, &key, &file, "/v1/judgments").await;
    let done = finished(&app, &key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    let out = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await);
    assert_eq!(out.len(), 2);
    let batch_cost = crate::app::tokens_used(&app.db, client).await;
    assert!(batch_cost > 0);
    for (o, body) in out.iter().zip([&absolute, &pairwise]) {
        let want: Value = app
            .post("/v1/judgments", &key, body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(o["response"]["body"], want, "{}", o["custom_id"]);
    }
    // Both bad lines are in the error file with their line numbers, and cost nothing.
    let errors = jsonl(&content(&app, &key, done["error_file_id"].as_str().unwrap()).await);
    let bad_ids: Vec<&str> = errors
        .iter()
        .map(|e| e["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(bad_ids, ["j-bad", "j-items"], "{errors:?}");
    // The two interactive calls cost what the batch's two lines cost; the bad lines nothing.
    app.wait_tokens_used(client, 2 * batch_cost).await;
    let judged: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(judgments), 0)::int8 FROM usage_events WHERE client_id = $1 AND request_id LIKE $2",
    )
    .bind(client)
    .bind(format!("{id}:%"))
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(judged, 2, "one judgment per ledger row of the batch");
    let unsized_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE client_id = $1 AND request_id LIKE $2 AND response_bytes = 0",
    )
    .bind(client)
    .bind(format!("{id}:%"))
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        unsized_rows, 0,
        "every batch line's row records the bytes it served"
    );
}
