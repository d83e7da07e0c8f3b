//! `POST /v1/completions`: OpenAI + vLLM compatible (echo, `max_tokens: 0`, `prompt_logprobs`,
//! prompts as token ids). Unknown fields are ignored, as SDKs send extras.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{self, f};
use super::generation::{self, Delta};
use super::{gate, sse};
use crate::auth::ClientCtx;
use crate::engine::{GenToken, GenerateParams, PositionStats, Teacher};
use crate::error::{ApiError, ErrorEnvelope, Json};
use crate::usage::Meter;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(completions))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[schema(example = json!({"model": "smollm2-135m-instruct", "prompt": [[1, 504, 3458]], "max_tokens": 0, "echo": true, "prompt_logprobs": 5}))]
pub struct CompletionRequest {
    pub model: String,
    #[schema(schema_with = common::prompt_schema)]
    pub prompt: serde_json::Value,
    /// Default 16; 0 is allowed with `echo` or `prompt_logprobs`.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    /// Alternatives per token in the legacy `logprobs` object.
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// vLLM extension: top-k logprobs of every prompt position.
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[schema(schema_with = common::stop_schema)]
    pub stop: Option<serde_json::Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"include_usage": true}` adds a final chunk with usage and no choices.
    #[serde(default, deserialize_with = "crate::http::de::opt_object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: CompletionUsage,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<LegacyLogprobs>,
    pub finish_reason: Option<String>,
    /// vLLM: `null` first, then per position a map `"<id>": {logprob, rank, decoded_token}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<BTreeMap<String, PromptLogprob>>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PromptLogprob {
    pub logprob: f32,
    pub rank: u32,
    pub decoded_token: String,
}

/// OpenAI's legacy completion logprobs.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct LegacyLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    /// Per token: `null` (the first, unscored) or a map token -> logprob.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl CompletionUsage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        CompletionUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Parse OpenAI's many prompt shapes into token-id sequences (text is tokenized off the async
/// workers).
async fn prompts(
    teacher: &Arc<Teacher>,
    prompt: &serde_json::Value,
    add_special: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    use serde_json::Value;
    let bad = || {
        ApiError::bad_param(
            "prompt",
            "prompt must be a string, an array of strings, an array of token ids or an array of token-id arrays",
        )
    };
    let ids_of = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let out = match prompt {
        Value::String(s) => vec![teacher.tokenize_async(s.clone(), add_special).await?],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad_param("prompt", "the prompt is empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids_of(items)?],
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let mut out = Vec::with_capacity(items.len());
            for s in items {
                let text = s.as_str().unwrap_or_default().to_string();
                out.push(teacher.tokenize_async(text, add_special).await?);
            }
            out
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|a| ids_of(a.as_array().map(Vec::as_slice).unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    for ids in &out {
        if ids.is_empty() {
            return Err(ApiError::bad_param("prompt", "the prompt is empty"));
        }
        teacher.check_ids(ids, "prompt")?;
        teacher.check_len(ids.len())?;
    }
    Ok(out)
}

struct Plan {
    teacher: Arc<Teacher>,
    echo: bool,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    max_tokens: Vec<usize>,
    temperature: f64,
    top_p: f64,
    seed: u64,
    stops: Vec<String>,
}

/// OpenAI/vLLM-compatible text completions.
#[utoipa::path(post, path = "/v1/completions", tag = "teacher", request_body = CompletionRequest,
    responses(
        (status = 200, description = "Completion (JSON, or SSE chunks with `stream: true`)", content(
            (CompletionResponse = "application/json"),
            (generation::SseEvent = "text/event-stream"))),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let teacher = common::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    let echo = req.echo.unwrap_or(false);
    if let Some(k) = req.logprobs {
        common::validate_top_k(&teacher, k, "logprobs")?;
    }
    if let Some(k) = req.prompt_logprobs {
        common::validate_top_k(&teacher, k, "prompt_logprobs")?;
    }
    let (temperature, top_p) = (req.temperature.unwrap_or(1.0), req.top_p.unwrap_or(1.0));
    common::validate_sampling(temperature, top_p)?;
    let stops = generation::parse_stop(req.stop)?;
    let prompts = prompts(
        &teacher,
        &req.prompt,
        req.add_special_tokens.unwrap_or(true),
    )
    .await?;
    let mut max_tokens = Vec::new();
    for p in &prompts {
        let m =
            generation::resolve_max_tokens(&teacher, p.len(), req.max_tokens, 16, "max_tokens")?;
        if m == 0 && !echo && req.prompt_logprobs.is_none() {
            return Err(ApiError::bad_param(
                "max_tokens",
                "max_tokens = 0 needs `echo: true` or `prompt_logprobs`",
            ));
        }
        max_tokens.push(m);
    }
    let plan = Arc::new(Plan {
        teacher: teacher.clone(),
        echo,
        logprobs: req.logprobs,
        prompt_logprobs: req.prompt_logprobs,
        max_tokens,
        temperature,
        top_p,
        seed: common::seed_or_random(req.seed),
        stops,
    });
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = chrono::Utc::now().timestamp();
    meter.record(|u| u.top_k = req.logprobs.max(req.prompt_logprobs).map(|k| k as u32));
    // Reserve every prompt plus its max_tokens; what is not produced is refunded at the end.
    let cost: usize = prompts
        .iter()
        .zip(&plan.max_tokens)
        .map(|(p, m)| p.len() + m)
        .sum();
    meter.reserve(cost as u64).await?;

    if req.stream.unwrap_or(false) {
        teacher.check_capacity()?; // 503 `overloaded` before the 200 headers
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let response = stream(plan, meter, prompts, (id, created), include_usage);
        return Ok(common::provenance(response, &teacher));
    }

    let mut choices = Vec::new();
    let mut usage = CompletionUsage::default();
    for (index, ids) in prompts.into_iter().enumerate() {
        let (choice, u) = run_one(&plan, &meter, index, ids, |_| std::future::ready(true)).await?;
        usage.prompt_tokens += u.prompt_tokens;
        usage.completion_tokens += u.completion_tokens;
        choices.push(choice);
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    let response = Json(CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model: teacher.info.id.clone(),
        choices,
        usage,
    })
    .into_response();
    Ok(common::provenance(response, &teacher))
}

/// One prompt: optional prompt scoring, optional generation. `on_delta` sees generated
/// pieces (for streaming). Records on `meter` what the engine ran (the prompt once, the
/// scored positions, every generated token) as it completes. Returns the choice and its usage.
async fn run_one<F, Fut>(
    plan: &Arc<Plan>,
    meter: &Meter,
    index: usize,
    ids: Vec<u32>,
    mut on_delta: F,
) -> Result<(CompletionChoice, CompletionUsage), ApiError>
where
    F: FnMut(&Delta) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = &plan.teacher;
    let echo_lp = plan.echo && plan.logprobs.is_some();
    let prompt_k = plan.prompt_logprobs.unwrap_or(0).max(if echo_lp {
        plan.logprobs.unwrap_or(0)
    } else {
        0
    });
    let scoring = plan.prompt_logprobs.is_some() || echo_lp;
    let rows: Option<Vec<PositionStats>> = if scoring && ids.len() > 1 {
        // A started pass runs to its end and is paid for, even if the client leaves.
        let (t2, seq) = (t.clone(), ids.clone());
        Some(
            gate::detached(meter, move |m| async move {
                let rows = t2.score(&seq, 1, prompt_k, 1.0).await?.rows;
                m.record(|u| {
                    u.prompt_tokens += seq.len() as u64;
                    u.scored_tokens += rows.len() as u64;
                });
                Ok(rows)
            })
            .await?,
        )
    } else if scoring {
        meter.record(|u| u.prompt_tokens += ids.len() as u64);
        Some(Vec::new())
    } else {
        None
    };
    let mut text = String::new();
    let mut legacy = plan.logprobs.map(|_| LegacyLogprobs::default());
    if plan.echo {
        text = t.detokenize(&ids)?;
        if let (Some(lp), Some(rows)) = (legacy.as_mut(), rows.as_ref()) {
            let k = plan.logprobs.unwrap_or(0);
            let mut offset = 0;
            for (i, &id) in ids.iter().enumerate() {
                let s = t.decode_one(id);
                lp.tokens.push(s.clone());
                lp.text_offset.push(offset);
                offset += s.len();
                if i == 0 {
                    lp.token_logprobs.push(None);
                    lp.top_logprobs.push(None);
                } else {
                    let row = &rows[i - 1];
                    lp.token_logprobs.push(Some(f(row.token_logprob)));
                    lp.top_logprobs.push(Some(
                        row.top_ids
                            .iter()
                            .zip(&row.top_logprobs)
                            .take(k)
                            .map(|(&id, &v)| (t.decode_one(id), f(v)))
                            .collect(),
                    ));
                }
            }
        }
    }

    let mut finish_reason = "length";
    let mut completion_tokens = 0;
    let max_tokens = plan.max_tokens[index];
    if max_tokens > 0 {
        let params = GenerateParams {
            prompt: ids.clone(),
            max_new_tokens: max_tokens,
            temperature: plan.temperature,
            top_p: plan.top_p,
            seed: plan.seed,
            top_logprobs: plan.logprobs.unwrap_or(0),
        };
        let mut generated_text = String::new();
        let mut generated: Vec<GenToken> = Vec::new();
        // The prompt is billed once, by its scoring pass when there was one.
        let finished = generation::run(t, meter, !scoring, params, plan.stops.clone(), |d| {
            let keep_going = on_delta(&d);
            generated_text.push_str(&d.text);
            generated.extend(d.tokens);
            keep_going
        })
        .await?;
        finish_reason = finished.finish_reason;
        completion_tokens = finished.sampled_tokens;
        if let Some(lp) = legacy.as_mut() {
            let mut offset = text.len();
            for tok in &generated {
                let s = t.decode_one(tok.id);
                lp.tokens.push(s.clone());
                lp.text_offset.push(offset);
                offset += s.len();
                lp.token_logprobs.push(Some(f(tok.logprob)));
                lp.top_logprobs.push(Some(
                    tok.top
                        .iter()
                        .map(|&(id, v)| (t.decode_one(id), f(v)))
                        .collect(),
                ));
            }
        }
        text.push_str(&generated_text);
    }

    let prompt_logprobs = match (plan.prompt_logprobs, &rows) {
        (Some(k), Some(rows)) => Some(vllm_prompt_logprobs(t, &ids, rows, k)),
        _ => None,
    };
    let choice = CompletionChoice {
        index,
        text,
        logprobs: legacy,
        finish_reason: Some(finish_reason.to_string()),
        prompt_token_ids: plan.prompt_logprobs.map(|_| ids.clone()),
        prompt_logprobs,
    };
    let usage = CompletionUsage {
        prompt_tokens: ids.len(),
        completion_tokens,
        total_tokens: ids.len() + completion_tokens,
    };
    Ok((choice, usage))
}

/// vLLM's shape: `[null, {"<id>": {logprob, rank, decoded_token}, …}, …]` with the top-k plus
/// the actual token at every position.
fn vllm_prompt_logprobs(
    t: &Teacher,
    ids: &[u32],
    rows: &[PositionStats],
    k: usize,
) -> Vec<Option<BTreeMap<String, PromptLogprob>>> {
    let mut out = vec![None];
    for (i, row) in rows.iter().enumerate() {
        let actual = ids[i + 1];
        let mut map = BTreeMap::new();
        for (rank0, (&id, &lp)) in row
            .top_ids
            .iter()
            .zip(&row.top_logprobs)
            .take(k)
            .enumerate()
        {
            map.insert(
                id.to_string(),
                PromptLogprob {
                    logprob: f(lp),
                    rank: rank0 as u32 + 1,
                    decoded_token: t.decode_one(id),
                },
            );
        }
        map.entry(actual.to_string())
            .or_insert_with(|| PromptLogprob {
                logprob: f(row.token_logprob),
                rank: row.token_rank,
                decoded_token: t.decode_one(actual),
            });
        out.push(Some(map));
    }
    out
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<CompletionUsage>,
}

fn stream(
    plan: Arc<Plan>,
    meter: Meter,
    prompts: Vec<Vec<u32>>,
    (id, created): (String, i64),
    include_usage: bool,
) -> Response {
    sse::stream(meter.clone(), move |sink| async move {
        let model = plan.teacher.info.id.clone();
        let chunk = |choices: Vec<CompletionChoice>, usage: Option<CompletionUsage>| Chunk {
            id: &id,
            object: "text_completion",
            created,
            model: &model,
            choices,
            usage,
        };
        let mut total = CompletionUsage::default();
        for (index, ids) in prompts.into_iter().enumerate() {
            let mut first = true;
            let t = plan.teacher.clone();
            let (choice, u) = run_one(&plan, &meter, index, ids.clone(), |d| {
                let logprobs = plan.logprobs.map(|_| LegacyLogprobs {
                    tokens: d.tokens.iter().map(|x| t.decode_one(x.id)).collect(),
                    token_logprobs: d.tokens.iter().map(|x| Some(f(x.logprob))).collect(),
                    top_logprobs: d
                        .tokens
                        .iter()
                        .map(|x| {
                            Some(
                                x.top
                                    .iter()
                                    .map(|&(id, v)| (t.decode_one(id), f(v)))
                                    .collect(),
                            )
                        })
                        .collect(),
                    text_offset: Vec::new(),
                });
                let mut text = d.text.clone();
                if first && plan.echo {
                    // Echoed prompt text leads the first chunk.
                    if let Ok(p) = t.detokenize(&ids) {
                        text = format!("{p}{text}");
                    }
                }
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: None,
                    prompt_logprobs: None,
                    prompt_token_ids: None,
                };
                first = false;
                // Serialised here, from the typed chunk (a `Value` would print f32s as f64s).
                let chunk = serde_json::to_string(&chunk(vec![choice], None));
                let sink = sink.clone_sender();
                async move {
                    match chunk {
                        Ok(c) => sink.send_json(c).await,
                        Err(_) => false,
                    }
                }
            })
            .await?;
            total.prompt_tokens += u.prompt_tokens;
            total.completion_tokens += u.completion_tokens;
            let last = CompletionChoice {
                index,
                text: if first && plan.echo {
                    choice.text.clone()
                } else {
                    String::new()
                },
                logprobs: None,
                finish_reason: choice.finish_reason,
                prompt_logprobs: choice.prompt_logprobs,
                prompt_token_ids: choice.prompt_token_ids,
            };
            if !sink.send(&chunk(vec![last], None)).await {
                return Ok(()); // the client left; what ran is recorded on the meter
            }
        }
        total.total_tokens = total.prompt_tokens + total.completion_tokens;
        if include_usage {
            sink.send(&chunk(Vec::new(), Some(total))).await;
        }
        Ok(())
    })
}
