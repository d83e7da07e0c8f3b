//! The Python clients a pipeline really uses, against the real server: the unmodified `openai`
//! SDK runs batches (files, batches, polling, content, cancel) and pyarrow reads the Parquet
//! output, every value checked against `/v1/logprobs` (tests/py/sdk_batch.py; the pinned
//! libraries come from scripts/ensure-pytools.sh, which this test runs).

use std::process::Command;

use serde_json::json;

use crate::app::{TestApp, MODEL};

/// The venv's python, installed (and cached) by scripts/ensure-pytools.sh.
fn python() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/ensure-pytools.sh"))
        .output()
        .expect("running scripts/ensure-pytools.sh");
    assert!(
        out.status.success(),
        "scripts/ensure-pytools.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn the_openai_sdk_runs_a_batch_and_pyarrow_reads_its_parquet() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let app = TestApp::with_model(|_| {}).await;
    let (_, key) = app
        .ready_teacher(
            "sdk",
            json!({"rpm": 100000, "tpm": 100000000, "max_concurrent": 64,
                   "daily_tokens": 1000000000i64}),
        )
        .await;
    let script = format!("{}/tests/py/sdk_batch.py", env!("CARGO_MANIFEST_DIR"));
    let server = app.url("");
    let out = tokio::process::Command::new(&python)
        .args([
            &script, "--server", &server, "--key", &key, "--model", MODEL,
        ])
        .output()
        .await
        .expect("running tests/py/sdk_batch.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "tests/py/sdk_batch.py failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("sdk_batch: ok"), "{stdout}");
}
