//! The mistralrs backend for one teacher, with the hazards of mistralrs 0.8.1 handled.
//!
//! What mistralrs 0.8.1 does that shapes this file (read in `mistralrs-core-0.8.1`):
//!
//! * Its default scheduler buckets running sequences by `(length, token_offset)` and steps one
//!   bucket at a time, so only sequences of equal length are batched (no paged attention on
//!   CPU: `utils/mod.rs`, `paged_attn_supported`). Batched decode is wrong on CPU:
//!   `attention/backends/cpu.rs`, `flash_attn_cpu_single_q`, sizes its scratch buffers
//!   `kv_tiles * heads * head_dim` without the batch and reduces them for every sequence, so
//!   each sequence of a batched step but the last attends with another's values (measured by
//!   `teachd-bench`'s exactness section: 5-14 nats off from the second token; the CPU path is
//!   chosen unconditionally in `attention/mod.rs`, `run_attention`). Generations therefore run
//!   `engine.max_batch` at a time, which must be 1 on CPU.
//! * Raw-logits (teacher forcing) sequences break it: two in one prompt batch fail
//!   (`pipeline/response.rs`: "Raw response only supports batch size of 1"), one in the same
//!   bucket as a generation trips `assert!(... all return raw logits, or not)` in
//!   `engine/mod.rs` and kills the engine thread, and after its prompt step the engine sets the
//!   finished raw sequence back to `RunningCompletion` (`engine/mod.rs`, after
//!   `pipeline.step` for prompts), so it runs one leftover decode step that may land in a
//!   generation's bucket. A raw request is therefore never in an engine beside anything else.
//! * Where the native engine runs generations (CPU, a local llama GGUF file), teacher forcing
//!   runs on its model too by default (`scoring_engine = "native"`, [`Native::logits_all`]),
//!   one pass at a time behind a gate of its own, beside the generations: none of the hazards
//!   below apply to it, and no mistralrs instance computes anything (the generation instance
//!   then only renders chat templates, so it keeps the quantized weights).
//! * Otherwise on CPU (`scoring_engine = "separate"`) each teacher has a second engine instance
//!   that serves only teacher forcing, one request at a time: raw requests never wait behind
//!   generations, at the cost of a second copy of the weights in memory. With
//!   `scoring_engine = "shared"` (the default on CUDA, where weights are not doubled) one
//!   engine serves both behind a fair read-write gate: generations share it, a raw request
//!   takes it alone, and a waiting raw request stops new generations from being admitted, so
//!   it starts as soon as the running ones end.
//! * A batch line of teacher forcing of at most `engine.spare_max_tokens` tokens may run on
//!   the generation engine instead (with native scoring: a second native pass beside the
//!   first), alone, when a [`SpareTurn`] could be taken there: no
//!   generation holds or waits for a slot, nothing else holds the engine, and no interactive
//!   request came within `engine.spare_quiet_ms` (while interactive callers are about, the
//!   batch leaves the CPU to them). The batch runner
//!   takes one for a second line while the first runs on the scoring engine, so a batch runs
//!   two lines at once on an otherwise idle machine; a generation that arrives meanwhile waits
//!   for that one pass at most, as an interactive call waits for one batch line.
//! * A raw request's engine stays closed to the next one until the engine has dropped the
//!   sequence (its response channel closes) plus a short settle pause, and until the caller
//!   has scored its logits; the pause runs while the caller scores.
//! * Response receivers are always drained to the end by a spawned task, never dropped early
//!   (a dropped receiver panics the engine), even when the HTTP caller goes away.
//! * Prefix cache off: it would hand back cached logits that differ from a fresh pass.
//! * A closed channel (engine thread died) is retried on a fresh sender; `get_sender` reboots a
//!   dead engine.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use mistralrs_core::{
    Constraint, MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};
use rayon::prelude::*;
use tokio::sync::{
    mpsc, oneshot, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, OwnedSemaphorePermit, RwLock,
    Semaphore,
};

use super::native::Native;
use super::EngineError;

/// How often a request is re-sent when the engine's channel closes under it.
const MAX_ATTEMPTS: usize = 3;

/// One mistralrs engine instance and the gate in front of it.
struct Instance {
    mistral: Arc<MistralRs>,
    /// Generations hold it shared, raw requests alone.
    gate: Arc<RwLock<()>>,
}

pub struct Backend {
    generation: Arc<Instance>,
    /// teachd's own batched CPU decoder: runs the generations instead of the generation
    /// instance, which then serves only spare turns and chat templating.
    native: Option<Arc<Native>>,
    /// Where teacher forcing runs.
    scoring: Scoring,
    /// Generations running at once (the engine's batch).
    gen_slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    settle: Duration,
    /// Longest raw request a [`SpareTurn`] is given for (0: never).
    spare_max_tokens: usize,
    /// Slots of `gen_slots` (to tell whether a generation holds or waits for one).
    gen_slot_count: usize,
    /// Raw passes started on the scoring engine (or the one engine when shared).
    scoring_passes: AtomicU64,
    /// Raw passes started on spare turns of the generation engine.
    spare_passes: AtomicU64,
    /// No spare turn within this long of the last interactive request (generation or
    /// foreground teacher forcing).
    spare_quiet: Duration,
    /// When the last interactive request came.
    last_foreground: parking_lot::Mutex<Option<Instant>>,
    next_id: AtomicUsize,
}

/// Where a model's teacher forcing is to run, as chosen at load (`scoring_engine`).
pub enum ScoringOn {
    /// The native engine's model.
    Native,
    /// A mistralrs instance of its own.
    Instance(Arc<MistralRs>),
    /// The mistralrs generation instance, behind its read-write gate.
    Generation,
}

/// Where teacher forcing runs (`scoring_engine`).
enum Scoring {
    /// A mistralrs instance: one of its own (`separate`), or the generation one (`shared`).
    Mistral(Arc<Instance>),
    /// The native engine's model, one pass at a time behind this gate (`native`).
    Native(Arc<Native>, Arc<RwLock<()>>),
}

/// The engine one teacher-forcing pass runs on.
enum PassOn<'a> {
    Mistral(&'a Instance),
    Native(&'a Arc<Native>),
}

/// The generation engine, taken alone for one raw request while it was idle (see the module
/// notes). Dropping it unused gives the engine back at once.
pub struct SpareTurn(EngineTurn);

/// Where a teacher-forcing pass runs, and for whom.
pub enum Lane {
    /// An interactive request, on the scoring engine. It marks the model as in interactive use,
    /// which keeps spare turns away for `engine.spare_quiet_ms`.
    Foreground,
    /// Background work (a batch line), on the scoring engine.
    Background,
    /// Background work on the generation engine the spare turn holds.
    Spare(SpareTurn),
}

/// The guards of a turn, held only to be dropped.
#[allow(dead_code)]
enum Held {
    Shared(OwnedRwLockReadGuard<()>, OwnedSemaphorePermit),
    Alone(OwnedRwLockWriteGuard<()>),
}

/// A place in the engine, held by the request and by the task that drains its responses;
/// the engine opens to the next request when the last holder lets go.
pub struct EngineTurn {
    #[allow(dead_code)] // held for its drop
    held: Held,
    /// How long the drain task keeps holding the turn after the engine dropped the sequence
    /// (zero for generations). Counted from the drop, so it passes while the caller still
    /// scores the logits rather than after.
    settle: Duration,
}

/// Full-vocabulary logits of one teacher-forcing pass, `[len, vocab]` f32, held as the engine
/// produced them (no copy when they already are contiguous f32 on the CPU).
pub struct RawLogits {
    data: LogitsData,
    pub vocab: usize,
}

enum LogitsData {
    /// From mistralrs.
    Tensor(mistralrs::Tensor),
    /// From the native engine, row-major.
    Native(Vec<f32>),
}

impl RawLogits {
    /// The native engine's `[rows, vocab]` row-major logits.
    fn native(data: Vec<f32>, vocab: usize) -> Self {
        Self {
            data: LogitsData::Native(data),
            vocab,
        }
    }

    fn new(chunks: Vec<mistralrs::Tensor>) -> anyhow::Result<Self> {
        let tensor = match chunks.len() {
            0 => anyhow::bail!("the engine returned no logits"),
            1 => chunks.into_iter().next().expect("one chunk"),
            _ => mistralrs::Tensor::cat(&chunks, 0)?,
        };
        let (_, vocab) = tensor.dims2().context("logits are not [len, vocab]")?;
        let tensor = if tensor.dtype() == mistralrs::DType::F32 && tensor.is_contiguous() {
            tensor
        } else {
            tensor.to_dtype(mistralrs::DType::F32)?.contiguous()?
        };
        Ok(Self {
            data: LogitsData::Tensor(tensor),
            vocab,
        })
    }

    /// The logits as one row-major slice (row i predicts token i+1), borrowed in place.
    pub fn with_slice<R>(&self, f: impl FnOnce(&[f32]) -> R) -> anyhow::Result<R> {
        match &self.data {
            LogitsData::Tensor(tensor) => {
                with_cpu_f32(tensor, f)?.context("logits are not contiguous in CPU memory")
            }
            LogitsData::Native(data) => Ok(f(data)),
        }
    }

    /// A copy as a `Vec` (reference checks and tests).
    pub fn to_vec(&self) -> anyhow::Result<Vec<f32>> {
        self.with_slice(<[f32]>::to_vec)
    }
}

/// `f` over an f32 tensor's data borrowed in place; `None` when it is not contiguous CPU memory.
fn with_cpu_f32<R>(
    tensor: &mistralrs::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<Option<R>> {
    let (storage, layout) = tensor.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            Ok(Some(f(&cpu.as_slice::<f32>()?[start..end])))
        }
        _ => Ok(None),
    }
}

/// The per-step hook of a generation: given the (penalised) logits and the full context so
/// far, returns the token to emit. Runs on the engine thread.
pub type StepFn = Arc<dyn Fn(&[f32], &[u32]) -> u32 + Send + Sync>;

/// Counts a request as waiting while it exists.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend {
    /// `scoring`: where teacher forcing runs; [`ScoringOn::Native`] needs `native`.
    #[allow(clippy::too_many_arguments)] // each is one engine part or knob, named at the call
    pub fn new(
        generation: Arc<MistralRs>,
        scoring: ScoringOn,
        native: Option<Native>,
        max_batch: usize,
        max_queue: usize,
        settle: Duration,
        spare_max_tokens: usize,
        spare_quiet: Duration,
    ) -> anyhow::Result<Self> {
        let generation = Arc::new(Instance {
            mistral: generation,
            gate: Arc::new(RwLock::new(())),
        });
        let native = native.map(Arc::new);
        let scoring = match (scoring, &native) {
            (ScoringOn::Native, Some(native)) => {
                Scoring::Native(native.clone(), Arc::new(RwLock::new(())))
            }
            (ScoringOn::Native, None) => {
                anyhow::bail!("teacher forcing on the native engine needs the native engine")
            }
            (ScoringOn::Instance(mistral), _) => Scoring::Mistral(Arc::new(Instance {
                mistral,
                gate: Arc::new(RwLock::new(())),
            })),
            (ScoringOn::Generation, _) => Scoring::Mistral(generation.clone()),
        };
        Ok(Self {
            generation,
            native,
            scoring,
            gen_slots: Arc::new(Semaphore::new(max_batch.max(1))),
            gen_slot_count: max_batch.max(1),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_queue,
            settle,
            spare_max_tokens,
            scoring_passes: AtomicU64::new(0),
            spare_passes: AtomicU64::new(0),
            spare_quiet,
            last_foreground: parking_lot::Mutex::new(None),
            next_id: AtomicUsize::new(1),
        })
    }

    /// Whether teacher forcing has a lane of its own (the native engine's model, or a mistralrs
    /// instance of its own), so that it never waits behind generations.
    pub fn separate_scoring(&self) -> bool {
        match &self.scoring {
            Scoring::Mistral(instance) => !Arc::ptr_eq(&self.generation, instance),
            Scoring::Native(..) => true,
        }
    }

    /// What runs teacher forcing: `native`, `separate` (a mistralrs instance of its own) or
    /// `shared` (the mistralrs generation instance).
    pub fn scoring_engine(&self) -> &'static str {
        match &self.scoring {
            Scoring::Native(..) => "native",
            Scoring::Mistral(_) if self.separate_scoring() => "separate",
            Scoring::Mistral(_) => "shared",
        }
    }

    /// What runs generations (`native` or `mistralrs`) and how many at once.
    pub fn generation_engine(&self) -> (&'static str, usize) {
        let name = if self.native.is_some() {
            "native"
        } else {
            "mistralrs"
        };
        (name, self.gen_slot_count)
    }

    /// Raw passes started: (on the scoring engine, on spare turns of the generation engine).
    pub fn raw_passes(&self) -> (u64, u64) {
        (
            self.scoring_passes.load(Ordering::Relaxed),
            self.spare_passes.load(Ordering::Relaxed),
        )
    }

    /// Records an interactive request (it keeps spare turns away for a while).
    fn mark_foreground(&self) {
        *self.last_foreground.lock() = Some(Instant::now());
    }

    /// Whether no interactive request came within `spare_quiet`.
    fn quiet(&self) -> bool {
        self.last_foreground
            .lock()
            .is_none_or(|at| at.elapsed() >= self.spare_quiet)
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Whether a new request would be refused as overloaded right now.
    pub fn queue_full(&self) -> bool {
        self.queue_depth() >= self.max_queue
    }

    fn enqueue(&self) -> Result<Waiting, EngineError> {
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(self.waiting.clone());
        if queued >= self.max_queue {
            return Err(EngineError::Overloaded);
        }
        Ok(waiting)
    }

    /// Wait for a generation's place in the engine (one of `max_batch`); 503 `overloaded` when
    /// too many already wait.
    async fn generation_turn(&self) -> Result<EngineTurn, EngineError> {
        self.mark_foreground();
        let _waiting = self.enqueue()?;
        let permit = self
            .gen_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Unavailable("engine closed".into()))?;
        let guard = self.generation.gate.clone().read_owned().await;
        Ok(EngineTurn {
            held: Held::Shared(guard, permit),
            settle: Duration::ZERO,
        })
    }

    /// Wait for the scoring engine alone; 503 `overloaded` when too many already wait.
    async fn raw_turn(&self) -> Result<EngineTurn, EngineError> {
        let _waiting = self.enqueue()?;
        let (gate, settle) = match &self.scoring {
            Scoring::Mistral(instance) => (&instance.gate, self.settle),
            // No engine thread to settle: the pass ends when it returns.
            Scoring::Native(_, gate) => (gate, Duration::ZERO),
        };
        let guard = gate.clone().write_owned().await;
        Ok(EngineTurn {
            held: Held::Alone(guard),
            settle,
        })
    }

    /// The generation engine alone for one raw request of `len` tokens, if it is idle: a
    /// separate scoring engine exists, `len <= spare_max_tokens`, no interactive request came
    /// within `spare_quiet` (a spare pass shares the CPU with the scoring engine's, so it would
    /// make an interactive caller wait longer for the line in progress), and no generation
    /// holds or waits for a slot (a generation takes its slot before the gate). The gate can then be
    /// held only by an earlier spare pass that is ending (its leftover decode step and settle
    /// pause), which this waits out for up to a second; it gives up if a generation took a
    /// slot meanwhile.
    pub async fn spare(&self, len: usize) -> Option<SpareTurn> {
        let idle = || self.gen_slots.available_permits() == self.gen_slot_count;
        if !self.separate_scoring() || len > self.spare_max_tokens || !self.quiet() || !idle() {
            return None;
        }
        let wait = self.settle + Duration::from_secs(1);
        let guard = tokio::time::timeout(wait, self.generation.gate.clone().write_owned())
            .await
            .ok()?;
        let settle = match self.scoring {
            Scoring::Native(..) => Duration::ZERO,
            Scoring::Mistral(_) => self.settle,
        };
        (idle() && self.quiet()).then_some(SpareTurn(EngineTurn {
            held: Held::Alone(guard),
            settle,
        }))
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
                let logits = logits.to_dtype(mistralrs::DType::F32)?;
                let chosen = match with_cpu_f32(&logits, |row| step(row, context))? {
                    Some(chosen) => chosen,
                    // Not contiguous in CPU memory (a GPU model): copy the row out.
                    None => step(&logits.to_vec1::<f32>()?, context),
                };
                // Force the engine's argmax onto the token we chose: a one-hot bias on the
                // logits' own device.
                let vocab = logits.dim(0)?;
                let mut forced = vec![f32::NEG_INFINITY; vocab];
                forced[chosen as usize] = 0.0;
                mistralrs::Tensor::from_vec(forced, vocab, logits.device())
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

    /// Send a request to `instance` and drain its responses on a spawned task that also holds
    /// `turn` until the engine has dropped the sequence and the turn's settle pause has
    /// passed. Returns the first terminal response, or `None` when the channel closed before
    /// one arrived.
    async fn run_once(
        instance: &Instance,
        req: Request,
        mut rx: mpsc::Receiver<Response>,
        turn: Arc<EngineTurn>,
    ) -> Result<Option<Response>, EngineError> {
        let sender = instance
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
            // The engine dropped the sequence: only now, and after the settle pause, may the
            // next request start.
            if !turn.settle.is_zero() {
                tokio::time::sleep(turn.settle).await;
            }
            drop(turn);
        });
        Ok(first_rx.await.ok())
    }

    /// The turn and the engine for one teacher-forcing pass on `lane`, counted.
    async fn pass_turn(&self, lane: Lane) -> Result<(EngineTurn, PassOn<'_>), EngineError> {
        if matches!(lane, Lane::Foreground) {
            self.mark_foreground();
        }
        let (turn, counter, spare) = match lane {
            Lane::Spare(SpareTurn(turn)) => (turn, &self.spare_passes, true),
            _ => (self.raw_turn().await?, &self.scoring_passes, false),
        };
        let on = match (&self.scoring, spare) {
            // With native scoring a spare turn runs a second native pass, the same logits as
            // the scoring lane's; otherwise the mistralrs generation instance, given spare
            // turns only where it holds the same weights, dequantized alike (`load.rs`).
            (Scoring::Native(native, _), _) => PassOn::Native(native),
            (Scoring::Mistral(_), true) => PassOn::Mistral(&self.generation),
            (Scoring::Mistral(instance), false) => PassOn::Mistral(instance),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok((turn, on))
    }

    /// Teacher forcing: the full-vocabulary logits for every position of `tokens`, handed to
    /// `f` on a blocking thread. The scoring engine stays closed to the next pass until `f`
    /// returns, so at most one `[len, vocab]` buffer per model exists at a time.
    ///
    /// On the [`Lane`]'s engine: the scoring engine, or the generation engine a spare turn
    /// holds.
    pub async fn with_raw_logits<R, F>(
        &self,
        tokens: Vec<u32>,
        lane: Lane,
        f: F,
    ) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&RawLogits) -> R + Send + 'static,
    {
        match self.pass_turn(lane).await? {
            (turn, PassOn::Native(native)) => {
                let native = native.clone();
                let pass = move || {
                    Ok(RawLogits::native(
                        native.logits_all(&tokens)?,
                        native.vocab(),
                    ))
                };
                score_blocking(pass, f, turn).await
            }
            (turn, PassOn::Mistral(instance)) => self.mistral_pass(instance, tokens, turn, f).await,
        }
    }

    /// Teacher forcing scored row by row: `row(i, logits)` for every logits row `i` (the one
    /// that predicts token `i + 1`), side by side on rayon's pool; the results in row order.
    /// On the native engine each piece's rows are scored as soon as the pass has them, so no
    /// `[len, vocab]` buffer exists, only one piece's (`native::PREFILL_PIECE` rows); on
    /// mistralrs they are scored from its buffer, as in [`Backend::with_raw_logits`].
    pub async fn map_logit_rows<T, F>(
        &self,
        tokens: Vec<u32>,
        lane: Lane,
        row: F,
    ) -> Result<Vec<T>, EngineError>
    where
        T: Send + 'static,
        F: Fn(usize, &[f32]) -> T + Send + Sync + 'static,
    {
        match self.pass_turn(lane).await? {
            (turn, PassOn::Native(native)) => {
                let native = native.clone();
                tokio::task::spawn_blocking(move || {
                    let vocab = native.vocab();
                    let mut out = Vec::with_capacity(tokens.len());
                    native.logits_by_piece(&tokens, |first, rows| {
                        let scored = rows.par_chunks(vocab).enumerate();
                        out.par_extend(scored.map(|(j, r)| row(first + j, r)));
                    })?;
                    drop(turn);
                    Ok::<_, anyhow::Error>(out)
                })
                .await
                .map_err(|e| EngineError::Internal(anyhow!(e)))?
                .map_err(EngineError::Internal)
            }
            (turn, PassOn::Mistral(instance)) => {
                let scored = self
                    .mistral_pass(instance, tokens, turn, move |logits| {
                        if logits.vocab == 0 {
                            anyhow::bail!("the engine returned empty logit rows");
                        }
                        logits.with_slice(|data| {
                            let rows = data.par_chunks(logits.vocab).enumerate();
                            rows.map(|(i, r)| row(i, r)).collect::<Vec<_>>()
                        })
                    })
                    .await?;
                scored.map_err(EngineError::Internal)
            }
        }
    }

    /// One raw pass on a mistralrs instance, `f` over its logits (see
    /// [`Backend::with_raw_logits`]); retried on a fresh sender when the channel closes.
    async fn mistral_pass<R, F>(
        &self,
        instance: &Instance,
        tokens: Vec<u32>,
        turn: EngineTurn,
        f: F,
    ) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&RawLogits) -> R + Send + 'static,
    {
        let turn = Arc::new(turn);
        for attempt in 1..=MAX_ATTEMPTS {
            let mut sampling = SamplingParams::neutral();
            sampling.max_len = Some(0);
            let (req, rx) = self.request(
                RequestMessage::CompletionTokens(tokens.clone()),
                sampling,
                true,
                None,
            );
            match Self::run_once(instance, req, rx, turn.clone()).await? {
                Some(Response::Raw { logits_chunks, .. }) => {
                    return score_blocking(move || RawLogits::new(logits_chunks), f, turn).await;
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
            turn = self.generation_turn() => Arc::new(turn?),
            _ = abandoned.notified() => return Ok("abandoned".into()),
        };
        if let Some(native) = &self.native {
            // Holds the turn (a place among `native_max_batch`) until the generation ends.
            return native.generate(prompt, max_new_tokens, step).await;
        }
        for attempt in 1..=MAX_ATTEMPTS {
            let mut sampling = SamplingParams::neutral();
            sampling.max_len = Some(max_new_tokens);
            let (req, rx) = self.request(
                RequestMessage::CompletionTokens(prompt.clone()),
                sampling,
                false,
                Some(step.clone()),
            );
            match Self::run_once(&self.generation, req, rx, turn.clone()).await? {
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
            .generation
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

/// On a blocking thread: takes the logits from `logits`, hands them to `f`, and only then lets
/// go of `held` (the turn), so the next pass on that engine cannot overlap this one's buffer.
async fn score_blocking<R, F, H>(
    logits: impl FnOnce() -> anyhow::Result<RawLogits> + Send + 'static,
    f: F,
    held: H,
) -> Result<R, EngineError>
where
    R: Send + 'static,
    F: FnOnce(&RawLogits) -> R + Send + 'static,
    H: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let logits = logits()?;
        let out = f(&logits);
        drop(logits);
        drop(held);
        Ok::<_, anyhow::Error>(out)
    })
    .await
    .map_err(|e| EngineError::Internal(anyhow!(e)))?
    .map_err(EngineError::Internal)
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
