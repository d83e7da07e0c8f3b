//! teachd's own generation engine for CPU teachers: continuous batching over [`model::Model`].
//!
//! Why it exists: mistralrs 0.8.1 computes a batched decode step wrongly on CPU (see
//! `backend.rs`), so through it a CPU teacher could only run one generation at a time, and a
//! short generation waited for every generation before it. This engine runs up to
//! `engine.native_max_batch` generations at once on one thread, their decode steps batched
//! together (one pass over the weights per step, [`kernel`]). Each loop takes the generations
//! that arrived, admits those whose key/value cache fits beside the running ones
//! (`engine.native_kv_cache_mib`; the rest wait in arrival order), runs up to [`PREFILL_PIECE`]
//! prompt tokens, then one decode step for every running generation. A new generation therefore
//! starts after at most the decode step in progress, and a long prompt holds the running ones
//! up for one piece at a time.
//!
//! Teacher forcing runs on the same model ([`Native::logits_by_piece`], scored a piece at a
//! time, or [`Native::logits_all`]; `scoring_engine = "native"`, the default where this engine
//! runs): outside the engine loop, on the caller's blocking
//! thread, so it never waits for a decode step and no decode step waits for it (they share the
//! CPU). It runs the sequence in the same [`PREFILL_PIECE`] pieces as a generation's prompt, so
//! the logits after a prompt are the same bits in both.
//!
//! Tokens are chosen by the same per-request step function as on mistralrs ([`StepFn`]): the
//! engine hands it each step's logits and appends what it returns.

mod kernel;
pub mod model;

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use anyhow::Context;
use rayon::prelude::*;
use tokio::sync::oneshot;

use super::backend::StepFn;
use super::EngineError;
use model::{KvCache, Model};

/// How a native generation ended.
pub type Finish = Result<&'static str, String>;

struct Job {
    prompt: Vec<u32>,
    max_new: usize,
    step: StepFn,
    done: oneshot::Sender<Finish>,
}

struct Running {
    job: Job,
    cache: KvCache,
    /// The prompt, then each generated token.
    context: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: usize,
    /// Key/value cache bytes reserved for this sequence.
    reserved: usize,
}

/// Prompt tokens per prefill piece. A long prompt is run a piece per engine loop, with a
/// decode step of the running generations between pieces, so it holds them up for one piece
/// at a time, not for its whole length. The pieces always start at multiples of this, however
/// busy the engine is, so a prompt gives the same cache alone or beside others.
pub const PREFILL_PIECE: usize = 256;

pub struct Native {
    jobs: std_mpsc::Sender<Job>,
    /// Shared with the engine thread (read-only there too).
    model: Arc<Model>,
}

impl Native {
    /// Loads the model from a GGUF file and starts its engine thread. Its generations hold at
    /// most `kv_cache_bytes` of key/value cache together.
    pub fn start(
        path: &Path,
        eos: Vec<u32>,
        name: &str,
        kv_cache_bytes: usize,
    ) -> anyhow::Result<Self> {
        let model = Arc::new(Model::load(path)?);
        let full = model.cfg.context * model.cfg.kv_bytes_per_token();
        if kv_cache_bytes < full {
            anyhow::bail!(
                "engine.native_kv_cache_mib ({} MiB) cannot hold one sequence of the model's \
                 context ({} tokens, {} MiB)",
                kv_cache_bytes >> 20,
                model.cfg.context,
                full.div_ceil(1 << 20)
            );
        }
        // The loop runs on a worker of its own thread pool, so that the step's many short
        // parallel loops (each product, the attention) fork and join between the pool's
        // workers; called from outside a pool, each would hand its work over and put the
        // calling thread to sleep until it is done.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let thread = format!("native-{name}");
        let worker = thread.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{worker}-{i}"))
            .build()
            .context("native engine thread pool")?;
        let (jobs, rx) = std_mpsc::channel();
        let engine_model = model.clone();
        std::thread::Builder::new()
            .name(thread)
            .spawn(move || pool.install(|| Engine::new(engine_model, eos, kv_cache_bytes).run(rx)))
            .context("native engine thread")?;
        Ok(Self { jobs, model })
    }

    /// Width of a logits row (the model's vocabulary).
    pub fn vocab(&self) -> usize {
        self.model.cfg.vocab
    }

    /// Teacher forcing: the logits after every token of `tokens`, `[len, vocab]` row-major (row
    /// i predicts token i+1), in [`PREFILL_PIECE`] pieces. Blocking; runs on the calling
    /// thread and rayon's global pool, beside the engine loop rather than inside it. Holds one
    /// `[len, vocab]` buffer, the sequence's key/value cache and one piece's activations.
    pub fn logits_all(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        self.model.logits_all(tokens, PREFILL_PIECE)
    }

    /// [`Native::logits_all`] a piece at a time (see [`Model::logits_by_piece`]): holds one
    /// piece's logits (`PREFILL_PIECE` rows) instead of `[len, vocab]`.
    pub fn logits_by_piece(
        &self,
        tokens: &[u32],
        on_piece: impl FnMut(usize, &[f32]),
    ) -> anyhow::Result<()> {
        self.model.logits_by_piece(tokens, PREFILL_PIECE, on_piece)
    }

    /// Runs one generation to its end (end of sequence chosen by `step`, or `max_new` tokens).
    /// Returns the finish reason (`stop` or `length`).
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        max_new: usize,
        step: StepFn,
    ) -> Result<String, EngineError> {
        let (done, finished) = oneshot::channel();
        self.jobs
            .send(Job {
                prompt,
                max_new,
                step,
                done,
            })
            .map_err(|_| EngineError::Unavailable("the native engine stopped".into()))?;
        match finished.await {
            Ok(Ok(reason)) => Ok(reason.into()),
            Ok(Err(e)) => Err(EngineError::Internal(anyhow::anyhow!("native engine: {e}"))),
            Err(_) => Err(EngineError::Unavailable("the native engine stopped".into())),
        }
    }
}

struct Engine {
    model: Arc<Model>,
    eos: Vec<u32>,
    kv_cap: usize,
    /// Arrived, waiting for key/value cache room (first come, first served).
    waiting: VecDeque<Job>,
    /// Admitted, prompt not yet wholly in the cache.
    prefilling: VecDeque<Running>,
    decoding: Vec<Running>,
    kv_reserved: usize,
}

impl Engine {
    fn new(model: Arc<Model>, eos: Vec<u32>, kv_cap: usize) -> Self {
        Self {
            model,
            eos,
            kv_cap,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
            kv_reserved: 0,
        }
    }

    /// The engine loop: take what arrived, admit what fits, run one prefill piece's worth of
    /// prompts, then one decode step of every running generation. Sleeps on the queue when
    /// nothing is left; ends when every sender is gone.
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        loop {
            if self.waiting.is_empty() && self.prefilling.is_empty() && self.decoding.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            self.waiting.extend(jobs.try_iter());
            self.admit();
            self.prefill();
            self.decode();
        }
    }

    /// Moves waiting jobs into prefill, in arrival order, while their caches fit.
    fn admit(&mut self) {
        let cfg = &self.model.cfg;
        while let Some(job) = self.waiting.front() {
            if job.max_new == 0 {
                let job = self.waiting.pop_front().expect("a front");
                let _ = job.done.send(Ok("length"));
                continue;
            }
            let tokens = (job.prompt.len() + job.max_new).min(cfg.context);
            let reserved = tokens * cfg.kv_bytes_per_token();
            if self.kv_reserved + reserved > self.kv_cap {
                break;
            }
            let mut job = self.waiting.pop_front().expect("a front");
            self.kv_reserved += reserved;
            self.prefilling.push_back(Running {
                context: std::mem::take(&mut job.prompt),
                job,
                cache: KvCache::with_capacity(cfg, tokens),
                prefilled: 0,
                generated: 0,
                reserved,
            });
        }
    }

    /// Runs prompt pieces, first admitted first, until one piece's worth of tokens ran.
    fn prefill(&mut self) {
        let mut budget = PREFILL_PIECE;
        while budget > 0 {
            let Some(mut seq) = self.prefilling.pop_front() else {
                return;
            };
            let prompt_len = seq.context.len();
            let end = (seq.prefilled + PREFILL_PIECE).min(prompt_len);
            let piece = &seq.context[seq.prefilled..end];
            budget = budget.saturating_sub(piece.len());
            // Logits only after the last piece; the others just fill the cache.
            let ran = guarded(|| {
                if end < prompt_len {
                    self.model.append(&mut seq.cache, piece).map(|_| None)
                } else {
                    self.model.prefill(&mut seq.cache, piece).map(Some)
                }
            });
            seq.prefilled = end;
            match ran {
                Err(e) => self.finish(seq, Err(e)),
                Ok(None) => self.prefilling.push_front(seq),
                Ok(Some(logits)) => {
                    match advance(&mut seq, &logits, &self.eos, self.model.cfg.context) {
                        Some(finish) => self.finish(seq, finish),
                        None => self.decoding.push(seq),
                    }
                }
            }
        }
    }

    fn decode(&mut self) {
        if self.decoding.is_empty() {
            return;
        }
        let tokens: Vec<u32> = self
            .decoding
            .iter()
            .map(|s| *s.context.last().expect("a running sequence has a token"))
            .collect();
        let step = {
            let mut caches: Vec<&mut KvCache> =
                self.decoding.iter_mut().map(|s| &mut s.cache).collect();
            guarded(|| self.model.decode(&mut caches, &tokens))
        };
        let mut running = std::mem::take(&mut self.decoding);
        match step {
            Ok(logits) => {
                let (vocab, context, eos) =
                    (self.model.cfg.vocab, self.model.cfg.context, &self.eos);
                // The step functions (log-softmax over the vocabulary, top-k, the sample) run
                // side by side: each reads only its own row.
                let ends: Vec<Option<Finish>> = running
                    .par_iter_mut()
                    .zip(logits.par_chunks_exact(vocab))
                    .map(|(seq, row)| advance(seq, row, eos, context))
                    .collect();
                for (seq, end) in running.into_iter().zip(ends) {
                    match end {
                        Some(finish) => self.finish(seq, finish),
                        None => self.decoding.push(seq),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "native decode step failed");
                for seq in running {
                    self.finish(seq, Err(e.clone()));
                }
            }
        }
    }

    /// Answers the sequence's caller and frees its cache.
    fn finish(&mut self, seq: Running, finish: Finish) {
        self.kv_reserved -= seq.reserved;
        let _ = seq.job.done.send(finish);
    }
}

/// Hands one step's logits to the sequence's step function and appends its token; returns how
/// the sequence ended, if it did.
fn advance(seq: &mut Running, logits: &[f32], eos: &[u32], context: usize) -> Option<Finish> {
    let step = seq.job.step.clone();
    let token = match std::panic::catch_unwind(AssertUnwindSafe(|| step(logits, &seq.context))) {
        Ok(token) => token,
        Err(_) => return Some(Err("the step function panicked".into())),
    };
    seq.context.push(token);
    seq.generated += 1;
    if eos.contains(&token) {
        Some(Ok("stop"))
    } else if seq.generated >= seq.job.max_new || seq.context.len() >= context {
        Some(Ok("length"))
    } else {
        None
    }
}

/// Runs model work, turning an error or a panic into a message (the engine thread survives).
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err("the model panicked".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, OnceLock};

    use super::*;

    /// The default teacher GGUF: `TEACHD_TEST_MODEL`, else fetched by the script.
    fn model() -> &'static Arc<Model> {
        static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
        MODEL.get_or_init(|| {
            let path = match std::env::var("TEACHD_TEST_MODEL") {
                Ok(p) => p,
                Err(_) => {
                    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
                    let out = std::process::Command::new("bash")
                        .arg(root.join("scripts/fetch-model.sh"))
                        .output()
                        .expect("run scripts/fetch-model.sh");
                    assert!(out.status.success(), "fetch-model failed");
                    String::from_utf8(out.stdout).unwrap().trim().into()
                }
            };
            Arc::new(Model::load(Path::new(&path)).expect("load the default model"))
        })
    }

    fn prompt(len: usize, seed: u32) -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i * 7919 + seed * 104_729) % 40_000 + 2)
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Teacher forcing gives, at every position, the bits a generation's prompt pass gives
    /// there, and a row does not depend on how much of the sequence follows it.
    #[test]
    fn teacher_forcing_rows_match_the_prompt_pass_and_ignore_what_follows() {
        let m = model();
        let v = m.cfg.vocab;
        let p = prompt(PREFILL_PIECE + 45, 6);
        let all = m.logits_all(&p, PREFILL_PIECE).unwrap();
        assert_eq!(all.len(), p.len() * v);
        // The prompt pass as the engine runs it: piece by piece, logits after the last token.
        let mut cache = KvCache::with_capacity(&m.cfg, p.len());
        m.append(&mut cache, &p[..PREFILL_PIECE]).unwrap();
        let last = m.prefill(&mut cache, &p[PREFILL_PIECE..]).unwrap();
        assert_eq!(&all[(p.len() - 1) * v..], &last[..]);
        for len in [1, 100, PREFILL_PIECE, PREFILL_PIECE + 10] {
            let short = m.logits_all(&p[..len], PREFILL_PIECE).unwrap();
            assert_eq!(&short[..], &all[..len * v], "first {len} tokens");
        }
        assert!(all.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn a_decode_step_gives_the_same_bits_alone_or_batched() {
        let m = model();
        let cfg = &m.cfg;
        let prompts = [prompt(40, 1), prompt(7, 2), prompt(300, 3)];
        let fresh = || -> Vec<KvCache> {
            prompts
                .iter()
                .map(|p| {
                    let mut c = KvCache::with_capacity(cfg, p.len() + 4);
                    m.prefill(&mut c, p).unwrap();
                    c
                })
                .collect()
        };
        let next = [11, 12, 13];
        // Each alone, two steps.
        let mut alone = Vec::new();
        for (i, mut c) in fresh().into_iter().enumerate() {
            let first = m.decode(&mut [&mut c], &next[i..=i]).unwrap();
            let second = m.decode(&mut [&mut c], &[5]).unwrap();
            alone.push((first, second));
        }
        // All three together, two steps.
        let mut caches = fresh();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let first = m.decode(&mut refs, &next).unwrap();
        let second = m.decode(&mut refs, &[5, 5, 5]).unwrap();
        let v = cfg.vocab;
        for (i, (a1, a2)) in alone.iter().enumerate() {
            assert_eq!(&first[i * v..(i + 1) * v], &a1[..], "sequence {i}, step 1");
            assert_eq!(&second[i * v..(i + 1) * v], &a2[..], "sequence {i}, step 2");
        }
    }

    #[test]
    fn decode_and_prefill_agree_and_pieces_match_one_pass() {
        let m = model();
        let cfg = &m.cfg;
        let p = prompt(PREFILL_PIECE + 45, 4);
        // The whole prompt in one pass vs in pieces.
        let mut whole = KvCache::with_capacity(cfg, p.len() + 1);
        let one = m.prefill(&mut whole, &p).unwrap();
        let mut pieces = KvCache::with_capacity(cfg, p.len() + 1);
        m.append(&mut pieces, &p[..PREFILL_PIECE]).unwrap();
        let split = m.prefill(&mut pieces, &p[PREFILL_PIECE..]).unwrap();
        assert!(max_diff(&one, &split) < 1e-3, "{}", max_diff(&one, &split));
        // The last prompt token by decode vs by prefill.
        let mut short = KvCache::with_capacity(cfg, p.len());
        m.prefill(&mut short, &p[..p.len() - 1]).unwrap();
        let stepped = m.decode(&mut [&mut short], &p[p.len() - 1..]).unwrap();
        assert!(
            max_diff(&one, &stepped) < 1e-3,
            "{}",
            max_diff(&one, &stepped)
        );
        let argmax = |x: &[f32]| {
            x.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        assert_eq!(argmax(&one), argmax(&stepped));
    }

    /// Runs two generations of `steps` tokens each (reserving the model's whole context) on an
    /// engine with `kv_cache_bytes`; returns which generation each step belonged to, in order.
    fn step_order(kv_cache_bytes: usize, steps: usize) -> Vec<usize> {
        let cfg = model().cfg.clone();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (jobs, rx) = std_mpsc::channel();
        let mut done = Vec::new();
        for g in 0..2 {
            let log = log.clone();
            let step: StepFn = Arc::new(move |_logits: &[f32], context: &[u32]| {
                log.lock().unwrap().push(g);
                let generated = context.len() - 3;
                // Token 0 is this test's end of sequence.
                if generated + 1 >= steps {
                    0
                } else {
                    1
                }
            });
            let (tx, finished) = oneshot::channel();
            jobs.send(Job {
                prompt: vec![1, 2, 3],
                max_new: cfg.context,
                step,
                done: tx,
            })
            .unwrap();
            done.push(finished);
        }
        drop(jobs);
        Engine::new(model().clone(), vec![0], kv_cache_bytes).run(rx);
        for d in done {
            assert_eq!(d.blocking_recv().unwrap(), Ok("stop"));
        }
        let order = log.lock().unwrap().clone();
        order
    }

    #[test]
    fn generations_wait_for_key_value_cache_room() {
        let cfg = &model().cfg;
        let full = cfg.context * cfg.kv_bytes_per_token();
        // Room for one whole-context sequence: the second starts when the first ends.
        assert_eq!(step_order(full, 4), vec![0, 0, 0, 0, 1, 1, 1, 1]);
        // Room for both: they run side by side (within a step, in either order).
        let order = step_order(2 * full, 4);
        for pair in order.chunks(2) {
            assert!(pair == [0, 1] || pair == [1, 0], "{order:?}");
        }
    }
}
