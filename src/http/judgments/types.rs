//! The wire types of `/v1/judgments`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ErrorBody;

pub(crate) const MAX_SCALE_POINTS: i64 = 100;
pub(crate) const MAX_ITEMS: usize = 256;

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Absolute,
    Pairwise,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RubricSpec {
    pub criteria: String,
    /// `[min, max]`, integers, at most 100 points.
    #[serde(default)]
    #[schema(min_items = 2, max_items = 2)]
    pub scale: Option<[i64; 2]>,
    /// Optional description per score, keyed by the score.
    #[serde(default)]
    pub descriptions: BTreeMap<String, String>,
}

/// One judgment. In a batch (`items`), `model` comes from the top level.
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgmentSpec {
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub instruction: Option<String>,
    /// Absolute mode: the response to grade.
    #[serde(default)]
    pub response: Option<String>,
    /// Absolute mode: an optional reference answer.
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default, deserialize_with = "crate::http::extract::opt_object")]
    pub rubric: Option<RubricSpec>,
    /// Pairwise mode: exactly two responses, A then B.
    #[serde(default)]
    pub responses: Option<Vec<String>>,
    /// Pairwise: |pA - pB| under this is a tie (default 0.1).
    #[serde(default)]
    pub tie_margin: Option<f64>,
    /// Return the judge prompt's token ids (to reproduce the score with /v1/logprobs).
    #[serde(default)]
    pub include_prompt: Option<bool>,
}

/// Its schema is written by hand (`schema.rs`): `JudgmentSpec`'s fields plus `model` and `items`, in
/// one object that allows nothing else (a derived `allOf` of two closed objects admits no value).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JudgmentRequest {
    pub model: String,
    #[serde(flatten)]
    pub spec: JudgmentSpec,
    #[serde(default, deserialize_with = "crate::http::extract::opt_vec_object")]
    pub items: Option<Vec<JudgmentSpec>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JudgeInfo {
    pub template_version: String,
    pub template_sha256: String,
    pub rubric_sha256: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct JudgmentUsage {
    pub prompt_tokens: usize,
    pub scored_tokens: usize,
    pub total_tokens: usize,
    pub judgments: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PairwiseOrderOut {
    pub presented: Vec<String>,
    #[schema(value_type = Object)]
    pub preference: BTreeMap<String, f64>,
    pub template_sha256: String,
}

/// One judgment's result (fields by mode).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JudgmentResult {
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub distribution: Option<BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub preference: Option<BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub winner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orders: Option<Vec<PairwiseOrderOut>>,
    pub judge: JudgeInfo,
    pub usage: JudgmentUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<Vec<u32>>>,
}

/// Its schema is written by hand (`schema.rs`): `index` plus either the result's fields or `error`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchItem {
    pub index: usize,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub result: Option<JudgmentResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub object: String,
    pub model: String,
    pub results: Vec<BatchItem>,
    pub usage: JudgmentUsage,
}
