//! `POST /v1/judgments`: deterministic absolute and pairwise LLM-as-a-judge, optionally
//! batched with `items` (each item gets its result or its own error).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{common, gate};
use crate::auth::ClientCtx;
use crate::engine::{AbsolutePlan, PairwisePlan, Rubric, Teacher, JUDGE_TEMPLATE_VERSION};
use crate::error::{ApiError, ErrorBody, ErrorEnvelope, Json};
use crate::usage::Meter;
use crate::AppState;

mod schema;
pub use schema::JudgmentResponse;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(judgments))
}

const MAX_SCALE_POINTS: i64 = 100;
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
    #[serde(default, deserialize_with = "crate::http::de::opt_object")]
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
    #[serde(default, deserialize_with = "crate::http::de::opt_vec_object")]
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

fn parse_rubric(spec: Option<&RubricSpec>) -> Result<Rubric, ApiError> {
    let spec = spec.ok_or_else(|| ApiError::bad_param("rubric", "absolute mode needs a rubric"))?;
    if spec.criteria.trim().is_empty() {
        return Err(ApiError::bad_param(
            "rubric.criteria",
            "criteria must not be empty",
        ));
    }
    let [lo, hi] = spec.scale.unwrap_or([1, 5]);
    if lo >= hi {
        return Err(ApiError::bad_param(
            "rubric.scale",
            "scale must be [min, max] with min < max",
        ));
    }
    // Checked: `[i64::MIN, i64::MAX]` must be a 400, not an overflow.
    if hi
        .checked_sub(lo)
        .is_none_or(|span| span >= MAX_SCALE_POINTS)
    {
        return Err(ApiError::bad_param(
            "rubric.scale",
            format!("a scale has at most {MAX_SCALE_POINTS} points"),
        ));
    }
    let mut descriptions = BTreeMap::new();
    for (k, v) in &spec.descriptions {
        let score: i64 = k.parse().map_err(|_| {
            ApiError::bad_param(
                "rubric.descriptions",
                format!("description key `{k}` is not an integer"),
            )
        })?;
        if score < lo || score > hi {
            return Err(ApiError::bad_param(
                "rubric.descriptions",
                format!("description key {score} is outside the scale"),
            ));
        }
        descriptions.insert(score, v.clone());
    }
    Ok(Rubric {
        criteria: spec.criteria.clone(),
        scale: (lo, hi),
        descriptions,
    })
}

fn required<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, ApiError> {
    match v.as_deref() {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(ApiError::bad_param(
            name,
            format!("{name} must not be empty"),
        )),
    }
}

/// One judgment, validated and tokenized: its exact cost is known before anything runs.
enum Planned {
    Absolute(AbsolutePlan, bool),
    Pairwise(PairwisePlan, bool),
}

impl Planned {
    fn cost(&self) -> usize {
        match self {
            Planned::Absolute(p, _) => p.cost(),
            Planned::Pairwise(p, _) => p.cost(),
        }
    }
}

async fn plan_one(teacher: &Teacher, spec: &JudgmentSpec) -> Result<Planned, ApiError> {
    let instruction = required(&spec.instruction, "instruction")?;
    let include_prompt = spec.include_prompt.unwrap_or(false);
    match spec.mode.clone().unwrap_or(Mode::Absolute) {
        Mode::Absolute => {
            if spec.responses.is_some() {
                return Err(ApiError::bad_param(
                    "responses",
                    "absolute mode takes `response`, not `responses`",
                ));
            }
            let response = required(&spec.response, "response")?;
            let rubric = parse_rubric(spec.rubric.as_ref())?;
            let plan = teacher
                .plan_absolute(instruction, response, spec.reference.as_deref(), &rubric)
                .await?;
            Ok(Planned::Absolute(plan, include_prompt))
        }
        Mode::Pairwise => {
            if spec.response.is_some() {
                return Err(ApiError::bad_param(
                    "response",
                    "pairwise mode takes `responses`, not `response`",
                ));
            }
            let responses = spec.responses.as_deref().unwrap_or_default();
            if responses.len() != 2 {
                return Err(ApiError::bad_param(
                    "responses",
                    "pairwise mode needs exactly two responses",
                ));
            }
            if responses.iter().any(|r| r.trim().is_empty()) {
                return Err(ApiError::bad_param(
                    "responses",
                    "responses must not be empty",
                ));
            }
            let margin = spec.tie_margin.unwrap_or(0.1);
            if !(0.0..=1.0).contains(&margin) {
                return Err(ApiError::bad_param(
                    "tie_margin",
                    "tie_margin must be in [0, 1]",
                ));
            }
            let criteria = spec.rubric.as_ref().map(|r| r.criteria.as_str());
            let plan = teacher
                .plan_pairwise(instruction, &responses[0], &responses[1], criteria, margin)
                .await?;
            Ok(Planned::Pairwise(plan, include_prompt))
        }
    }
}

async fn judge_one(teacher: &Teacher, planned: Planned) -> Result<JudgmentResult, ApiError> {
    match planned {
        Planned::Absolute(plan, include_prompt) => {
            let j = teacher.judge_absolute(plan).await?;
            Ok(JudgmentResult {
                mode: Mode::Absolute,
                score: Some(j.score),
                verdict: Some(j.verdict),
                distribution: Some(
                    j.distribution
                        .iter()
                        .map(|(k, v)| (k.to_string(), *v))
                        .collect(),
                ),
                preference: None,
                winner: None,
                consistent: None,
                orders: None,
                judge: JudgeInfo {
                    template_version: JUDGE_TEMPLATE_VERSION.into(),
                    template_sha256: j.stamp.template_sha256,
                    rubric_sha256: j.stamp.rubric_sha256,
                },
                usage: JudgmentUsage {
                    prompt_tokens: j.prompt_token_ids.len(),
                    scored_tokens: j.tokens_processed,
                    total_tokens: j.tokens_processed,
                    judgments: 1,
                },
                prompt_token_ids: include_prompt.then(|| vec![j.prompt_token_ids]),
            })
        }
        Planned::Pairwise(plan, include_prompt) => {
            let j = teacher.judge_pairwise(plan).await?;
            let pref =
                |p_a: f64| BTreeMap::from([("A".to_string(), p_a), ("B".to_string(), 1.0 - p_a)]);
            let prompt_tokens = j.orders.iter().map(|o| o.prompt_token_ids.len()).sum();
            Ok(JudgmentResult {
                mode: Mode::Pairwise,
                score: None,
                verdict: None,
                distribution: None,
                preference: Some(pref(j.p_a)),
                winner: Some(j.winner.into()),
                consistent: Some(j.consistent),
                judge: JudgeInfo {
                    template_version: JUDGE_TEMPLATE_VERSION.into(),
                    template_sha256: j.orders[0].template_sha256.clone(),
                    rubric_sha256: j.rubric_sha256.clone(),
                },
                usage: JudgmentUsage {
                    prompt_tokens,
                    scored_tokens: j.tokens_processed,
                    total_tokens: j.tokens_processed,
                    judgments: 1,
                },
                prompt_token_ids: include_prompt.then(|| {
                    j.orders
                        .iter()
                        .map(|o| o.prompt_token_ids.clone())
                        .collect()
                }),
                orders: Some(
                    j.orders
                        .into_iter()
                        .map(|o| PairwiseOrderOut {
                            presented: o.presented.iter().map(|s| s.to_string()).collect(),
                            preference: pref(o.p_a),
                            template_sha256: o.template_sha256,
                        })
                        .collect(),
                ),
            })
        }
    }
}

fn is_empty_spec(s: &JudgmentSpec) -> bool {
    s.mode.is_none()
        && s.instruction.is_none()
        && s.response.is_none()
        && s.reference.is_none()
        && s.rubric.is_none()
        && s.responses.is_none()
        && s.tie_margin.is_none()
        && s.include_prompt.is_none()
}

/// Grade responses with the teacher (absolute or pairwise), one or a batch.
#[utoipa::path(post, path = "/v1/judgments", tag = "teacher", request_body = JudgmentRequest,
    responses(
        (status = 200, description = "A judgment, or with `items` a list of per-item results/errors", body = JudgmentResponse),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn judgments(
    State(state): State<AppState>,
    ctx: ClientCtx,
    meter: Meter,
    Json(req): Json<JudgmentRequest>,
) -> Result<Response, ApiError> {
    let teacher = common::teacher_for(&state, &ctx, &req.model).await?;
    meter.serve(&teacher);
    let Some(items) = req.items else {
        // One judgment: its cost is exact once it is planned; a started pass is paid for.
        let planned = plan_one(&teacher, &req.spec).await?;
        meter.reserve(planned.cost() as u64).await?;
        let t = teacher.clone();
        let result = gate::detached(&meter, move |m| async move {
            let r = judge_one(&t, planned).await?;
            m.record(|u| {
                u.prompt_tokens += r.usage.total_tokens as u64;
                u.scored_tokens += r.usage.scored_tokens as u64;
                u.judgments += 1;
            });
            Ok(r)
        })
        .await?;
        return Ok(common::provenance(Json(result).into_response(), &teacher));
    };
    if !is_empty_spec(&req.spec) {
        return Err(ApiError::bad_param(
            "items",
            "with `items`, give the judgment fields inside each item",
        ));
    }
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(ApiError::bad_param(
            "items",
            format!("items must hold 1 to {MAX_ITEMS} judgments"),
        ));
    }
    // Plan every item first: bad items get their error without costing anything, and the
    // reservation is the exact cost of the good ones.
    let mut planned = Vec::with_capacity(items.len());
    for item in &items {
        planned.push(plan_one(&teacher, item).await);
    }
    let cost: usize = planned.iter().flatten().map(Planned::cost).sum();
    meter.reserve(cost as u64).await?;
    let t = teacher.clone();
    let results = gate::detached(&meter, move |m| async move {
        let mut results = Vec::with_capacity(planned.len());
        for (index, plan) in planned.into_iter().enumerate() {
            // Every item ends with its result or its own error; the items that ran are paid
            // for (recorded as each completes) even when a later one fails.
            let outcome = match plan {
                Ok(plan) => judge_one(&t, plan).await,
                Err(e) => Err(e),
            };
            results.push(match outcome {
                Ok(r) => {
                    m.record(|u| {
                        u.prompt_tokens += r.usage.total_tokens as u64;
                        u.scored_tokens += r.usage.scored_tokens as u64;
                        u.judgments += 1;
                    });
                    BatchItem {
                        index,
                        result: Some(r),
                        error: None,
                    }
                }
                Err(e) => BatchItem {
                    index,
                    result: None,
                    error: Some(e.envelope(crate::error::current_request_id()).error),
                },
            });
        }
        Ok(results)
    })
    .await?;
    let mut total = JudgmentUsage::default();
    for r in results.iter().filter_map(|i| i.result.as_ref()) {
        total.prompt_tokens += r.usage.prompt_tokens;
        total.scored_tokens += r.usage.scored_tokens;
        total.total_tokens += r.usage.total_tokens;
        total.judgments += 1;
    }
    let response = Json(BatchResponse {
        object: "list".into(),
        model: teacher.info.id.clone(),
        results,
        usage: total,
    })
    .into_response();
    Ok(common::provenance(response, &teacher))
}
