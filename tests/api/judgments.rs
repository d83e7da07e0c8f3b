//! LLM-as-a-judge against the real model.

use serde_json::{json, Value};

use crate::helpers::{post, post_json, MODEL};

fn absolute(response: &str, scale: [i64; 2]) -> Value {
    json!({"model": MODEL, "mode": "absolute", "instruction": "What is the capital of France?",
           "response": response, "reference": "Paris",
           "rubric": {"criteria": "Is the answer correct?", "scale": scale,
                      "descriptions": {scale[0].to_string(): "wrong", scale[1].to_string(): "correct"}}})
}

fn check_distribution(r: &Value, lo: i64, hi: i64) {
    let dist = r["distribution"].as_object().unwrap();
    assert_eq!(dist.len() as i64, hi - lo + 1);
    let sum: f64 = dist.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-9, "sum {sum}");
    let score = r["score"].as_f64().unwrap();
    assert!(score >= lo as f64 && score <= hi as f64);
    let expected: f64 = dist
        .iter()
        .map(|(k, v)| k.parse::<f64>().unwrap() * v.as_f64().unwrap())
        .sum();
    assert!((score - expected).abs() < 1e-9);
    let (argmax, _) = dist
        .iter()
        .map(|(k, v)| (k.parse::<i64>().unwrap(), v.as_f64().unwrap()))
        .fold((lo, -1.0), |b, (k, v)| if v > b.1 { (k, v) } else { b });
    assert_eq!(r["verdict"].as_i64().unwrap(), argmax);
    assert_eq!(r["judge"]["template_version"], "teachd-judge-v1");
    assert_eq!(r["judge"]["template_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["judge"]["rubric_sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn absolute_judgment_is_a_deterministic_distribution_over_the_scale() {
    let (s1, _, a) = post("/v1/judgments", absolute("Paris", [1, 5])).await;
    let (s2, _, b) = post("/v1/judgments", absolute("Paris", [1, 5])).await;
    assert_eq!((s1, s2), (200, 200), "{}", String::from_utf8_lossy(&a));
    assert_eq!(a, b, "same input, same output");
    let r: Value = serde_json::from_slice(&a).unwrap();
    assert_eq!(r["mode"], "absolute");
    check_distribution(&r, 1, 5);
    assert!(r["usage"]["scored_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn multi_token_scales_are_scored_correctly() {
    let (status, r) = post_json("/v1/judgments", absolute("Paris", [1, 10])).await;
    assert_eq!(status, 200, "{r}");
    check_distribution(&r, 1, 10);
    let (status, r) = post_json("/v1/judgments", absolute("Lyon", [1, 100])).await;
    assert_eq!(status, 200, "{r}");
    check_distribution(&r, 1, 100);
}

/// The score is what a direct teacher-forcing call on the rendered judge prompt implies.
#[tokio::test]
async fn score_matches_direct_logprobs_on_the_judge_prompt() {
    let mut req = absolute("Paris is the capital.", [1, 5]);
    req["include_prompt"] = json!(true);
    let (status, r) = post_json("/v1/judgments", req).await;
    assert_eq!(status, 200, "{r}");
    let prompt: Vec<u64> = r["prompt_token_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let mut probs = Vec::new();
    for s in 1..=5 {
        let (_, tok) = post_json(
            "/v1/tokenize",
            json!({"model": MODEL, "prompt": format!(" {s}"), "add_special_tokens": false}),
        )
        .await;
        // " 3" may be several tokens (here: a space, then the digit): the candidate's
        // probability is the product over its tokens.
        let cand = tok["token_ids"].as_array().unwrap().clone();
        let mut seq: Vec<Value> = prompt.iter().map(|&x| json!(x)).collect();
        seq.extend(cand);
        let (status, lp) = post_json(
            "/v1/logprobs",
            json!({"model": MODEL, "token_ids": seq, "top_k": 0, "score_from": prompt.len()}),
        )
        .await;
        assert_eq!(status, 200, "{lp}");
        let logp: f64 = lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        probs.push(logp.exp());
    }
    let total: f64 = probs.iter().sum();
    for (i, p) in probs.iter().enumerate() {
        let d = r["distribution"][(i + 1).to_string()].as_f64().unwrap();
        assert!(
            (p / total - d).abs() < 1e-4,
            "score {}: {} vs {d}",
            i + 1,
            p / total
        );
    }
    let expected: f64 = probs
        .iter()
        .enumerate()
        .map(|(i, p)| (i + 1) as f64 * p / total)
        .sum();
    assert!((r["score"].as_f64().unwrap() - expected).abs() < 1e-3);
}

#[tokio::test]
async fn pairwise_is_judged_in_both_orders_and_mirrors_under_swap() {
    let req = |a: &str, b: &str| {
        json!({"model": MODEL, "mode": "pairwise", "instruction": "What is 2 + 2?",
        "responses": [a, b], "rubric": {"criteria": "Which answer is correct?"}})
    };
    let (status, ab) = post_json("/v1/judgments", req("2 + 2 = 4.", "2 + 2 = 5.")).await;
    assert_eq!(status, 200, "{ab}");
    let (_, ba) = post_json("/v1/judgments", req("2 + 2 = 5.", "2 + 2 = 4.")).await;
    assert_eq!(ab["mode"], "pairwise");
    assert_eq!(ab["orders"].as_array().unwrap().len(), 2);
    let pa = ab["preference"]["A"].as_f64().unwrap();
    let pb = ab["preference"]["B"].as_f64().unwrap();
    assert!((pa + pb - 1.0).abs() < 1e-9);
    assert!(
        (pa - ba["preference"]["B"].as_f64().unwrap()).abs() < 1e-6,
        "{ab} vs {ba}"
    );
    let w = ab["winner"].as_str().unwrap();
    assert!(["A", "B", "tie"].contains(&w));
    let consistent = ab["consistent"].as_bool().unwrap();
    if !consistent {
        assert_eq!(w, "tie");
    }
    let mirrored = match w {
        "A" => "B",
        "B" => "A",
        t => t,
    };
    assert_eq!(ba["winner"], mirrored);
}

#[tokio::test]
async fn batches_keep_order_and_isolate_item_errors() {
    let good = |resp: &str| {
        json!({"mode": "absolute", "instruction": "Say hello.", "response": resp,
        "rubric": {"criteria": "Is it a greeting?", "scale": [1, 3]}})
    };
    let (status, r) = post_json("/v1/judgments", json!({"model": MODEL, "items": [
        good("Hello!"),
        {"mode": "absolute", "instruction": "Say hello.", "response": "", "rubric": {"criteria": "x"}},
        good("Goodbye."),
        {"mode": "pairwise", "instruction": "x", "responses": ["only one"]},
    ]})).await;
    assert_eq!(status, 200, "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (i, item) in results.iter().enumerate() {
        assert_eq!(item["index"], i);
    }
    assert!(results[0]["score"].is_number());
    assert_eq!(results[1]["error"]["type"], "invalid_request_error");
    assert_eq!(results[1]["error"]["param"], "response");
    assert!(results[2]["score"].is_number());
    assert_eq!(results[3]["error"]["param"], "responses");
    assert_eq!(r["usage"]["judgments"], 2);
    // Each item's result equals the same judgment made alone.
    let mut alone = good("Goodbye.");
    alone["model"] = json!(MODEL);
    let (_, single) = post_json("/v1/judgments", alone).await;
    assert_eq!(single["score"], results[2]["score"]);
}

#[tokio::test]
async fn bad_judgments_get_clear_errors() {
    let cases = [
        (absolute("", [1, 5]), 400, Some("response")),
        (absolute("x", [5, 5]), 400, Some("rubric.scale")),
        (absolute("x", [1, 102]), 400, Some("rubric.scale")),
        (
            json!({"model": MODEL, "mode": "pairwise", "instruction": "x", "responses": ["a", "b", "c"]}),
            400,
            Some("responses"),
        ),
        (
            json!({"model": MODEL, "mode": "absolute", "instruction": "x", "response": "y"}),
            400,
            Some("rubric"),
        ),
        (
            json!({"model": MODEL, "mode": "absolute", "instruction": "x", "response": "y", "rubric": {"criteria": "c"}, "bogus": 1}),
            400,
            None,
        ),
        (
            json!({"model": "nope", "mode": "absolute", "instruction": "x", "response": "y", "rubric": {"criteria": "c"}}),
            404,
            None,
        ),
        (
            absolute(&"very long answer ".repeat(3000), [1, 5]),
            413,
            None,
        ),
    ];
    for (req, status, param) in cases {
        let (got, body) = post_json("/v1/judgments", req).await;
        assert_eq!(got, status, "{body}");
        if let Some(p) = param {
            assert_eq!(body["error"]["param"], p, "{body}");
        }
        if status == 413 {
            assert_eq!(body["error"]["code"], "context_length_exceeded");
        }
    }
}
