//! `POST /v1/judgments`: deterministic absolute and pairwise LLM-as-a-judge, optionally
//! batched with `items` (each item gets its result or its own error).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{access, gate};
use crate::auth::ClientCtx;
use crate::engine::{Teacher, JUDGE_TEMPLATE_VERSION};
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::Json;
use crate::usage::Meter;
use crate::AppState;

mod plan;
mod schema;
mod types;

pub use plan::{plan_one, Planned};

pub use schema::JudgmentResponse;
pub use types::*;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(judgments))
}

/// Runs one planned judgment: the endpoint's body for it (also a judgments batch line's).
pub async fn judge_one(teacher: &Teacher, planned: Planned) -> Result<JudgmentResult, ApiError> {
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
    let teacher = access::teacher_for(&state, &ctx, &req.model).await?;
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
        return Ok(access::provenance(Json(result).into_response(), &teacher));
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
    Ok(access::provenance(response, &teacher))
}
