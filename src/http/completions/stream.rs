//! `stream: true` for `/v1/completions`: one chunk per generated piece and a final chunk per
//! prompt (with its `prompt_logprobs`), through the shared SSE producer.

use std::sync::Arc;

use axum::response::Response;

use super::types::Chunk;
use super::{run_one, CompletionChoice, CompletionUsage, LegacyLogprobs, Plan};
use crate::http::input::f;
use crate::http::sse;
use crate::usage::Meter;

pub(super) fn stream(
    plan: Arc<Plan>,
    meter: Meter,
    prompts: Vec<Vec<u32>>,
    (id, created): (String, i64),
    include_usage: bool,
) -> Response {
    sse::stream(meter.clone(), move |sink| async move {
        let model = plan.teacher.info.id.clone();
        let chunk = |choices: Vec<CompletionChoice>, usage: Option<CompletionUsage>| Chunk {
            id: &id,
            object: "text_completion",
            created,
            model: &model,
            choices,
            usage,
        };
        let mut total = CompletionUsage::default();
        for (index, ids) in prompts.into_iter().enumerate() {
            let mut first = true;
            let t = plan.teacher.clone();
            let (choice, u) = run_one(&plan, &meter, index, ids.clone(), |d| {
                let logprobs = plan.logprobs.map(|_| LegacyLogprobs {
                    tokens: d.tokens.iter().map(|x| t.decode_one(x.id)).collect(),
                    token_logprobs: d.tokens.iter().map(|x| Some(f(x.logprob))).collect(),
                    top_logprobs: d
                        .tokens
                        .iter()
                        .map(|x| {
                            Some(
                                x.top
                                    .iter()
                                    .map(|&(id, v)| (t.decode_one(id), f(v)))
                                    .collect(),
                            )
                        })
                        .collect(),
                    text_offset: Vec::new(),
                });
                let mut text = d.text.clone();
                if first && plan.echo {
                    // Echoed prompt text leads the first chunk.
                    if let Ok(p) = t.detokenize(&ids) {
                        text = format!("{p}{text}");
                    }
                }
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: None,
                    prompt_logprobs: None,
                    prompt_token_ids: None,
                };
                first = false;
                // Serialised here, from the typed chunk (a `Value` would print f32s as f64s).
                let chunk = serde_json::to_string(&chunk(vec![choice], None));
                let sink = sink.clone_sender();
                async move {
                    match chunk {
                        Ok(c) => sink.send_json(c).await,
                        Err(_) => false,
                    }
                }
            })
            .await?;
            total.prompt_tokens += u.prompt_tokens;
            total.completion_tokens += u.completion_tokens;
            let last = CompletionChoice {
                index,
                text: if first && plan.echo {
                    choice.text.clone()
                } else {
                    String::new()
                },
                logprobs: None,
                finish_reason: choice.finish_reason,
                prompt_logprobs: choice.prompt_logprobs,
                prompt_token_ids: choice.prompt_token_ids,
            };
            if !sink.send(&chunk(vec![last], None)).await {
                return Ok(()); // the client left; what ran is recorded on the meter
            }
        }
        total.total_tokens = total.prompt_tokens + total.completion_tokens;
        if include_usage {
            sink.send(&chunk(Vec::new(), Some(total))).await;
        }
        Ok(())
    })
}
