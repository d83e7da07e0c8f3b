//! The mistralrs backend for one teacher, with the hazards of mistralrs 0.8.1 handled:
//!
//! * Prefix cache off: it would hand back cached logits that differ from a fresh pass.
//! * One engine request at a time (a FIFO gate): concurrent raw requests of equal length fail,
//!   raw + generation at once panics the engine thread.
//! * After a request finishes, the gate stays closed until the engine has dropped the sequence
//!   (the response channel closes) plus a short settle pause: a leftover decode step batched
//!   with the next request panics the engine.
//! * Response receivers are always drained to the end by a spawned task, never dropped early
//!   (a dropped receiver panics the engine), even when the HTTP caller goes away.
//! * A closed channel (engine thread died) is retried on a fresh sender; `get_sender` reboots a
//!   dead engine.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use mistralrs_core::{
    Constraint, MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};
use tokio::sync::{mpsc, oneshot, Mutex, OwnedMutexGuard};

use super::EngineError;

/// How often a request is re-sent when the engine's channel closes under it.
const MAX_ATTEMPTS: usize = 3;

pub struct Backend {
    mistral: Arc<MistralRs>,
    gate: Arc<Mutex<()>>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    settle: Duration,
    next_id: AtomicUsize,
}

/// Exclusive use of the engine. Dropping it keeps the gate closed for the settle pause.
pub struct EngineTurn {
    guard: Option<OwnedMutexGuard<()>>,
    settle: Duration,
}

impl Drop for EngineTurn {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            let settle = self.settle;
            tokio::spawn(async move {
                tokio::time::sleep(settle).await;
                drop(guard);
            });
        }
    }
}

/// The per-step hook of a generation: given the (penalised) logits and the full context so
/// far, returns the token to emit. Runs on the engine thread.
pub type StepFn = Arc<dyn Fn(&[f32], &[u32]) -> u32 + Send + Sync>;

impl Backend {
    pub fn new(mistral: Arc<MistralRs>, max_queue: usize, settle: Duration) -> Self {
        Self {
            mistral,
            gate: Arc::new(Mutex::new(())),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_queue,
            settle,
            next_id: AtomicUsize::new(1),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Whether a new request would be refused as overloaded right now.
    pub fn queue_full(&self) -> bool {
        self.queue_depth() >= self.max_queue
    }

    /// Wait for exclusive use of the engine; 503 `overloaded` when too many already wait.
    pub async fn turn(&self) -> Result<EngineTurn, EngineError> {
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        struct Dec(Arc<AtomicUsize>);
        impl Drop for Dec {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _dec = Dec(self.waiting.clone());
        if queued >= self.max_queue {
            return Err(EngineError::Overloaded);
        }
        let guard = self.gate.clone().lock_owned().await;
        Ok(EngineTurn {
            guard: Some(guard),
            settle: self.settle,
        })
    }

    fn request(
        &self,
        messages: RequestMessage,
        sampling: SamplingParams,
        raw: bool,
        processor: Option<StepFn>,
    ) -> (Request, mpsc::Receiver<Response>) {
        let (tx, rx) = mpsc::channel(64);
        let logits_processors = processor.map(|step| {
            let f = move |logits: &mistralrs::Tensor, context: &[u32]| {
                let values: Vec<f32> = logits.to_dtype(mistralrs::DType::F32)?.to_vec1()?;
                let chosen = step(&values, context);
                // Force the engine's argmax onto the token we chose.
                let mut forced = vec![f32::NEG_INFINITY; values.len()];
                forced[chosen as usize] = 0.0;
                mistralrs::Tensor::from_vec(forced, values.len(), logits.device())
            };
            vec![Arc::new(f) as Arc<dyn mistralrs_core::CustomLogitsProcessor>]
        });
        let req = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors,
            return_raw_logits: raw,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        (req, rx)
    }

    /// Send a request and drain its responses on a spawned task that also holds `turn` until
    /// the engine has dropped the sequence. Returns the first terminal response, or `None`
    /// when the channel closed before one arrived.
    async fn run_once(
        &self,
        req: Request,
        mut rx: mpsc::Receiver<Response>,
        turn: Arc<EngineTurn>,
    ) -> Result<Option<Response>, EngineError> {
        let sender = self
            .mistral
            .get_sender(None)
            .map_err(|e| EngineError::Unavailable(format!("engine sender: {e}")))?;
        if sender.send(req).await.is_err() {
            return Ok(None);
        }
        let (first_tx, first_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            while let Some(resp) = rx.recv().await {
                if is_terminal(&resp) {
                    if let Some(tx) = first_tx.take() {
                        let _ = tx.send(resp);
                    }
                }
            }
            // The engine dropped the sequence: only now may the next request start.
            drop(turn);
        });
        Ok(first_rx.await.ok())
    }

    /// Teacher forcing: full-vocabulary logits for every position of `tokens`, as one
    /// row-major `[len, vocab]` buffer. Row i predicts token i+1.
    pub async fn raw_logits(&self, tokens: Vec<u32>) -> Result<(Vec<f32>, usize), EngineError> {
        let turn = Arc::new(self.turn().await?);
        for attempt in 1..=MAX_ATTEMPTS {
            let mut sampling = SamplingParams::neutral();
            sampling.max_len = Some(0);
            let (req, rx) = self.request(
                RequestMessage::CompletionTokens(tokens.clone()),
                sampling,
                true,
                None,
            );
            match self.run_once(req, rx, turn.clone()).await? {
                Some(Response::Raw { logits_chunks, .. }) => {
                    return tokio::task::spawn_blocking(move || flatten_logits(logits_chunks))
                        .await
                        .map_err(|e| EngineError::Internal(anyhow!(e)))?
                        .map_err(EngineError::Internal);
                }
                Some(other) => return Err(response_error(other)),
                None => {
                    tracing::warn!(
                        attempt,
                        "engine channel closed during a raw request; retrying"
                    );
                }
            }
        }
        Err(EngineError::Unavailable(
            "the engine closed the request channel repeatedly".into(),
        ))
    }

    /// Generation from `prompt`, with `step` choosing every token. Resolves when the engine
    /// has finished the sequence; returns the engine's finish reason. When `abandoned` fires
    /// while the generation still waits for the engine, it leaves the queue at once (its
    /// queue slot is freed, nothing runs) and resolves with `"abandoned"`.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        max_new_tokens: usize,
        step: StepFn,
        started: Arc<AtomicBool>,
        abandoned: Arc<tokio::sync::Notify>,
    ) -> Result<String, EngineError> {
        let turn = tokio::select! {
            turn = self.turn() => Arc::new(turn?),
            _ = abandoned.notified() => return Ok("abandoned".into()),
        };
        for attempt in 1..=MAX_ATTEMPTS {
            let mut sampling = SamplingParams::neutral();
            sampling.max_len = Some(max_new_tokens);
            let (req, rx) = self.request(
                RequestMessage::CompletionTokens(prompt.clone()),
                sampling,
                false,
                Some(step.clone()),
            );
            match self.run_once(req, rx, turn.clone()).await? {
                Some(Response::CompletionDone(done)) => {
                    return Ok(done
                        .choices
                        .first()
                        .map(|c| c.finish_reason.clone())
                        .unwrap_or_else(|| "stop".into()));
                }
                Some(other) => return Err(response_error(other)),
                // Retrying after tokens were emitted would duplicate them.
                None if started.load(Ordering::SeqCst) => break,
                None => {
                    tracing::warn!(attempt, "engine channel closed during generation; retrying");
                }
            }
        }
        Err(EngineError::Unavailable(
            "the engine closed the generation channel".into(),
        ))
    }

    /// Render a chat with the model's template and tokenize it (through the engine, which
    /// owns the template and its Jinja environment).
    pub async fn tokenize_chat(
        &self,
        messages: Vec<indexmap::IndexMap<String, mistralrs_core::MessageContent>>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let sender = self
            .mistral
            .get_sender(None)
            .map_err(|e| EngineError::Unavailable(format!("engine sender: {e}")))?;
        let (tx, mut rx) = mpsc::channel(1);
        let req = Request::Tokenize(mistralrs_core::TokenizationRequest {
            text: either::Either::Left(messages),
            tools: None,
            add_generation_prompt,
            add_special_tokens: true,
            enable_thinking: None,
            reasoning_effort: None,
            response: tx,
        });
        sender
            .send(req)
            .await
            .map_err(|_| EngineError::Unavailable("engine channel closed".into()))?;
        // Receive on a spawned task so the receiver outlives a cancelled caller.
        let result = tokio::spawn(async move { rx.recv().await })
            .await
            .map_err(|e| EngineError::Internal(anyhow!(e)))?;
        match result {
            Some(Ok(ids)) => Ok(ids),
            Some(Err(e)) => Err(EngineError::BadInput {
                message: format!("cannot render the chat template: {e}"),
                param: Some("messages"),
            }),
            None => Err(EngineError::Unavailable("engine channel closed".into())),
        }
    }
}

fn is_terminal(resp: &Response) -> bool {
    !matches!(resp, Response::Chunk(_) | Response::CompletionChunk(_))
}

fn response_error(resp: Response) -> EngineError {
    match resp {
        Response::ValidationError(e) => EngineError::BadInput {
            message: e.to_string(),
            param: None,
        },
        Response::InternalError(e) => EngineError::Internal(anyhow!("engine: {e}")),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
            EngineError::Internal(anyhow!("model: {e}"))
        }
        _ => EngineError::Internal(anyhow!("unexpected engine response")),
    }
}

fn flatten_logits(chunks: Vec<mistralrs::Tensor>) -> anyhow::Result<(Vec<f32>, usize)> {
    let mut out = Vec::new();
    let mut vocab = 0;
    for chunk in chunks {
        let chunk = chunk.to_dtype(mistralrs::DType::F32)?;
        let dims = chunk.dims().to_vec();
        vocab = *dims.last().context("logits without dims")?;
        out.extend(chunk.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, vocab))
}
