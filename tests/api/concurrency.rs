//! Many clients at once on one model (issue 11): teacher forcing of equal and different
//! lengths, generations with logprobs, streams and clients that hang up, a few hundred
//! requests in all. Every answer equals the same request's answer on an otherwise idle
//! engine, nothing is stuck, and the engine serves on at the end.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::helpers::{client, post, post_json, shared, with_auth, MODEL};
use crate::teacher::sse_events;

/// The parts of an answer that must not depend on what else ran (not ids or timestamps).
fn essence(path: &str, body: &Value) -> Value {
    match path {
        "/v1/logprobs" => json!({
            "token_ids": body["token_ids"],
            "token_logprobs": body["token_logprobs"],
            "token_ranks": body["token_ranks"],
            "top_ids": body["top_ids"],
            "top_logprobs": body["top_logprobs"],
            "tail_logmass": body["tail_logmass"],
            "entropy": body["entropy"],
        }),
        _ => json!({
            "content": body["choices"][0]["message"]["content"],
            "logprobs": body["choices"][0]["logprobs"],
            "finish_reason": body["choices"][0]["finish_reason"],
            "usage": body["usage"],
        }),
    }
}

/// The text of a streamed chat answer.
fn streamed_text(body: &[u8]) -> String {
    sse_events(body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

#[derive(Clone)]
enum Call {
    Json(&'static str, Value),
    Stream(Value),
    HangUp(Value),
}

fn calls() -> Vec<Call> {
    let mut calls = Vec::new();
    // Teacher forcing: three of one length (the engine's batching hazard), others different.
    for (i, len) in [24usize, 24, 24, 9, 57, 130].into_iter().enumerate() {
        let ids: Vec<u32> = (0..len)
            .map(|j| (100 + 37 * j + 1009 * i) as u32 % 20000)
            .collect();
        calls.push(Call::Json(
            "/v1/logprobs",
            json!({"model": MODEL, "token_ids": ids, "top_k": 4}),
        ));
    }
    // Greedy generations with logprobs, prompts of different lengths.
    for (i, q) in [
        "Name a colour.",
        "What is a teacher model?",
        "Say hello in French, then in German, then in Spanish.",
        "List three prime numbers.",
    ]
    .into_iter()
    .enumerate()
    {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": q}],
            "max_tokens": 6 + 2 * i, "temperature": 0, "logprobs": true, "top_logprobs": 3});
        calls.push(Call::Json("/v1/chat/completions", body.clone()));
        let mut stream = body.clone();
        stream["stream"] = json!(true);
        calls.push(Call::Stream(stream));
    }
    // Sampled, seeded: the seed fixes the draws, so the answer is fixed too.
    calls.push(Call::Json(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Invent a word."}],
            "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 7,
            "logprobs": true, "top_logprobs": 2}),
    ));
    calls.push(Call::HangUp(
        json!({"model": MODEL, "stream": true, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Count to one hundred."}]}),
    ));
    calls
}

/// Run `call` once; the essence to compare (None for a client that hung up).
async fn run(call: &Call) -> Option<Value> {
    match call {
        Call::Json(path, body) => {
            let (status, v) = post_json(path, body.clone()).await;
            assert_eq!(status, 200, "{path}: {v}");
            Some(essence(path, &v))
        }
        Call::Stream(body) => {
            let (status, _, bytes) = post("/v1/chat/completions", body.clone()).await;
            assert_eq!(status, 200);
            assert_eq!(
                sse_events(&bytes).last().map(String::as_str),
                Some("[DONE]")
            );
            Some(json!(streamed_text(&bytes)))
        }
        Call::HangUp(body) => {
            let resp = with_auth(
                client()
                    .post(shared().url("/v1/chat/completions"))
                    .json(body),
            )
            .send()
            .await
            .unwrap();
            assert_eq!(resp.status(), 200);
            let mut chunks = resp.bytes_stream();
            let _ = chunks.next().await;
            None
        }
    }
}

#[tokio::test]
async fn a_few_hundred_mixed_concurrent_requests_equal_their_idle_answers() {
    let calls = Arc::new(calls());
    // References: each call alone, one after another.
    let mut reference = Vec::new();
    for call in calls.iter() {
        reference.push(run(call).await);
    }
    let reference = Arc::new(reference);

    // 320 requests, 24 in flight at a time, in an order that mixes every kind.
    let gate = Arc::new(Semaphore::new(24));
    let total = 320;
    let mut tasks = Vec::new();
    for n in 0..total {
        let i = (n * 7 + n / calls.len()) % calls.len();
        let (calls, reference, gate) = (calls.clone(), reference.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let got = run(&calls[i]).await;
            assert_eq!(
                got, reference[i],
                "request {n} (call {i}) differs from its answer on an idle engine"
            );
        }));
    }
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(900), all)
        .await
        .expect("requests stuck: not all 320 finished within 15 minutes");
    for r in results {
        r.expect("a concurrent request failed");
    }

    // The engine serves on, and its queue drained.
    let (status, v) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "prompt": "still serving", "top_k": 1}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let teacher = shared().state.models.get(MODEL).unwrap().clone();
    for _ in 0..100 {
        if teacher.queue_depth() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        teacher.queue_depth(),
        0,
        "requests left waiting in the engine"
    );
}

/// Starts four long greedy generations (at least 100 tokens each) and returns once they
/// decode; each task resolves to the moment its generation finished.
async fn four_long_generations() -> Vec<tokio::task::JoinHandle<std::time::Instant>> {
    let long = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let (status, v) = post_json(
                    "/v1/chat/completions",
                    json!({"model": MODEL, "max_tokens": 120 + i, "temperature": 0,
                        "messages": [{"role": "user", "content":
                            "Count from 1 to 1000, separated by commas, and never stop."}]}),
                )
                .await;
                assert_eq!(status, 200, "{v}");
                assert!(
                    v["usage"]["completion_tokens"].as_u64().unwrap() >= 100,
                    "{v}"
                );
                std::time::Instant::now()
            })
        })
        .collect();
    // Let them start decoding.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    long
}

/// A short teacher-forcing call is not queued behind running generations: it finishes while
/// four long generations are still running.
#[tokio::test]
async fn short_logprobs_call_does_not_wait_behind_long_generations() {
    let teacher = shared().state.models.get(MODEL).unwrap().clone();
    if !teacher.separate_scoring() {
        eprintln!("scoring_engine = shared: raw calls wait for running generations by design");
        return;
    }
    let long = four_long_generations().await;
    let (status, v) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "top_k": 2}),
    )
    .await;
    let short_done = std::time::Instant::now();
    assert_eq!(status, 200, "{v}");
    for t in long {
        let long_done = t.await.unwrap();
        assert!(
            short_done < long_done,
            "the short call finished only after a long generation"
        );
    }
}

/// A short generation is not queued behind running generations (the native CPU engine batches
/// them): sent while four long generations decode, it finishes before any of them, with the
/// same tokens and logprobs as the same request on an idle engine.
#[tokio::test]
async fn short_generation_does_not_wait_behind_long_generations() {
    let teacher = shared().state.models.get(MODEL).unwrap().clone();
    let (engine, at_once) = teacher.generation_engine();
    if at_once < 5 {
        eprintln!("{engine} runs {at_once} generations at once: a fifth waits by design");
        return;
    }
    let short = json!({"model": MODEL, "max_tokens": 6, "temperature": 1.0, "seed": 11,
        "logprobs": true, "top_logprobs": 3,
        "messages": [{"role": "user", "content": "Name a colour."}]});
    let (status, idle) = post_json("/v1/chat/completions", short.clone()).await;
    assert_eq!(status, 200, "{idle}");
    let long = four_long_generations().await;
    let (status, beside) = post_json("/v1/chat/completions", short).await;
    let short_done = std::time::Instant::now();
    assert_eq!(status, 200, "{beside}");
    for t in long {
        let long_done = t.await.unwrap();
        assert!(
            short_done < long_done,
            "the short generation finished only after a long one"
        );
    }
    assert_eq!(
        essence("/v1/chat/completions", &beside),
        essence("/v1/chat/completions", &idle),
        "a generation batched with others must give the same answer as alone"
    );
}
