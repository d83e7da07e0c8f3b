//! Generation with logprobs we compute ourselves.
//!
//! mistralrs 0.8.1 reports generation logprobs wrongly (log10; raw logits under greedy), so
//! teachd picks every token itself: a per-request logits processor receives the model's
//! logits at each step, computes `log_softmax(logits / T)` over the full vocabulary, samples
//! (seeded, with top-p) or takes the argmax, records the token's logprob and top-k, and forces
//! the engine's argmax onto that token. The numbers returned are therefore exactly those of
//! the distribution sampled from (before top-p truncation; at T = 1 under greedy decoding).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::math;
use super::{EngineError, Teacher};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// How many alternatives to report per generated token (0 = none).
    pub top_logprobs: usize,
}

#[derive(Clone, Debug)]
pub struct GenToken {
    pub id: u32,
    pub logprob: f64,
    /// The most likely tokens at this step, descending.
    pub top: Vec<(u32, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (or a stop string, decided by the caller).
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

#[derive(Debug)]
pub enum GenEvent {
    Token(GenToken),
    Done(FinishReason),
    Error(EngineError),
}

/// A running generation. Dropping it (or calling [`GenHandle::stop`]) makes the next step
/// emit end-of-sequence, so the engine finishes the sequence cleanly.
pub struct GenHandle {
    pub events: mpsc::UnboundedReceiver<GenEvent>,
    stop: Arc<AtomicBool>,
    /// Wakes a generation that still waits for the engine, so it leaves the queue.
    abandoned: Arc<tokio::sync::Notify>,
}

impl GenHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // A stored permit: the waiter sees it even if it starts waiting later.
        self.abandoned.notify_one();
    }
}

impl Drop for GenHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(super) fn start(teacher: Arc<Teacher>, params: GenerateParams) -> GenHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let abandoned = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(AtomicBool::new(false));
    let eos = teacher.eos.first().copied();
    let last_token = Arc::new(Mutex::new(None::<u32>));

    let step: super::backend::StepFn = {
        let tx = tx.clone();
        let stop = stop.clone();
        let started = started.clone();
        let last_token = last_token.clone();
        let rng = Mutex::new(rand::rngs::StdRng::seed_from_u64(params.seed));
        let (temperature, top_p, top_n) = (params.temperature, params.top_p, params.top_logprobs);
        Arc::new(move |logits: &[f32], _context: &[u32]| -> u32 {
            if stop.load(Ordering::SeqCst) {
                if let Some(eos) = eos {
                    return eos;
                }
            }
            let pick = math::pick(logits, temperature, top_p, top_n, || {
                rng.lock().expect("rng lock").gen()
            });
            started.store(true, Ordering::SeqCst);
            *last_token.lock().expect("last token lock") = Some(pick.token);
            let _ = tx.send(GenEvent::Token(GenToken {
                id: pick.token,
                logprob: pick.logprob,
                top: pick.top,
            }));
            pick.token
        })
    };

    let waiting = abandoned.clone();
    tokio::spawn(async move {
        let result = teacher
            .backend
            .generate(
                params.prompt.clone(),
                params.max_new_tokens,
                step,
                started,
                waiting,
            )
            .await;
        let event = match result {
            Ok(_) => {
                let last = *last_token.lock().expect("last token lock");
                match last {
                    Some(t) if teacher.is_eos(t) => GenEvent::Done(FinishReason::Stop),
                    _ => GenEvent::Done(FinishReason::Length),
                }
            }
            Err(e) => GenEvent::Error(e),
        };
        let _ = tx.send(event);
    });

    GenHandle {
        events: rx,
        stop,
        abandoned,
    }
}
