//! Driving a generation for the OpenAI-style endpoints: incremental detokenization, stop
//! strings (never streamed partially), and which tokens' logprobs belong to the output.

use std::sync::Arc;

use crate::engine::{FinishReason, GenEvent, GenToken, GenerateParams, Teacher};
use crate::error::ApiError;
use crate::usage::Meter;

/// One server-sent event of a streamed generation (`stream: true`), as the schema of each
/// event of a `text/event-stream` response.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// A JSON chunk (`chat.completion.chunk` or `text_completion`), an error envelope if the
    /// generation fails mid-stream, and `[DONE]` last.
    pub data: String,
    pub event: Option<String>,
}

/// A piece of output: new text and the generated tokens that produced it.
#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<GenToken>,
}

#[derive(Debug)]
pub struct Finished {
    pub finish_reason: &'static str,
    /// Tokens sampled (the compute spent), the end-of-sequence token included.
    pub sampled_tokens: usize,
}

/// Incremental decoder with stop-string handling.
struct Decoder {
    teacher: Arc<Teacher>,
    ids: Vec<u32>,
    /// Generated tokens not yet attached to an emitted delta.
    pending: Vec<GenToken>,
    /// Byte length of the decoded text before each pending token.
    pending_start: Vec<usize>,
    emitted: usize,
    text: String,
    stops: Vec<String>,
}

impl Decoder {
    fn new(teacher: Arc<Teacher>, stops: Vec<String>) -> Self {
        Self {
            teacher,
            ids: Vec::new(),
            pending: Vec::new(),
            pending_start: Vec::new(),
            emitted: 0,
            text: String::new(),
            stops,
        }
    }

    fn stable_len(text: &str) -> usize {
        text.trim_end_matches('\u{FFFD}').len()
    }

    /// Add a token; returns the delta that may be emitted now and whether a stop string ended
    /// the output.
    fn push(&mut self, tok: GenToken) -> Result<(Delta, bool), ApiError> {
        self.pending_start.push(Self::stable_len(&self.text));
        self.ids.push(tok.id);
        self.pending.push(tok);
        self.text = self.teacher.detokenize(&self.ids)?;
        let stable = Self::stable_len(&self.text);

        // A stop string anywhere in the new text ends the output just before it.
        let search_from = self
            .emitted
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| search_from + p)
            })
            .min();
        if let Some(end) = hit {
            return Ok((self.take_until(end), true));
        }
        // Hold back a suffix that could still become a stop string.
        let mut limit = stable;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if limit >= k
                    && self.text.is_char_boundary(limit - k)
                    && s.is_char_boundary(k)
                    && self.text[..limit].ends_with(&s[..k])
                {
                    limit -= k;
                    break;
                }
            }
        }
        Ok((self.take_until(limit.max(self.emitted)), false))
    }

    /// Emit text up to byte `end` with the pending tokens that start before it.
    fn take_until(&mut self, end: usize) -> Delta {
        let end = floor_char_boundary(&self.text, end).max(self.emitted);
        let text = self.text[self.emitted..end].to_string();
        let n = self
            .pending_start
            .iter()
            .take_while(|&&start| start < end)
            .count();
        let tokens: Vec<GenToken> = self.pending.drain(..n).collect();
        self.pending_start.drain(..n);
        self.emitted = end;
        Delta { text, tokens }
    }

    fn flush(&mut self) -> Delta {
        let end = self.text.len();
        let mut d = self.take_until(end);
        d.tokens.append(&mut self.pending);
        self.pending_start.clear();
        d
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Run one generation, calling `on_delta` for each piece of output as it becomes final.
/// `on_delta` resolving to false (the client went away) stops the generation early; so does
/// dropping this future. Every sampled token is recorded on `meter` as it arrives (and, with
/// `bill_prompt`, the prompt once the engine has run it), so every exit path bills exactly
/// what was produced.
pub async fn run<F, Fut>(
    teacher: &Arc<Teacher>,
    meter: &Meter,
    bill_prompt: bool,
    params: GenerateParams,
    stops: Vec<String>,
    mut on_delta: F,
) -> Result<Finished, ApiError>
where
    F: FnMut(Delta) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let prompt_len = if bill_prompt {
        params.prompt.len() as u64
    } else {
        0
    };
    let mut handle = teacher.generate(params)?;
    let mut decoder = Decoder::new(teacher.clone(), stops);
    let mut sampled = 0usize;
    let mut stopped_by_string = false;
    while let Some(event) = handle.events.recv().await {
        match event {
            GenEvent::Token(tok) => {
                meter.record(|u| {
                    if sampled == 0 {
                        u.prompt_tokens += prompt_len;
                    }
                    u.generated_tokens += 1;
                });
                sampled += 1;
                if stopped_by_string {
                    continue;
                }
                if teacher.is_eos(tok.id) {
                    continue;
                }
                let (delta, hit) = decoder.push(tok)?;
                if (!delta.text.is_empty() || !delta.tokens.is_empty()) && !on_delta(delta).await {
                    handle.stop();
                    stopped_by_string = true;
                }
                if hit {
                    stopped_by_string = true;
                    handle.stop();
                }
            }
            GenEvent::Done(reason) => {
                if !stopped_by_string {
                    let rest = decoder.flush();
                    if !rest.text.is_empty() || !rest.tokens.is_empty() {
                        on_delta(rest).await;
                    }
                }
                let finish_reason = if stopped_by_string {
                    "stop"
                } else {
                    match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    }
                };
                return Ok(Finished {
                    finish_reason,
                    sampled_tokens: sampled,
                });
            }
            GenEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal(anyhow::anyhow!(
        "generation ended without a result"
    )))
}

/// OpenAI's `stop`: a string or an array of up to 4 strings.
pub fn parse_stop(stop: Option<serde_json::Value>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => vec![s],
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(ApiError::bad_param(
                    "stop",
                    "stop must be a string or an array of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_param(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if stops.len() > 4 {
        return Err(ApiError::bad_param("stop", "at most 4 stop sequences"));
    }
    if stops.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_param(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stops)
}

/// `max_tokens` resolved against the context and the server cap.
pub fn resolve_max_tokens(
    teacher: &Teacher,
    prompt_len: usize,
    requested: Option<i64>,
    default: usize,
    param: &str,
) -> Result<usize, ApiError> {
    let room = teacher.info.context_length.saturating_sub(prompt_len);
    let cap = teacher.max_new_tokens().min(room);
    match requested {
        None => Ok(default.min(cap)),
        Some(n) if n < 0 => Err(ApiError::bad_param(param, format!("{param} must be >= 0"))),
        Some(n) if n as usize > teacher.max_new_tokens() => Err(ApiError::bad_param(
            param,
            format!(
                "{param} is {n}; the server allows at most {}",
                teacher.max_new_tokens()
            ),
        )),
        Some(n) if n as usize > room => Err(ApiError::PayloadTooLarge {
            message: format!(
                "prompt ({prompt_len} tokens) + {param} ({n}) exceeds the context length {}",
                teacher.info.context_length
            ),
            code: Some("context_length_exceeded"),
        }),
        Some(n) => Ok(n as usize),
    }
}
