//! The wire types of `/v1/completions` (OpenAI's, plus vLLM's `prompt_logprobs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::input;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[schema(example = json!({"model": "smollm2-135m-instruct", "prompt": [[1, 504, 3458]], "max_tokens": 0, "echo": true, "prompt_logprobs": 5}))]
pub struct CompletionRequest {
    pub model: String,
    #[schema(schema_with = input::prompt_schema)]
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
    #[schema(schema_with = input::stop_schema)]
    pub stop: Option<serde_json::Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"include_usage": true}` adds a final chunk with usage and no choices.
    #[serde(default, deserialize_with = "crate::http::extract::opt_object")]
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

#[derive(Serialize)]
pub(super) struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<CompletionUsage>,
}
