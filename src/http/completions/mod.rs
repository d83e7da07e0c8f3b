//! `POST /v1/completions`: OpenAI + vLLM compatible (echo, `max_tokens: 0`, `prompt_logprobs`,
//! prompts as token ids). Unknown fields are ignored, as SDKs send extras.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::access;
use super::gate;
use super::generation::{self, Delta};
use super::input::{self, f};
use crate::auth::ClientCtx;
use crate::engine::{GenToken, GenerateParams, PositionStats, Teacher};
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::Json;
use crate::usage::Meter;
use crate::AppState;

mod prompts;
mod stream;
mod types;

use prompts::{prompts, vllm_prompt_logprobs};
use stream::stream;
pub use types::*;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(completions))
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
    let teacher = access::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    let stream_it = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let checked = plan(&teacher, req).await?;
    meter.record(|u| u.top_k = checked.top_k);
    // Reserve every prompt plus its max_tokens; what is not produced is refunded at the end.
    meter.reserve(checked.cost).await?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = chrono::Utc::now().timestamp();
    if stream_it {
        teacher.check_capacity()?; // 503 `overloaded` before the 200 headers
        let response = stream(
            checked.plan,
            meter,
            checked.prompts,
            (id, created),
            include_usage,
        );
        return Ok(access::provenance(response, &teacher));
    }
    let body = respond(checked, &meter, id, created).await?;
    Ok(access::provenance(Json(body).into_response(), &teacher))
}

/// A checked completion request: the plan, its prompts as token ids, what it may cost (every
/// prompt plus its `max_tokens`) and the top-k it records. Built by [`plan`] for the endpoint
/// and for batch lines alike.
pub struct Checked {
    plan: Arc<Plan>,
    prompts: Vec<Vec<u32>>,
    pub cost: u64,
    pub top_k: Option<u32>,
}

/// Checks `req` against `teacher` before any engine time (the ToS and licence checks are the
/// caller's). `stream` is the caller's to handle.
pub async fn plan(teacher: &Arc<Teacher>, req: CompletionRequest) -> Result<Checked, ApiError> {
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    let echo = req.echo.unwrap_or(false);
    if let Some(k) = req.logprobs {
        input::validate_top_k(teacher, k, "logprobs")?;
    }
    if let Some(k) = req.prompt_logprobs {
        input::validate_top_k(teacher, k, "prompt_logprobs")?;
    }
    let (temperature, top_p) = (req.temperature.unwrap_or(1.0), req.top_p.unwrap_or(1.0));
    input::validate_sampling(temperature, top_p)?;
    let stops = generation::parse_stop(req.stop)?;
    let prompts = prompts(teacher, &req.prompt, req.add_special_tokens.unwrap_or(true)).await?;
    let mut max_tokens = Vec::new();
    for p in &prompts {
        let m = generation::resolve_max_tokens(teacher, p.len(), req.max_tokens, 16, "max_tokens")?;
        if m == 0 && !echo && req.prompt_logprobs.is_none() {
            return Err(ApiError::bad_param(
                "max_tokens",
                "max_tokens = 0 needs `echo: true` or `prompt_logprobs`",
            ));
        }
        max_tokens.push(m);
    }
    let cost: usize = prompts
        .iter()
        .zip(&max_tokens)
        .map(|(p, m)| p.len() + m)
        .sum();
    let plan = Arc::new(Plan {
        teacher: teacher.clone(),
        echo,
        logprobs: req.logprobs,
        prompt_logprobs: req.prompt_logprobs,
        max_tokens,
        temperature,
        top_p,
        seed: input::seed_or_random(req.seed),
        stops,
    });
    Ok(Checked {
        plan,
        prompts,
        cost: cost as u64,
        top_k: req.logprobs.max(req.prompt_logprobs).map(|k| k as u32),
    })
}

/// Runs a checked request to its (non-streamed) response, recording on `meter` what the engine
/// ran.
pub async fn respond(
    checked: Checked,
    meter: &Meter,
    id: String,
    created: i64,
) -> Result<CompletionResponse, ApiError> {
    let Checked { plan, prompts, .. } = checked;
    let mut choices = Vec::new();
    let mut usage = CompletionUsage::default();
    for (index, ids) in prompts.into_iter().enumerate() {
        let (choice, u) = run_one(&plan, meter, index, ids, |_| std::future::ready(true)).await?;
        usage.prompt_tokens += u.prompt_tokens;
        usage.completion_tokens += u.completion_tokens;
        choices.push(choice);
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    Ok(CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model: plan.teacher.info.id.clone(),
        choices,
        usage,
    })
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
