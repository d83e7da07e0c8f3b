//! `POST /v1/tokenize`, `POST /v1/detokenize`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::access;
use super::input::{self, Message};
use super::logprobs::resolve_input;
use crate::auth::ClientCtx;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::Json;
use crate::usage::Meter;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(tokenize))
        .routes(routes!(detokenize))
}

/// Exactly one of `prompt` or `messages` (rendered with the chat template, with the
/// generation prompt appended when `add_generation_prompt` is true).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "smollm2-135m-instruct", "prompt": "Hello world"}))]
pub struct TokenizeRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default, deserialize_with = "crate::http::extract::opt_vec_object")]
    pub messages: Option<Vec<Message>>,
    /// Applies to `prompt`; default true.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// Applies to `messages`; default false.
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub token_ids: Vec<u32>,
    /// Vocabulary entries, e.g. `Ġworld`.
    pub tokens: Vec<String>,
    pub count: usize,
    pub max_model_len: usize,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "smollm2-135m-instruct", "token_ids": [19556, 905]}))]
pub struct DetokenizeRequest {
    pub model: String,
    pub token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub text: String,
}

/// Tokenize a prompt or a chat with the model's tokenizer and template.
#[utoipa::path(post, path = "/v1/tokenize", tag = "teacher", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn tokenize(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    Json(req): Json<TokenizeRequest>,
) -> Result<Response, ApiError> {
    let teacher = access::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    let ids = match (req.prompt, req.messages) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApiError::bad_request(
                "give exactly one input: `prompt` or `messages`",
            ))
        }
        (Some(prompt), None) => {
            teacher
                .tokenize_async(prompt, req.add_special_tokens.unwrap_or(true))
                .await?
        }
        (None, Some(messages)) if req.add_generation_prompt.unwrap_or(false) => {
            let messages = input::convert_messages(&messages)?;
            teacher.tokenize_chat(&messages, true).await?
        }
        (None, Some(messages)) => resolve_input(&teacher, None, None, Some(messages), true).await?,
    };
    // A 4 MiB prompt is a million tokens: build the answer off the async workers too.
    let t = teacher.clone();
    let body = tokio::task::spawn_blocking(move || {
        let tokens = ids.iter().map(|&id| t.token_str(id)).collect();
        serde_json::to_vec(&TokenizeResponse {
            count: ids.len(),
            token_ids: ids,
            tokens,
            max_model_len: t.info.context_length,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?
    .map_err(|e| ApiError::Internal(e.into()))?;
    let response = (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    Ok(access::provenance(response, &teacher))
}

/// Decode token ids to text.
#[utoipa::path(post, path = "/v1/detokenize", tag = "teacher", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn detokenize(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    Json(req): Json<DetokenizeRequest>,
) -> Result<Response, ApiError> {
    let teacher = access::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    let t = teacher.clone();
    let text = tokio::task::spawn_blocking(move || t.detokenize(&req.token_ids))
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
    let response = Json(DetokenizeResponse { text }).into_response();
    Ok(access::provenance(response, &teacher))
}
