//! Validating and tokenizing one judgment before anything runs: its exact cost is known then.

use super::{JudgmentSpec, Mode, RubricSpec, MAX_SCALE_POINTS};
use crate::engine::{AbsolutePlan, PairwisePlan, Rubric, Teacher};
use crate::error::ApiError;
use std::collections::BTreeMap;

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
pub enum Planned {
    Absolute(AbsolutePlan, bool),
    Pairwise(PairwisePlan, bool),
}

impl Planned {
    /// Tokens the judgment's passes run through the teacher.
    pub fn cost(&self) -> usize {
        match self {
            Planned::Absolute(p, _) => p.cost(),
            Planned::Pairwise(p, _) => p.cost(),
        }
    }
}

/// Validates and tokenizes one judgment (the endpoint's and a batch line's).
pub async fn plan_one(teacher: &Teacher, spec: &JudgmentSpec) -> Result<Planned, ApiError> {
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
