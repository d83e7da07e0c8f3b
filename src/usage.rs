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
