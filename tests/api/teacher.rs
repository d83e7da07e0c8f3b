//! Teacher endpoints against the real default model: the numbers are checked against an
//! independent full-vocabulary log-softmax of the model's own logits, and across endpoints.

use serde_json::{json, Value};

use crate::helpers::{post, post_json, shared, MODEL};

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

async fn tokenize(text: &str) -> Vec<u32> {
    let (status, body) = post_json("/v1/tokenize", json!({"model": MODEL, "prompt": text})).await;
    assert_eq!(status, 200, "{body}");
    u32s(&body["token_ids"])
}

/// Reference: naive log-softmax in f64 of one logits row at temperature `t`.
fn reference_log_softmax(row: &[f32], t: f64) -> Vec<f64> {
    let scaled: Vec<f64> = row.iter().map(|&x| x as f64 / t).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + scaled.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    scaled.iter().map(|x| x - lse).collect()
}

async fn model_logits(ids: Vec<u32>) -> (Vec<f32>, usize) {
    let s = shared();
    let teacher = s.state.models.get(MODEL).unwrap().clone();
    s.on_server(async move { teacher.raw_logits(&ids).await.unwrap() })
        .await
}

#[tokio::test]
async fn logprobs_equal_a_full_vocabulary_log_softmax_of_the_model_logits() {
    let ids = tokenize("The quick brown fox jumps over the lazy dog.").await;
    assert!(ids.len() >= 8, "{ids:?}");
    let vocab = 49152;
    let (status, body) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "token_ids": ids, "top_k": vocab, "score_from": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (logits, width) = model_logits(ids.clone()).await;
    assert_eq!(width, vocab);
    assert_eq!(body["teacher"]["vocab_size"], vocab);
    let rows = body["token_logprobs"].as_array().unwrap().len();
    assert_eq!(rows, ids.len() - 1);
    for j in 0..rows {
        let i = 1 + j;
        let reference = reference_log_softmax(&logits[(i - 1) * width..i * width], 1.0);
        let top_ids = u32s(&body["top_ids"][j]);
        let top_lps = f64s(&body["top_logprobs"][j]);
        assert_eq!(top_ids.len(), vocab);
        // Sorted descending, and every value is the reference at that id.
        for w in top_lps.windows(2) {
            assert!(w[0] >= w[1], "top_logprobs not sorted at row {j}");
        }
        for (id, lp) in top_ids.iter().zip(&top_lps).take(200) {
            assert!(
                (reference[*id as usize] - lp).abs() < 1e-4,
                "row {j} id {id}: {lp} vs {}",
                reference[*id as usize]
            );
        }
        let mass: f64 = top_lps.iter().map(|x| x.exp()).sum();
        assert!((mass - 1.0).abs() < 1e-4, "row {j}: mass {mass}");
        let token = ids[i];
        let lp = body["token_logprobs"][j].as_f64().unwrap();
        assert!(
            (lp - reference[token as usize]).abs() < 1e-4,
            "row {j}: {lp} vs {}",
            reference[token as usize]
        );
        // Consistent with the top list, and the rank is its 1-based place there.
        let place = top_ids.iter().position(|&t| t == token).unwrap();
        assert_eq!(lp, top_lps[place]);
        let rank = body["token_ranks"][j].as_u64().unwrap() as usize;
        let expected_rank = 1 + reference
            .iter()
            .filter(|&&x| x > reference[token as usize])
            .count();
        assert_eq!(rank, expected_rank, "row {j}");
        assert!(
            body["tail_logmass"][j].is_null(),
            "the whole vocabulary leaves no tail"
        );
        let entropy: f64 = -reference.iter().map(|&x| x.exp() * x).sum::<f64>();
        assert!((body["entropy"][j].as_f64().unwrap() - entropy).abs() < 1e-3);
    }
}

#[tokio::test]
async fn temperature_and_tail_mass_follow_their_definitions() {
    let ids = tokenize("Distillation transfers knowledge from a teacher to a student.").await;
    let t = 0.7;
    let (status, body) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "token_ids": ids, "top_k": 5, "score_from": 3, "temperature": t}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["temperature"], t);
    assert_eq!(body["score_from"], 3);
    assert_eq!(body["usage"]["scored_tokens"], ids.len() - 3);
    let (logits, width) = model_logits(ids.clone()).await;
    for j in 0..ids.len() - 3 {
        let i = 3 + j;
        let reference = reference_log_softmax(&logits[(i - 1) * width..i * width], t);
        let lp = body["token_logprobs"][j].as_f64().unwrap();
        assert!((lp - reference[ids[i] as usize]).abs() < 1e-4);
        let top = f64s(&body["top_logprobs"][j]);
        assert_eq!(top.len(), 5);
        let mut sorted = reference.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for (a, b) in top.iter().zip(&sorted) {
            assert!((a - b).abs() < 1e-4);
        }
        let tail = body["tail_logmass"][j].as_f64().unwrap();
        let expect = (1.0 - top.iter().map(|x| x.exp()).sum::<f64>()).ln();
        assert!((tail - expect).abs() < 1e-3, "tail {tail} vs {expect}");
    }
}

/// Greedy generation (KV-cache decode) and teacher forcing (one prefill) must agree: every
/// generated token has rank 1 and the same logprob; completions' prompt_logprobs match too.
#[tokio::test]
async fn endpoints_agree_on_the_same_distribution() {
    let messages = json!([{"role": "user", "content": "Name three colours."}]);
    let (status, prompt) = post_json(
        "/v1/tokenize",
        json!({"model": MODEL, "messages": messages, "add_generation_prompt": true}),
    )
    .await;
    assert_eq!(status, 200, "{prompt}");
    let prompt_ids = u32s(&prompt["token_ids"]);

    for (temperature, seed) in [(0.0, 1), (1.0, 42)] {
        let (status, chat) = post_json(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": temperature,
                   "seed": seed, "logprobs": true, "top_logprobs": 5, "return_tokens_as_token_ids": true}),
        )
        .await;
        assert_eq!(status, 200, "{chat}");
        let content = chat["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap();
        assert!(!content.is_empty());
        let gen_ids: Vec<u32> = content
            .iter()
            .map(|c| {
                c["token"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("token_id:")
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        let mut full = prompt_ids.clone();
        full.extend(&gen_ids);
        let (status, lp) = post_json(
            "/v1/logprobs",
            json!({"model": MODEL, "token_ids": full, "top_k": 5, "score_from": prompt_ids.len()}),
        )
        .await;
        assert_eq!(status, 200, "{lp}");
        for (j, c) in content.iter().enumerate() {
            let forced = lp["token_logprobs"][j].as_f64().unwrap();
            let generated = c["logprob"].as_f64().unwrap();
            assert!(
                (forced - generated).abs() < 1e-3,
                "T={temperature} step {j}: {forced} vs {generated}"
            );
            if temperature == 0.0 {
                assert_eq!(lp["token_ranks"][j], 1, "greedy token must be the argmax");
            }
            // Same top-5 distribution (ids and values).
            let tops = c["top_logprobs"].as_array().unwrap();
            for (k, t) in tops.iter().enumerate() {
                let id: u32 = t["token"].as_str().unwrap()[9..].parse().unwrap();
                assert_eq!(id, lp["top_ids"][j][k].as_u64().unwrap() as u32);
                assert!(
                    (t["logprob"].as_f64().unwrap() - lp["top_logprobs"][j][k].as_f64().unwrap())
                        .abs()
                        < 1e-3
                );
            }
        }

        // vLLM-style prompt_logprobs over the same sequence: the same numbers.
        let (status, cmpl) = post_json(
            "/v1/completions",
            json!({"model": MODEL, "prompt": [full.clone()], "max_tokens": 0, "echo": true, "prompt_logprobs": 5}),
        )
        .await;
        assert_eq!(status, 200, "{cmpl}");
        let choice = &cmpl["choices"][0];
        assert_eq!(u32s(&choice["prompt_token_ids"]), full);
        let plp = choice["prompt_logprobs"].as_array().unwrap();
        assert_eq!(plp.len(), full.len());
        assert!(plp[0].is_null());
        for j in 0..gen_ids.len() {
            let i = prompt_ids.len() + j;
            let entry = &plp[i][full[i].to_string()];
            assert!(
                (entry["logprob"].as_f64().unwrap() - lp["token_logprobs"][j].as_f64().unwrap())
                    .abs()
                    < 1e-5
            );
            assert_eq!(entry["rank"], lp["token_ranks"][j]);
            assert!(plp[i].as_object().unwrap().len() >= 5);
        }
    }
}

#[tokio::test]
async fn same_request_gives_identical_bytes() {
    let req = json!({"model": MODEL, "prompt": "Reproducible teachers are auditable teachers.", "top_k": 8});
    let (s1, _, a) = post("/v1/logprobs", req.clone()).await;
    let (s2, _, b) = post("/v1/logprobs", req).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a, b);

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                      "max_tokens": 6, "seed": 3, "temperature": 1.0, "logprobs": true, "top_logprobs": 2});
    let (_, x) = post_json("/v1/chat/completions", chat.clone()).await;
    let (_, y) = post_json("/v1/chat/completions", chat).await;
    assert_eq!(
        x["choices"], y["choices"],
        "same seed, same tokens and logprobs"
    );
}

#[tokio::test]
async fn arrow_stream_carries_the_same_columns() {
    use arrow_array::{Array, Float32Array, ListArray, UInt32Array};
    let req = json!({"model": MODEL, "prompt": "Columns for training loops.", "top_k": 4});
    let (_, json_body) = post_json("/v1/logprobs", req.clone()).await;
    let s = shared();
    let resp = crate::helpers::with_auth(crate::helpers::client().post(s.url("/v1/logprobs")))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = resp.bytes().await.unwrap();
    let mut reader =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes.to_vec()), None)
            .unwrap();
    assert_eq!(reader.schema().metadata()["model"], MODEL);
    let batch = reader.next().unwrap().unwrap();
    let n = json_body["token_logprobs"].as_array().unwrap().len();
    assert_eq!(batch.num_rows(), n);
    let lps = batch
        .column_by_name("token_logprobs")
        .unwrap()
        .as_any()
        .downcast_ref::<Float32Array>()
        .unwrap();
    let ranks = batch
        .column_by_name("token_ranks")
        .unwrap()
        .as_any()
        .downcast_ref::<UInt32Array>()
        .unwrap();
    let tops = batch
        .column_by_name("top_ids")
        .unwrap()
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    for j in 0..n {
        assert_eq!(
            lps.value(j) as f64,
            json_body["token_logprobs"][j].as_f64().unwrap() as f32 as f64
        );
        assert_eq!(
            ranks.value(j) as u64,
            json_body["token_ranks"][j].as_u64().unwrap()
        );
        let ids = tops.value(j);
        let ids = ids.as_any().downcast_ref::<UInt32Array>().unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            ids.value(0) as u64,
            json_body["top_ids"][j][0].as_u64().unwrap()
        );
    }
    assert!(reader.next().is_none(), "exactly one record batch");
}

/// Read an SSE body into its `data:` payloads.
pub fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn streaming_chat_matches_the_non_streamed_answer() {
    let base = json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}],
                      "max_tokens": 10, "seed": 11, "temperature": 0.8, "logprobs": true, "top_logprobs": 1});
    let (_, whole) = post_json("/v1/chat/completions", base.clone()).await;
    let mut streamed = base.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, headers, body) = post("/v1/chat/completions", streamed).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
            continue;
        }
        let c = &v["choices"][0];
        text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if let Some(content) = c["logprobs"]["content"].as_array() {
            lps.extend(content.iter().map(|x| x["logprob"].as_f64().unwrap()));
        }
        if !c["finish_reason"].is_null() {
            finish = Some(c["finish_reason"].clone());
        }
    }
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let whole_lps: Vec<f64> = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["logprob"].as_f64().unwrap())
        .collect();
    assert_eq!(lps, whole_lps);
    assert_eq!(finish.unwrap(), whole["choices"][0]["finish_reason"]);
    assert_eq!(usage.unwrap(), whole["usage"]);
}

#[tokio::test]
async fn stop_strings_end_the_output_before_them() {
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 24, "temperature": 0.0, "stop": [" 11"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(!text.contains(" 11"), "{text:?}");
    if body["choices"][0]["finish_reason"] == "stop" {
        // The greedy continuation counts on; the stop string cut it.
        assert!(text.contains("10"), "{text:?}");
    }
}

#[tokio::test]
async fn models_list_describes_the_teacher() {
    let s = shared();
    let resp = crate::helpers::with_auth(crate::helpers::client().get(s.url("/v1/models")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let m = &v["data"][0];
    assert_eq!(m["id"], MODEL);
    assert_eq!(m["object"], "model");
    assert_eq!(m["teacher"]["architecture"], "llama");
    assert_eq!(m["teacher"]["quantization"], "Q4_1");
    assert_eq!(m["teacher"]["vocab_size"], 49152);
    assert_eq!(m["teacher"]["context_length"], 8192);
    assert_eq!(
        m["teacher"]["weights_sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(m["teacher"]["tokenizer_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(m["teacher"]["licence"]["distillation"], "allowed");
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let ids = tokenize("Hello, teachers!").await;
    let (status, body) =
        post_json("/v1/detokenize", json!({"model": MODEL, "token_ids": ids})).await;
    assert_eq!(status, 200);
    assert!(body["text"].as_str().unwrap().ends_with("Hello, teachers!"));
}

/// 32 concurrent mixed requests: teacher forcing of different lengths, generations, streams.
#[tokio::test]
async fn concurrent_mixed_requests_all_succeed() {
    let base = "Knowledge distillation trains a small student model to imitate a larger teacher. ";
    let mut tasks = Vec::new();
    for i in 0..32usize {
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => {
                    let text = base.repeat(1 + i % 5);
                    let (status, body) = post_json("/v1/logprobs", json!({"model": MODEL, "prompt": text, "top_k": 3})).await;
                    assert_eq!(status, 200, "{body}");
                    let n = body["token_ids"].as_array().unwrap().len();
                    assert_eq!(body["token_logprobs"].as_array().unwrap().len(), n - 1);
                    assert_eq!(body["top_ids"][0].as_array().unwrap().len(), 3);
                }
                1 => {
                    let (status, body) = post_json("/v1/chat/completions", json!({"model": MODEL,
                        "messages": [{"role": "user", "content": format!("Tell me fact {i}.")}],
                        "max_tokens": 4, "seed": i, "logprobs": true, "top_logprobs": 2})).await;
                    assert_eq!(status, 200, "{body}");
                    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
                    let natural_eos = usize::from(body["choices"][0]["finish_reason"] == "stop");
                    assert_eq!(content.len() + natural_eos, body["usage"]["completion_tokens"].as_u64().unwrap() as usize);
                }
                2 => {
                    let (status, _, body) = post("/v1/chat/completions", json!({"model": MODEL,
                        "messages": [{"role": "user", "content": "Stream something."}],
                        "max_tokens": 4, "seed": i, "stream": true})).await;
                    assert_eq!(status, 200);
                    assert_eq!(sse_events(&body).last().unwrap(), "[DONE]");
                }
                _ => {
                    let (status, body) = post_json("/v1/completions", json!({"model": MODEL,
                        "prompt": base, "max_tokens": 3, "echo": true, "prompt_logprobs": 2, "seed": i})).await;
                    assert_eq!(status, 200, "{body}");
                    assert!(body["choices"][0]["prompt_logprobs"][0].is_null());
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a concurrent request failed");
    }
    let (status, _) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "prompt": "still alive", "top_k": 1}),
    )
    .await;
    assert_eq!(status, 200, "the engine keeps serving");
}

#[tokio::test]
async fn metrics_count_requests_and_need_no_key() {
    let s = shared();
    let (status, _) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "prompt": "count me", "top_k": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let resp = crate::helpers::client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("teachd_requests_total{route=\"/v1/logprobs\",status=\"200\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= 1);
    assert!(text.contains(&format!("teachd_engine_queue_depth{{model=\"{MODEL}\"}}")));
    assert!(text.contains("teachd_ledger_healthy 1"));
}

/// A sequence of several prefill pieces (the native engine scores each piece's rows as the
/// pass produces them): every position's logprob and top entries are those of the model's
/// full logits at that position, from `score_from` on, across the pieces' boundaries.
#[tokio::test]
async fn logprobs_of_a_long_sequence_match_the_logits_at_every_position() {
    let text =
        "Teacher forcing scores each position of a sequence given all the tokens before it. "
            .repeat(40);
    let mut ids = tokenize(&text).await;
    assert!(ids.len() >= 600, "{} tokens", ids.len());
    ids.truncate(600);
    let score_from = 100;
    let (status, body) = post_json(
        "/v1/logprobs",
        json!({"model": MODEL, "token_ids": ids, "top_k": 3, "score_from": score_from}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (logits, width) = model_logits(ids.clone()).await;
    let rows = body["token_logprobs"].as_array().unwrap();
    assert_eq!(rows.len(), ids.len() - score_from);
    for (j, lp) in rows.iter().enumerate() {
        let i = score_from + j;
        let reference = reference_log_softmax(&logits[(i - 1) * width..i * width], 1.0);
        let lp = lp.as_f64().unwrap();
        let want = reference[ids[i] as usize];
        assert!((lp - want).abs() < 1e-5, "position {i}: {lp} vs {want}");
        let best = (0..width)
            .max_by(|&a, &b| reference[a].total_cmp(&reference[b]))
            .unwrap();
        assert_eq!(u32s(&body["top_ids"][j])[0], best as u32, "position {i}");
    }
}

/// Teacher forcing on the native engine (the default on CPU) against mistralrs's own forward
/// pass of the same weights (`scoring_engine = "separate"`), an implementation teachd shares
/// nothing with, over a 2048-token sequence: the logprob of every actual next token agrees
/// within 1e-4, and every entry of every full-vocabulary row within 2.5e-4 (two F32 forward
/// passes of 30 layers that sum in different orders; measured 3.0e-5 for the next tokens,
/// 1.03e-4 for the top 20, 1.21e-4 for the whole vocabulary).
#[tokio::test]
async fn native_teacher_forcing_agrees_with_mistralrs_over_2048_tokens() {
    let s = shared();
    let native = s.state.models.get(MODEL).unwrap().clone();
    assert_eq!(native.scoring_engine(), "native");
    let text = "Knowledge distillation trains a compact student network to reproduce the \
                output distribution of a larger teacher model, position by position. "
        .repeat(120);
    let mut ids = tokenize(&text).await;
    assert!(ids.len() >= 2048, "{} tokens", ids.len());
    ids.truncate(2048);
    let toml = format!(
        "[[models]]\nid = \"mistralrs-scoring\"\nsource = {{ kind = \"gguf\", path = \"{}\" }}\n\
         scoring_engine = \"separate\"\nlicence = {{ id = \"apache-2.0\", distillation = \"allowed\" }}\n",
        crate::app::model_path().display()
    );
    let sequence = ids.clone();
    let ((ours, width), (theirs, their_width)) = s
        .on_server(async move {
            let config = crate::app::config_from(&toml, &[]);
            let registry = teachd::engine::ModelRegistry::load(&config.models, &config.engine)
                .await
                .expect("load the model with a mistralrs scoring engine");
            let mistral = registry.get("mistralrs-scoring").unwrap().clone();
            assert_eq!(mistral.scoring_engine(), "separate");
            let ours = native.raw_logits(&sequence).await.unwrap();
            let theirs = mistral.raw_logits(&sequence).await.unwrap();
            (ours, theirs)
        })
        .await;
    assert_eq!(width, their_width);
    assert!(ours.len() / width >= 2047 && theirs.len() / width >= 2047);
    let (mut next, mut top, mut all) = (0f64, 0f64, 0f64);
    for i in 0..2047 {
        let a = reference_log_softmax(&ours[i * width..(i + 1) * width], 1.0);
        let b = reference_log_softmax(&theirs[i * width..(i + 1) * width], 1.0);
        let diff = |id: usize| (a[id] - b[id]).abs();
        next = next.max(diff(ids[i + 1] as usize));
        let mut order: Vec<usize> = (0..width).collect();
        order.select_nth_unstable_by(19, |&x, &y| b[y].total_cmp(&b[x]));
        top = order[..20].iter().map(|&id| diff(id)).fold(top, f64::max);
        all = (0..width).map(diff).fold(all, f64::max);
    }
    eprintln!(
        "native vs mistralrs teacher forcing, 2048 tokens, max |dlogprob|: next token {next:.2e}, \
         top-20 {top:.2e}, whole vocabulary {all:.2e}"
    );
    // The top 20 are part of the whole vocabulary: reported, bounded by `all`.
    assert!(next < 1e-4, "next tokens {next:.2e}");
    assert!(all < 2.5e-4, "whole vocabulary {all:.2e}");
}
