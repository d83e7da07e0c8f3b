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

    let huge = format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"{}\"}}",
        "a".repeat(5 * 1024 * 1024)
    );
    let resp = with_auth(client().post(s.url("/v1/logprobs")))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
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
