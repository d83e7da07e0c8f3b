//! What a handler reports about the work it did, for the ledger and the token limits.
//! Handlers insert a [`Usage`] into their response's extensions; the gate middleware reads it.

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// The model the request named (after validation), if any.
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub scored_tokens: u64,
    pub generated_tokens: u64,
    pub top_k: Option<u32>,
    pub judgments: u64,
    /// Weights digest of the model that served the request.
    pub weights_sha256: Option<String>,
}

impl Usage {
    /// Tokens this request costs against tpm and the daily quota.
    pub fn billable_tokens(&self) -> u64 {
        // Scored tokens are a subset of the prompt; a logprobs call costs its prompt.
        self.prompt_tokens + self.generated_tokens
    }
}

/// The usage of a streamed response, known only when its stream ends. Streaming handlers put
/// one in their response's extensions and fill it from the producing task; the gate waits for
/// [`UsageCell::finished`] to settle limits and write the ledger row.
#[derive(Clone, Debug)]
pub struct UsageCell {
    usage: std::sync::Arc<std::sync::Mutex<Usage>>,
    done: tokio::sync::watch::Sender<Option<StreamOutcome>>,
}

/// How a stream ended: completed, or failed with the status its error would have had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamOutcome {
    Completed,
    Failed(u16),
}

impl UsageCell {
    pub fn new(initial: Usage) -> Self {
        Self {
            usage: std::sync::Arc::new(std::sync::Mutex::new(initial)),
            done: tokio::sync::watch::Sender::new(None),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Usage)) {
        f(&mut self.usage.lock().expect("usage lock"));
    }

    pub fn finish(&self) {
        self.done.send_replace(Some(StreamOutcome::Completed));
    }

    pub fn fail(&self, status: u16) {
        self.done.send_replace(Some(StreamOutcome::Failed(status)));
    }

    pub fn snapshot(&self) -> Usage {
        self.usage.lock().expect("usage lock").clone()
    }

    /// Resolves when the producer finished or failed; `None` if it vanished without saying.
    pub async fn finished(&self) -> Option<StreamOutcome> {
        let mut rx = self.done.subscribe();
        let outcome = rx.wait_for(|o| o.is_some()).await.ok()?.to_owned();
        outcome
    }
}
