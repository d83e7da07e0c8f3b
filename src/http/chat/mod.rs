//! `POST /v1/chat/completions`: OpenAI compatible, streaming included. Logprobs are the
//! natural-log probabilities of the distribution each token was sampled from.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::access;
use super::completions::CompletionUsage;
use super::input::{self, f};
use super::{generation, sse};
use crate::auth::ClientCtx;
use crate::engine::{GenToken, GenerateParams, Teacher};
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::Json;
use crate::usage::Meter;
use crate::AppState;

mod types;

pub use types::*;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(chat_completions))
}

fn token_name(t: &Teacher, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        t.decode_one(id)
    }
}

fn token_logprob(t: &Teacher, tok: &GenToken, as_ids: bool) -> TokenLogprob {
    TokenLogprob {
        token: token_name(t, tok.id, as_ids),
        logprob: f(tok.logprob),
        bytes: t.token_bytes(tok.id).to_vec(),
        top_logprobs: tok
            .top
            .iter()
            .map(|&(id, lp)| TopLogprob {
                token: token_name(t, id, as_ids),
                logprob: f(lp),
                bytes: t.token_bytes(id).to_vec(),
            })
            .collect(),
    }
}

/// OpenAI-compatible chat completions.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "teacher", request_body = ChatRequest,
    responses(
        (status = 200, description = "Completion (JSON, or SSE `chat.completion.chunk`s with `stream: true`)", content(
            (ChatResponse = "application/json"),
            (generation::SseEvent = "text/event-stream"))),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    Json(req): Json<ChatRequest>,
) -> Result<Response, ApiError> {
    let teacher = access::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    let stream_it = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let checked = plan(&teacher, req).await?;
    meter.record(|u| u.top_k = checked.top_k);
    // A generation reserves prompt + max_tokens; what it does not produce is refunded.
    meter.reserve(checked.cost).await?;
    if stream_it {
        teacher.check_capacity()?; // 503 `overloaded` before the 200 headers, not inside them
        let Checked {
            out, params, stops, ..
        } = checked;
        let response = stream(out, meter, params, stops, include_usage);
        return Ok(access::provenance(response, &teacher));
    }
    let body = respond(checked, &meter).await?;
    Ok(access::provenance(Json(body).into_response(), &teacher))
}

/// A checked chat request: what the engine will run, what it may cost (prompt +
/// `max_tokens`) and the top-k it records. Built by [`plan`] for the endpoint and for batch
/// lines alike.
pub struct Checked {
    out: Out,
    params: GenerateParams,
    stops: Vec<String>,
    pub cost: u64,
    pub top_k: Option<u32>,
}

/// Checks `req` against `teacher` before any engine time (the ToS and licence checks are the
/// caller's). `stream` is the caller's to handle.
pub async fn plan(teacher: &Arc<Teacher>, req: ChatRequest) -> Result<Checked, ApiError> {
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    for (name, v) in [
        ("frequency_penalty", req.frequency_penalty),
        ("presence_penalty", req.presence_penalty),
    ] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad_param(
                name,
                format!("{name} is not supported; omit it or send 0"),
            ));
        }
    }
    let want_logprobs = req.logprobs.unwrap_or(false);
    let as_ids = req.return_tokens_as_token_ids.unwrap_or(false);
    let top_n = req.top_logprobs.unwrap_or(0);
    if req.top_logprobs.is_some() && !want_logprobs {
        return Err(ApiError::bad_param(
            "top_logprobs",
            "top_logprobs needs `logprobs: true`",
        ));
    }
    input::validate_top_k(teacher, top_n, "top_logprobs")?;
    let (temperature, top_p) = (req.temperature.unwrap_or(1.0), req.top_p.unwrap_or(1.0));
    input::validate_sampling(temperature, top_p)?;
    let stops = generation::parse_stop(req.stop)?;
    let messages = input::convert_messages(&req.messages)?;
    let prompt = teacher.tokenize_chat(&messages, true).await?;
    teacher.check_len(prompt.len())?;
    let (requested, param) = match req.max_completion_tokens {
        Some(n) => (Some(n), "max_completion_tokens"),
        None => (req.max_tokens, "max_tokens"),
    };
    let max_new =
        generation::resolve_max_tokens(teacher, prompt.len(), requested, usize::MAX, param)?;
    if max_new == 0 {
        return Err(ApiError::bad_param(
            param,
            format!("{param} must be at least 1"),
        ));
    }
    let params = GenerateParams {
        prompt: prompt.clone(),
        max_new_tokens: max_new,
        temperature,
        top_p,
        seed: input::seed_or_random(req.seed),
        top_logprobs: top_n,
    };
    let cost = (prompt.len() + max_new) as u64;
    let out = Out {
        teacher: teacher.clone(),
        fingerprint: fingerprint(teacher),
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: chrono::Utc::now().timestamp(),
        want_logprobs,
        as_ids,
    };
    Ok(Checked {
        out,
        params,
        stops,
        cost,
        top_k: want_logprobs.then_some(top_n as u32),
    })
}

/// Runs a checked request to its (non-streamed) response, recording on `meter` what the engine
/// ran.
pub async fn respond(checked: Checked, meter: &Meter) -> Result<ChatResponse, ApiError> {
    let Checked {
        out, params, stops, ..
    } = checked;
    let (teacher, as_ids, prompt_len) = (out.teacher.clone(), out.as_ids, params.prompt.len());
    let mut content = String::new();
    let mut lps = out.want_logprobs.then(ChoiceLogprobs::default);
    let finished = generation::run(&teacher, meter, true, params, stops, |d| {
        content.push_str(&d.text);
        if let Some(l) = lps.as_mut() {
            l.content
                .extend(d.tokens.iter().map(|t| token_logprob(&teacher, t, as_ids)));
        }
        std::future::ready(true)
    })
    .await?;
    Ok(ChatResponse {
        id: out.id,
        object: "chat.completion".into(),
        created: out.created,
        model: teacher.info.id.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content,
            },
            logprobs: lps,
            finish_reason: finished.finish_reason.into(),
        }],
        usage: CompletionUsage::new(prompt_len, finished.sampled_tokens),
        system_fingerprint: out.fingerprint,
    })
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<ChunkChoice>,
    usage: Option<CompletionUsage>,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: usize,
    delta: ChunkDelta,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChunkDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

fn fingerprint(t: &Teacher) -> String {
    format!(
        "fp_{}",
        &t.info.weights_sha256[..t.info.weights_sha256.len().min(12)]
    )
}

/// What every chunk of one answer shares.
struct Out {
    teacher: Arc<Teacher>,
    fingerprint: String,
    id: String,
    created: i64,
    want_logprobs: bool,
    as_ids: bool,
}

impl Out {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<CompletionUsage>) -> ChatChunk<'_> {
        ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.teacher.info.id,
            system_fingerprint: &self.fingerprint,
            choices,
            usage,
        }
    }
}

fn choice(
    content: Option<String>,
    role: Option<&'static str>,
    logprobs: Option<ChoiceLogprobs>,
    finish: Option<&'static str>,
) -> ChunkChoice {
    ChunkChoice {
        index: 0,
        delta: ChunkDelta { role, content },
        logprobs,
        finish_reason: finish,
    }
}

fn stream(
    out: Out,
    meter: Meter,
    params: GenerateParams,
    stops: Vec<String>,
    include_usage: bool,
) -> Response {
    sse::stream(meter.clone(), move |sink| async move {
        let first = out.chunk(
            vec![choice(Some(String::new()), Some("assistant"), None, None)],
            None,
        );
        if !sink.send(&first).await {
            return Ok(());
        }
        let prompt_len = params.prompt.len();
        let t = out.teacher.clone();
        let finished = generation::run(&t, &meter, true, params, stops, |d| {
            let logprobs = out.want_logprobs.then(|| ChoiceLogprobs {
                content: d
                    .tokens
                    .iter()
                    .map(|x| token_logprob(&t, x, out.as_ids))
                    .collect(),
            });
            // Serialised here, from the typed chunk (a `Value` would print f32s as f64s).
            let chunk = serde_json::to_string(
                &out.chunk(vec![choice(Some(d.text), None, logprobs, None)], None),
            );
            let sink = sink.clone_sender();
            async move {
                match chunk {
                    Ok(chunk) => sink.send_json(chunk).await,
                    Err(_) => false,
                }
            }
        })
        .await?;
        let last = out.chunk(
            vec![choice(None, None, None, Some(finished.finish_reason))],
            None,
        );
        if !sink.send(&last).await {
            return Ok(());
        }
        if include_usage {
            let usage = CompletionUsage::new(prompt_len, finished.sampled_tokens);
            sink.send(&out.chunk(Vec::new(), Some(usage))).await;
        }
        Ok(())
    })
}
