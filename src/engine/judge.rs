//! LLM-as-a-judge from the teacher's next-token distribution, versioned and reproducible.
//!
//! The judge prompt (template v1 below) ends with an answer prefix (`Score:` / `Better:`); each
//! candidate answer (` 1` … ` 10`, ` A`, ` B`) is a token sequence whose probability comes from
//! teacher forcing. A candidate that is a proper prefix of another (` 1` of ` 10`) is counted
//! only when the answer ends there: its probability is multiplied by the mass of the tokens
//! that do not continue a number. Probabilities are renormalised over the candidates.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use super::{math, ChatMessage, EngineError, Teacher};

pub const TEMPLATE_VERSION: &str = "teachd-judge-v1";

const SYSTEM: &str = "You are a strict, fair evaluator. You grade responses against a rubric and reply with the answer only.";
const ABSOLUTE_PREFIX: &str = "Score:";
const PAIRWISE_PREFIX: &str = "Better:";
const DEFAULT_PAIRWISE_CRITERIA: &str =
    "Which response follows the instruction better: more helpful, correct and clear?";

#[derive(Clone, Debug)]
pub struct Rubric {
    pub criteria: String,
    pub scale: (i64, i64),
    pub descriptions: BTreeMap<i64, String>,
}

impl Rubric {
    /// SHA-256 of the rubric's canonical encoding (criteria, scale, descriptions by score).
    pub fn sha256(&self) -> String {
        let canonical = serde_json::json!({
            "criteria": self.criteria,
            "scale": [self.scale.0, self.scale.1],
            "descriptions": self.descriptions.iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>(),
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

/// What a judgment reports about how it was made.
#[derive(Clone, Debug)]
pub struct JudgeStamp {
    pub template_version: &'static str,
    /// SHA-256 of the rendered judge prompt text (system + user + answer prefix).
    pub template_sha256: String,
    pub rubric_sha256: Option<String>,
}

#[derive(Clone, Debug)]
pub struct AbsoluteJudgment {
    /// Renormalised probability of each scale point.
    pub distribution: BTreeMap<i64, f64>,
    pub score: f64,
    pub verdict: i64,
    pub stamp: JudgeStamp,
    pub prompt_token_ids: Vec<u32>,
    /// Tokens run through the teacher (all passes).
    pub tokens_processed: usize,
}

#[derive(Clone, Debug)]
pub struct PairwiseOrder {
    /// The original labels in the order they were presented, e.g. `["B", "A"]`.
    pub presented: [&'static str; 2],
    /// Probability that response A (the first given) is better, in this order.
    pub p_a: f64,
    pub template_sha256: String,
    pub prompt_token_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct PairwiseJudgment {
    pub p_a: f64,
    pub orders: Vec<PairwiseOrder>,
    pub rubric_sha256: Option<String>,
    pub tokens_processed: usize,
    /// Both orders prefer the same response.
    pub consistent: bool,
    /// `A`, `B` or `tie` (see [`pairwise_verdict`]).
    pub winner: &'static str,
}

fn render_absolute(
    instruction: &str,
    response: &str,
    reference: Option<&str>,
    rubric: &Rubric,
) -> String {
    let mut u = format!("### Instruction\n{instruction}\n\n### Response\n{response}\n\n");
    if let Some(r) = reference {
        u.push_str(&format!("### Reference answer\n{r}\n\n"));
    }
    u.push_str(&format!(
        "### Rubric\n{}\nScale: {} (worst) to {} (best).\n",
        rubric.criteria, rubric.scale.0, rubric.scale.1
    ));
    for (score, d) in &rubric.descriptions {
        u.push_str(&format!("{score}: {d}\n"));
    }
    u.push_str(&format!(
        "\nGrade the response on the rubric. Reply with one integer from {} to {} and nothing else.",
        rubric.scale.0, rubric.scale.1
    ));
    u
}

fn render_pairwise(instruction: &str, first: &str, second: &str, criteria: &str) -> String {
    format!(
        "### Instruction\n{instruction}\n\n### Response A\n{first}\n\n### Response B\n{second}\n\n### Criteria\n{criteria}\n\nWhich response is better? Reply with A or B and nothing else."
    )
}

fn template_sha(user: &str, prefix: &str) -> String {
    let mut h = Sha256::new();
    for part in [TEMPLATE_VERSION, SYSTEM, user, prefix] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Which teacher-forcing passes score a set of candidate answers after a prompt: one pass per
/// candidate that no other candidate extends, skipped when earlier passes already gave every
/// distribution it needs. Depends only on the candidates' tokens, so the cost of a judgment is
/// known exactly before it runs.
fn passes(candidates: &[Vec<u32>]) -> Vec<usize> {
    let is_prefix_of_other = |i: usize| {
        candidates
            .iter()
            .enumerate()
            .any(|(j, c)| j != i && c.len() > candidates[i].len() && c.starts_with(&candidates[i]))
    };
    let mut covered: std::collections::HashSet<&[u32]> = Default::default();
    let mut out = Vec::new();
    for (i, leaf) in candidates.iter().enumerate() {
        if is_prefix_of_other(i) {
            continue;
        }
        if (0..leaf.len()).all(|k| covered.contains(&leaf[..k])) {
            continue;
        }
        for k in 0..=leaf.len() {
            covered.insert(&leaf[..k]);
        }
        out.push(i);
    }
    out
}

/// A judgment's prompt and candidates, tokenized, with the exact number of tokens its passes
/// run through the teacher.
#[derive(Clone, Debug)]
pub struct Scoring {
    pub prompt: Vec<u32>,
    candidates: Vec<Vec<u32>>,
    passes: Vec<usize>,
    pub template_sha256: String,
}

impl Scoring {
    /// Tokens the passes run through the teacher (the cost to reserve).
    pub fn cost(&self) -> usize {
        self.passes
            .iter()
            .map(|&i| self.prompt.len() + self.candidates[i].len())
            .sum()
    }
}

/// An absolute judgment, planned.
#[derive(Clone, Debug)]
pub struct AbsolutePlan {
    scoring: Scoring,
    points: Vec<i64>,
    rubric_sha256: String,
}

impl AbsolutePlan {
    pub fn cost(&self) -> usize {
        self.scoring.cost()
    }
}

/// A pairwise judgment, planned: both presentation orders.
#[derive(Clone, Debug)]
pub struct PairwisePlan {
    orders: Vec<([&'static str; 2], Scoring)>,
    rubric_sha256: Option<String>,
    tie_margin: f64,
}

impl PairwisePlan {
    pub fn cost(&self) -> usize {
        self.orders.iter().map(|(_, s)| s.cost()).sum()
    }
}

/// Pairwise policy: the orders agree when both prefer the same response; the winner is a tie
/// when they disagree or when |pA - pB| is under the tie margin.
pub fn pairwise_verdict(
    p_a: f64,
    orders: &[PairwiseOrder],
    tie_margin: f64,
) -> (bool, &'static str) {
    let consistent = orders
        .windows(2)
        .all(|w| (w[0].p_a > 0.5) == (w[1].p_a > 0.5));
    let winner = if !consistent || (2.0 * p_a - 1.0).abs() < tie_margin {
        "tie"
    } else if p_a > 0.5 {
        "A"
    } else {
        "B"
    };
    (consistent, winner)
}

/// The SHA-256 of a pairwise judgment's criteria, as a rubric without a scale.
pub fn criteria_sha256(criteria: &str) -> String {
    Rubric {
        criteria: criteria.to_string(),
        scale: (0, 0),
        descriptions: BTreeMap::new(),
    }
    .sha256()
}

impl Teacher {
    /// Which tokens start with a digit (after optional whitespace): the tokens that continue a
    /// number. Computed once per teacher, not per judgment (a scan of the whole vocabulary).
    fn digit_start(&self) -> &[bool] {
        self.digit_start.get_or_init(|| {
            (0..self.info.vocab_size as u32)
                .map(|id| {
                    self.token_bytes(id)
                        .iter()
                        .find(|b| !b.is_ascii_whitespace())
                        .is_some_and(|b| b.is_ascii_digit())
                })
                .collect()
        })
    }

    async fn judge_prompt(&self, user: String, prefix: &str) -> Result<Vec<u32>, EngineError> {
        let messages = [
            ChatMessage {
                role: "system".into(),
                content: SYSTEM.into(),
            },
            ChatMessage {
                role: "user".into(),
                content: user,
            },
        ];
        let mut ids = self.tokenize_chat(&messages, true).await?;
        ids.extend(self.tokenize(prefix, false)?);
        Ok(ids)
    }

    async fn scoring(
        &self,
        user: String,
        prefix: &str,
        candidates: Vec<Vec<u32>>,
    ) -> Result<Scoring, EngineError> {
        let template_sha256 = template_sha(&user, prefix);
        let prompt = self.judge_prompt(user, prefix).await?;
        let passes = passes(&candidates);
        for &i in &passes {
            self.check_len(prompt.len() + candidates[i].len())?;
        }
        Ok(Scoring {
            prompt,
            candidates,
            passes,
            template_sha256,
        })
    }

    /// Probability of each candidate answer after the prompt (not renormalised). Each
    /// candidate is a token sequence; see the module docs for prefixes.
    async fn candidate_probs(&self, s: &Scoring) -> Result<Vec<f64>, EngineError> {
        let candidates = &s.candidates;
        let prompt = &s.prompt;
        let is_prefix_of_other = |i: usize| {
            candidates.iter().enumerate().any(|(j, c)| {
                j != i && c.len() > candidates[i].len() && c.starts_with(&candidates[i])
            })
        };
        // Key: the candidate tokens after the prompt; value: log-softmax of the next token.
        let mut rows: HashMap<Vec<u32>, Vec<f64>> = HashMap::new();
        for &leaf_index in &s.passes {
            let leaf = &candidates[leaf_index];
            let mut seq = prompt.to_vec();
            seq.extend(leaf);
            let (logits, vocab) = self.raw_logits(&seq).await?;
            for k in 0..=leaf.len() {
                let key = leaf[..k].to_vec();
                if rows.contains_key(&key) {
                    continue;
                }
                let row_index = prompt.len() - 1 + k;
                if (row_index + 1) * vocab <= logits.len() {
                    let row = &logits[row_index * vocab..(row_index + 1) * vocab];
                    rows.insert(key, math::log_softmax(row, 1.0));
                }
            }
        }
        let digit_start = self.digit_start();
        let mut out = Vec::with_capacity(candidates.len());
        for (i, c) in candidates.iter().enumerate() {
            let mut lp = 0.0;
            for k in 0..c.len() {
                let dist = rows.get(&c[..k]).ok_or_else(|| {
                    EngineError::Internal(anyhow::anyhow!("judge: missing distribution"))
                })?;
                lp += dist[c[k] as usize];
            }
            if is_prefix_of_other(i) {
                let after = rows.get(c.as_slice()).ok_or_else(|| {
                    EngineError::Internal(anyhow::anyhow!(
                        "judge: missing continuation distribution"
                    ))
                })?;
                let continue_mass: f64 = after
                    .iter()
                    .zip(digit_start)
                    .filter(|(_, &d)| d)
                    .map(|(x, _)| x.exp())
                    .sum();
                lp += (1.0 - continue_mass).max(1e-300).ln();
            }
            out.push(lp.exp());
        }
        Ok(out)
    }

    /// Tokenizes an absolute judgment: its exact cost is known before anything runs.
    pub async fn plan_absolute(
        &self,
        instruction: &str,
        response: &str,
        reference: Option<&str>,
        rubric: &Rubric,
    ) -> Result<AbsolutePlan, EngineError> {
        let user = render_absolute(instruction, response, reference, rubric);
        let points: Vec<i64> = (rubric.scale.0..=rubric.scale.1).collect();
        let candidates = points
            .iter()
            .map(|s| self.tokenize(&format!(" {s}"), false))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AbsolutePlan {
            scoring: self.scoring(user, ABSOLUTE_PREFIX, candidates).await?,
            points,
            rubric_sha256: rubric.sha256(),
        })
    }

    pub async fn judge_absolute(
        &self,
        plan: AbsolutePlan,
    ) -> Result<AbsoluteJudgment, EngineError> {
        let probs = self.candidate_probs(&plan.scoring).await?;
        let total: f64 = probs.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return Err(EngineError::Internal(anyhow::anyhow!(
                "judge: no mass on the scale"
            )));
        }
        let points = &plan.points;
        let distribution: BTreeMap<i64, f64> = points
            .iter()
            .zip(&probs)
            .map(|(&s, &p)| (s, p / total))
            .collect();
        let score = distribution.iter().map(|(&s, &p)| s as f64 * p).sum();
        let verdict = distribution
            .iter()
            .fold(
                (points[0], -1.0),
                |best, (&s, &p)| if p > best.1 { (s, p) } else { best },
            )
            .0;
        let tokens_processed = plan.cost();
        Ok(AbsoluteJudgment {
            distribution,
            score,
            verdict,
            stamp: JudgeStamp {
                template_version: TEMPLATE_VERSION,
                template_sha256: plan.scoring.template_sha256,
                rubric_sha256: Some(plan.rubric_sha256),
            },
            prompt_token_ids: plan.scoring.prompt,
            tokens_processed,
        })
    }

    /// Tokenizes a pairwise judgment (both orders): its exact cost is known before it runs.
    pub async fn plan_pairwise(
        &self,
        instruction: &str,
        a: &str,
        b: &str,
        criteria: Option<&str>,
        tie_margin: f64,
    ) -> Result<PairwisePlan, EngineError> {
        let rubric_sha256 = criteria.map(criteria_sha256);
        let criteria = criteria
            .filter(|c| !c.trim().is_empty())
            .unwrap_or(DEFAULT_PAIRWISE_CRITERIA);
        let candidates = vec![self.tokenize(" A", false)?, self.tokenize(" B", false)?];
        let mut orders = Vec::new();
        for presented in [["A", "B"], ["B", "A"]] {
            let (first, second) = if presented[0] == "A" { (a, b) } else { (b, a) };
            let user = render_pairwise(instruction, first, second, criteria);
            orders.push((
                presented,
                self.scoring(user, PAIRWISE_PREFIX, candidates.clone())
                    .await?,
            ));
        }
        Ok(PairwisePlan {
            orders,
            rubric_sha256,
            tie_margin,
        })
    }

    pub async fn judge_pairwise(
        &self,
        plan: PairwisePlan,
    ) -> Result<PairwiseJudgment, EngineError> {
        let tokens_processed = plan.cost();
        let mut orders = Vec::new();
        for (presented, scoring) in plan.orders {
            let probs = self.candidate_probs(&scoring).await?;
            let p_first = probs[0] / (probs[0] + probs[1]);
            let p_a = if presented[0] == "A" {
                p_first
            } else {
                1.0 - p_first
            };
            orders.push(PairwiseOrder {
                presented,
                p_a,
                template_sha256: scoring.template_sha256,
                prompt_token_ids: scoring.prompt,
            });
        }
        let p_a = orders.iter().map(|o| o.p_a).sum::<f64>() / orders.len() as f64;
        let (consistent, winner) = pairwise_verdict(p_a, &orders, plan.tie_margin);
        Ok(PairwiseJudgment {
            p_a,
            orders,
            rubric_sha256: plan.rubric_sha256,
            tokens_processed,
            consistent,
            winner,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_cover_every_distribution_once() {
        // " 1", " 10", " 2" as [sp, 1], [sp, 1, 0], [sp, 2]: " 1" is a prefix of " 10".
        let c = vec![vec![9, 1], vec![9, 1, 0], vec![9, 2]];
        assert_eq!(passes(&c), vec![1]); // " 10" gives [], [sp], [sp,1], [sp,1,0]; " 2" needs [sp]
        let c = vec![vec![5], vec![6]];
        assert_eq!(passes(&c), vec![0]);
    }
}
