//! The wire types of `/v1/chat/completions` (OpenAI's, plus vLLM's
//! `return_tokens_as_token_ids`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::completions::{CompletionUsage, StreamOptions};
use crate::http::input::{self, Message};

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[schema(example = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16, "logprobs": true, "top_logprobs": 5, "seed": 7}))]
pub struct ChatRequest {
    pub model: String,
    #[serde(deserialize_with = "crate::http::extract::vec_object")]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Preferred over `max_tokens` when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
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
    #[serde(default, deserialize_with = "crate::http::extract::opt_object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0..=max_top_k; needs `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// vLLM extension: render every `token` as `token_id:<id>`, so clients get exact ids.
    #[serde(default)]
    pub return_tokens_as_token_ids: Option<bool>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatResponse {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: CompletionUsage,
    pub system_fingerprint: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}
