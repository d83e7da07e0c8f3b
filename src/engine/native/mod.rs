//! teachd's own generation engine for CPU teachers: continuous batching over [`model::Model`].
//!
//! Why it exists: mistralrs 0.8.1 computes a batched decode step wrongly on CPU (see
//! `backend.rs`), so through it a CPU teacher could only run one generation at a time, and a
//! short generation waited for every generation before it. This engine runs up to
//! `engine.native_max_batch` generations at once on one thread: each loop admits the
//! generations that arrived (one prefill each), then runs one decode step for all of them
//! together. A new generation therefore starts after at most the decode step in progress, and
//! the running ones pause only for its prefill. Teacher forcing stays on mistralrs (the scoring
//! engine), so every logprob teachd reports from teacher forcing is unchanged.
//!
//! Tokens are chosen by the same per-request step function as on mistralrs ([`StepFn`]): the
//! engine hands it each step's logits and appends what it returns.

pub mod model;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc as std_mpsc;

use anyhow::Context;
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
    context: Vec<u32>,
    generated: usize,
}

pub struct Native {
    jobs: std_mpsc::Sender<Job>,
}

impl Native {
    /// Loads the model from a GGUF file and starts its engine thread.
    pub fn start(path: &Path, eos: Vec<u32>, name: &str) -> anyhow::Result<Self> {
        let model = Model::load(path)?;
        let (jobs, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name(format!("native-{name}"))
            .spawn(move || run(model, rx, eos))
            .context("native engine thread")?;
        Ok(Self { jobs })
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

/// The engine loop: admit what arrived, then one batched decode step; sleeps on the queue when
/// nothing runs. Ends when every sender is gone.
fn run(model: Model, jobs: std_mpsc::Receiver<Job>, eos: Vec<u32>) {
    let mut running: Vec<Running> = Vec::new();
    loop {
        let mut arrived = Vec::new();
        if running.is_empty() {
            match jobs.recv() {
                Ok(job) => arrived.push(job),
                Err(_) => return,
            }
        }
        arrived.extend(jobs.try_iter());
        for mut job in arrived {
            if job.max_new == 0 {
                let _ = job.done.send(Ok("length"));
                continue;
            }
            let mut cache = KvCache::new(&model.cfg);
            let prompt = std::mem::take(&mut job.prompt);
            match guarded(|| model.prefill(&mut cache, &prompt)) {
                Ok(logits) => {
                    let mut seq = Running {
                        context: prompt,
                        job,
                        cache,
                        generated: 0,
                    };
                    if let Some(finish) = advance(&mut seq, &logits, &eos, model.cfg.context) {
                        let _ = seq.job.done.send(finish);
                    } else {
                        running.push(seq);
                    }
                }
                Err(e) => {
                    let _ = job.done.send(Err(e));
                }
            }
        }
        if running.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = running
            .iter()
            .map(|s| *s.context.last().expect("a running sequence has a token"))
            .collect();
        let step = {
            let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|s| &mut s.cache).collect();
            guarded(|| model.decode(&mut caches, &tokens))
        };
        match step {
            Ok(logits) => {
                let vocab = model.cfg.vocab;
                let mut still = Vec::with_capacity(running.len());
                for (i, mut seq) in running.drain(..).enumerate() {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    match advance(&mut seq, row, &eos, model.cfg.context) {
                        Some(finish) => {
                            let _ = seq.job.done.send(finish);
                        }
                        None => still.push(seq),
                    }
                }
                running = still;
            }
            Err(e) => {
                tracing::error!(error = %e, "native decode step failed");
                for seq in running.drain(..) {
                    let _ = seq.job.done.send(Err(e.clone()));
                }
            }
        }
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
