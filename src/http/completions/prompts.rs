//! Prompts of `/v1/completions`: OpenAI's many shapes in, vLLM's `prompt_logprobs` out.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::PromptLogprob;
use crate::engine::{PositionStats, Teacher};
use crate::error::ApiError;
use crate::http::input::f;

/// Parse OpenAI's many prompt shapes into token-id sequences (text is tokenized off the async
/// workers).
pub(super) async fn prompts(
    teacher: &Arc<Teacher>,
    prompt: &serde_json::Value,
    add_special: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    use serde_json::Value;
    let bad = || {
        ApiError::bad_param(
            "prompt",
            "prompt must be a string, an array of strings, an array of token ids or an array of token-id arrays",
        )
    };
    let ids_of = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let out = match prompt {
        Value::String(s) => vec![teacher.tokenize_async(s.clone(), add_special).await?],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad_param("prompt", "the prompt is empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids_of(items)?],
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let mut out = Vec::with_capacity(items.len());
            for s in items {
                let text = s.as_str().unwrap_or_default().to_string();
                out.push(teacher.tokenize_async(text, add_special).await?);
            }
            out
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|a| ids_of(a.as_array().map(Vec::as_slice).unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    for ids in &out {
        if ids.is_empty() {
            return Err(ApiError::bad_param("prompt", "the prompt is empty"));
        }
        teacher.check_ids(ids, "prompt")?;
        teacher.check_len(ids.len())?;
    }
    Ok(out)
}

/// vLLM's shape: `[null, {"<id>": {logprob, rank, decoded_token}, …}, …]` with the top-k plus
/// the actual token at every position.
pub(super) fn vllm_prompt_logprobs(
    t: &Teacher,
    ids: &[u32],
    rows: &[PositionStats],
    k: usize,
) -> Vec<Option<BTreeMap<String, PromptLogprob>>> {
    let mut out = vec![None];
    for (i, row) in rows.iter().enumerate() {
        let actual = ids[i + 1];
        let mut map = BTreeMap::new();
        for (rank0, (&id, &lp)) in row
            .top_ids
            .iter()
            .zip(&row.top_logprobs)
            .take(k)
            .enumerate()
        {
            map.insert(
                id.to_string(),
                PromptLogprob {
                    logprob: f(lp),
                    rank: rank0 as u32 + 1,
                    decoded_token: t.decode_one(id),
                },
            );
        }
        map.entry(actual.to_string())
            .or_insert_with(|| PromptLogprob {
                logprob: f(row.token_logprob),
                rank: row.token_rank,
                decoded_token: t.decode_one(actual),
            });
        out.push(Some(map));
    }
    out
}
