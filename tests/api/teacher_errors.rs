//! Every bad input gets its status and error type, and the engine keeps serving afterwards.

use serde_json::{json, Value};

use crate::helpers::{client, post, post_json, shared, with_auth, MODEL};

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["type"], want_type, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(body["error"].get("request_id").is_some());
}

#[tokio::test]
async fn bad_logprobs_inputs_are_refused_clearly() {
    let cases = [
        (
            json!({"model": MODEL, "token_ids": []}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 49152]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2], "prompt": "x"}),
            400,
            "invalid_request_error",
        ),
        (json!({"model": MODEL}), 400, "invalid_request_error"),
        (
            json!({"model": MODEL, "prompt": ""}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2, 3], "top_k": 49153}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2, 3], "score_from": 0}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2, 3], "score_from": 3}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2, 3], "temperature": 0}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2, 3], "temperature": -1.0}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, 2, 3], "nope": 1}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, -2]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "no-such-model", "token_ids": [1, 2]}),
            404,
            "not_found_error",
        ),
        (
            json!({"model": MODEL, "token_ids": vec![1u32; 8193]}),
            413,
            "invalid_request_error",
        ),
    ];
    for (req, status, kind) in cases {
        let (got, body) = post_json("/v1/logprobs", req.clone()).await;
        assert_error(got, &body, status, kind);
        if status == 413 {
            assert_eq!(body["error"]["code"], "context_length_exceeded");
        }
        if req.get("top_k").is_some()
            || req.get("score_from").is_some()
            || req.get("temperature").is_some()
        {
            assert!(body["error"]["param"].is_string(), "{body}");
        }
    }
    let (status, _) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "token_ids": [1, 2, 3]}),
    )
    .await;
    assert_eq!(status, 200, "the engine survives bad input");
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_the_envelope() {
    let s = shared();
    let resp = with_auth(client().post(s.url("/v1/logprobs")))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Three times the 4 MiB limit, more than the kernel's socket buffers hold: a server that
    // answered without reading the rest would close on unread bytes, and the client, still
    // writing, would get a reset instead of the 413 (the flaky failure this test once had).
    let huge = format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"{}\"}}",
        "a".repeat(12 * 1024 * 1024)
    );
    // Declared with content-length: refused before reading, the rest drained.
    assert_too_large(reqwest::Body::from(huge.clone())).await;
    // Chunked, with no length: found too large while reading, the rest drained.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge
        .into_bytes()
        .chunks(256 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    assert_too_large(reqwest::Body::wrap_stream(futures::stream::iter(chunks))).await;

    // A plain HTTP/1.1 client that sends its whole body before it reads (as curl and most
    // SDKs do): every byte must be accepted, then the 413 read. A server that closed on unread
    // bytes resets the connection, and the writes or the read below fail.
    let (status, body) = send_whole_then_read(&s.addr.to_string(), 12 * 1024 * 1024).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");

    // The server still serves.
    let (status, _) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "token_ids": [1, 2, 3]}),
    )
    .await;
    assert_eq!(status, 200);
}

/// POSTs `body` to `/v1/logprobs`; the client must get the 413 envelope, not a broken
/// connection.
async fn assert_too_large(body: reqwest::Body) {
    let resp = with_auth(client().post(shared().url("/v1/logprobs")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the client gets an answer, not a broken connection");
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "body_too_large");
}

/// POSTs a `len`-byte JSON body to `/v1/logprobs` over a raw connection, writing all of it
/// before reading anything; returns the status and the response text.
async fn send_whole_then_read(addr: &str, len: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/logprobs HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n",
        shared().teacher_key
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        conn.write_all(&chunk[..n])
            .await
            .unwrap_or_else(|e| panic!("the server reset the upload after {sent} bytes: {e}"));
        sent += n;
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Up to the end of the JSON body (the server keeps the connection open after draining).
    loop {
        let n = conn
            .read(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("reading the answer failed: {e}"));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if n == 0 || text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

#[tokio::test]
async fn bad_generation_inputs_are_refused_clearly() {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"model": MODEL, "messages": []}), 400),
        (
            json!({"model": MODEL, "messages": msgs, "top_logprobs": 3}),
            400,
        ),
        (
            json!({"model": MODEL, "messages": msgs, "logprobs": true, "top_logprobs": 49153}),
            400,
        ),
        (
            json!({"model": MODEL, "messages": msgs, "temperature": -0.5}),
            400,
        ),
        (json!({"model": MODEL, "messages": msgs, "top_p": 0}), 400),
        (json!({"model": MODEL, "messages": msgs, "n": 2}), 400),
        (
            json!({"model": MODEL, "messages": msgs, "max_tokens": -1}),
            400,
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
        ),
        (json!({"model": "nope", "messages": msgs}), 404),
        (
            json!({"model": MODEL, "messages": msgs, "max_tokens": 9000}),
            400,
        ),
    ];
    for (req, status) in cases {
        let (got, body) = post_json("/v1/chat/completions", req).await;
        assert_eq!(got, status, "{body}");
        assert!(body["error"]["type"].is_string());
    }
    let cases = [
        (json!({"model": MODEL, "prompt": [], "max_tokens": 1}), 400),
        (
            json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 0}),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": [1, 99999], "max_tokens": 1}),
            400,
        ),
        (json!({"model": MODEL, "prompt": {"x": 1}}), 400),
        (
            json!({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": vec![1u32; 8190], "max_tokens": 10}),
            413,
        ),
    ];
    for (req, status) in cases {
        let (got, body) = post_json("/v1/completions", req).await;
        assert_eq!(got, status, "{body}");
    }
    // OpenAI-compatible endpoints ignore unknown fields (SDKs send extras).
    let (status, body) = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": msgs, "max_tokens": 2, "user": "x", "some_sdk_extra": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let (_, headers, _) = post(
        "/v1/logprobs",
        json!({"model": "missing", "token_ids": [1, 2]}),
    )
    .await;
    let id = headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    let s = shared();
    let resp = with_auth(client().post(s.url("/v1/logprobs")))
        .header("x-request-id", "train-step-0042")
        .json(&json!({"model": "missing", "token_ids": [1, 2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "train-step-0042");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "train-step-0042");
}
