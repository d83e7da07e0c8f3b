//! `POST /v1/logprobs`: teacher forcing, the core of the product.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

mod arrow;

use super::access;
use super::gate;
use super::input::{self, f, Message};
use crate::auth::ClientCtx;
use crate::engine::{Lane, ScoreResult, Teacher};
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::Json;
use crate::usage::Meter;
use crate::AppState;

pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(logprobs))
}

/// Exactly one of `token_ids`, `prompt`, `messages`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "smollm2-135m-instruct", "token_ids": [1, 504, 3458], "top_k": 20, "score_from": 1, "temperature": 1.0}))]
pub struct LogprobsRequest {
    pub model: String,
    #[serde(default)]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default, deserialize_with = "crate::http::extract::opt_vec_object")]
    pub messages: Option<Vec<Message>>,
    /// 0..=max_top_k, default 20.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Index of the first token to score; 1 <= score_from < len. Default 1.
    #[serde(default)]
    pub score_from: Option<usize>,
    /// > 0, default 1.0; divides the logits before the softmax.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Applies to `prompt` only. Default true.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// Column-oriented: row j is token index `score_from + j`, scored given `token_ids[..i]`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogprobsResponse {
    /// Content address of the request (same request, same id).
    pub id: String,
    pub object: String,
    pub model: String,
    pub token_ids: Vec<u32>,
    pub score_from: usize,
    pub top_k: usize,
    pub temperature: f64,
    pub token_logprobs: Vec<f32>,
    /// 1-based.
    pub token_ranks: Vec<u32>,
    pub top_ids: Vec<Vec<u32>>,
    pub top_logprobs: Vec<Vec<f32>>,
    /// log(1 - sum(exp(top_logprobs[j]))); null when the top-k is the whole vocabulary.
    pub tail_logmass: Vec<Option<f32>>,
    /// Entropy (nats) of the full distribution at that position.
    pub entropy: Vec<f32>,
    pub usage: LogprobsUsage,
    pub teacher: TeacherStamp,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogprobsUsage {
    pub prompt_tokens: usize,
    pub scored_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TeacherStamp {
    pub weights_sha256: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub quantization: String,
}

impl TeacherStamp {
    pub fn of(t: &Teacher) -> Self {
        Self {
            weights_sha256: t.info.weights_sha256.clone(),
            tokenizer_sha256: t.info.tokenizer_sha256.clone(),
            vocab_size: t.info.vocab_size,
            quantization: t.info.quantization.clone(),
        }
    }
}

/// Resolve the one input of a request into token ids.
pub async fn resolve_input(
    teacher: &Arc<Teacher>,
    token_ids: Option<Vec<u32>>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let given = [token_ids.is_some(), prompt.is_some(), messages.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if given != 1 {
        return Err(ApiError::bad_request(
            "give exactly one input: `token_ids`, `prompt` or `messages`",
        ));
    }
    let ids = if let Some(ids) = token_ids {
        teacher.check_ids(&ids, "token_ids")?;
        ids
    } else if let Some(prompt) = prompt {
        teacher.tokenize_async(prompt, add_special_tokens).await?
    } else {
        let messages = input::convert_messages(&messages.unwrap_or_default())?;
        teacher.tokenize_chat(&messages, false).await?
    };
    if ids.is_empty() {
        return Err(ApiError::bad_request("the input is empty"));
    }
    Ok(ids)
}

/// Per-position logprobs of a sequence under the teacher (teacher forcing).
#[utoipa::path(
    post, path = "/v1/logprobs", tag = "teacher",
    request_body = LogprobsRequest,
    responses(
        (status = 200, description = "Scored positions (JSON, or one Arrow IPC record batch with `Accept: application/vnd.apache.arrow.stream`)", content(
            (LogprobsResponse = "application/json"),
            (String = "application/vnd.apache.arrow.stream"))),
        (status = 400, description = "Bad input", body = ErrorEnvelope),
        (status = 404, description = "Unknown model", body = ErrorEnvelope),
        (status = 413, description = "Body too large or context length exceeded", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn logprobs(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    headers: HeaderMap,
    Json(req): Json<LogprobsRequest>,
) -> Result<Response, ApiError> {
    let teacher = access::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    let plan = plan(&teacher, req).await?;
    meter.record(|u| u.top_k = Some(plan.top_k as u32));
    // A logprobs call costs its prompt tokens.
    meter.reserve(plan.cost()).await?;
    // A started pass runs to its end and is paid for, even if the client leaves meanwhile.
    let t = teacher.clone();
    let body = gate::detached(&meter, move |m| async move {
        let body = execute(&t, plan, Lane::Foreground).await?;
        m.record(|u| {
            u.prompt_tokens += body.usage.prompt_tokens as u64;
            u.scored_tokens += body.usage.scored_tokens as u64;
        });
        Ok(body)
    })
    .await?;
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    let response = if wants_arrow {
        let bytes = arrow::encode(&body)?;
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static(ARROW_STREAM))],
            bytes,
        )
            .into_response()
    } else {
        Json(body).into_response()
    };
    Ok(access::provenance(response, &teacher))
}

/// A checked `/v1/logprobs` request: what the engine will run. Built by [`plan`] for the
/// interactive endpoint and for every line of a batch, so both refuse the same inputs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub ids: Vec<u32>,
    pub score_from: usize,
    pub top_k: usize,
    pub temperature: f64,
}

impl Plan {
    /// What running it costs against the quota: every token run through the teacher.
    pub fn cost(&self) -> u64 {
        self.ids.len() as u64
    }
}

/// Checks `req` against `teacher` (top_k, temperature, input, length, score_from) before any
/// engine time. The ToS and licence checks are the caller's ([`access::teacher_for`]).
pub async fn plan(teacher: &Arc<Teacher>, req: LogprobsRequest) -> Result<Plan, ApiError> {
    let top_k = req.top_k.unwrap_or(20);
    input::validate_top_k(teacher, top_k, "top_k")?;
    let temperature = req.temperature.unwrap_or(1.0);
    input::validate_temperature(temperature, false)?;
    let ids = resolve_input(
        teacher,
        req.token_ids,
        req.prompt,
        req.messages,
        req.add_special_tokens.unwrap_or(true),
    )
    .await?;
    teacher.check_len(ids.len())?;
    if ids.len() < 2 {
        return Err(ApiError::bad_request(
            "the sequence needs at least 2 tokens: the first one is never scored",
        ));
    }
    let score_from = req.score_from.unwrap_or(1);
    if score_from == 0 || score_from >= ids.len() {
        return Err(ApiError::bad_param(
            "score_from",
            format!(
                "score_from must satisfy 1 <= score_from < len (len = {})",
                ids.len()
            ),
        ));
    }
    Ok(Plan {
        ids,
        score_from,
        top_k,
        temperature,
    })
}

/// Runs a plan through the teacher: the response body `/v1/logprobs` answers. With a
/// [`Lane`]: interactive calls run in the foreground, batch lines in the background or on a
/// spare turn of the generation engine.
pub async fn execute(
    teacher: &Arc<Teacher>,
    plan: Plan,
    lane: Lane,
) -> Result<LogprobsResponse, ApiError> {
    let result = teacher
        .score_on(
            &plan.ids,
            plan.score_from,
            plan.top_k,
            plan.temperature,
            lane,
        )
        .await?;
    Ok(build_response(
        teacher,
        plan.ids,
        plan.score_from,
        plan.top_k,
        plan.temperature,
        result,
    ))
}

fn build_response(
    teacher: &Arc<Teacher>,
    ids: Vec<u32>,
    score_from: usize,
    top_k: usize,
    temperature: f64,
    result: ScoreResult,
) -> LogprobsResponse {
    let n = result.rows.len();
    let mut hasher = Sha256::new();
    hasher.update(teacher.info.weights_sha256.as_bytes());
    for id in &ids {
        hasher.update(id.to_le_bytes());
    }
    hasher.update((score_from as u64).to_le_bytes());
    hasher.update((top_k as u64).to_le_bytes());
    hasher.update(temperature.to_le_bytes());
    let id = format!("lp-{}", &hex::encode(hasher.finalize())[..32]);

    let mut out = LogprobsResponse {
        id,
        object: "teacher.logprobs".into(),
        model: teacher.info.id.clone(),
        usage: LogprobsUsage {
            prompt_tokens: ids.len(),
            scored_tokens: n,
            total_tokens: ids.len(),
        },
        token_ids: ids,
        score_from,
        top_k,
        temperature,
        token_logprobs: Vec::with_capacity(n),
        token_ranks: Vec::with_capacity(n),
        top_ids: Vec::with_capacity(n),
        top_logprobs: Vec::with_capacity(n),
        tail_logmass: Vec::with_capacity(n),
        entropy: Vec::with_capacity(n),
        teacher: TeacherStamp::of(teacher),
    };
    for row in result.rows {
        out.token_logprobs.push(f(row.token_logprob));
        out.token_ranks.push(row.token_rank);
        out.top_logprobs
            .push(row.top_logprobs.iter().map(|&x| f(x)).collect());
        out.top_ids.push(row.top_ids);
        out.tail_logmass.push(row.tail_logmass.map(f));
        out.entropy.push(f(row.entropy));
    }
    out
}
