//! The teacher engine: model registry, mistralrs backend, logprob math.
//! Knows nothing of HTTP, clients or Postgres.

mod backend;
mod generate;
mod judge;
mod load;
pub mod math;
mod native;
mod simd;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{EngineConfig, LicenceConfig, ModelConfig};

pub use backend::{Lane, SpareTurn};
pub use generate::{FinishReason, GenEvent, GenHandle, GenToken, GenerateParams};
pub use judge::{
    AbsoluteJudgment, AbsolutePlan, PairwiseJudgment, PairwiseOrder, PairwisePlan, Rubric,
    TEMPLATE_VERSION as JUDGE_TEMPLATE_VERSION,
};
pub use math::PositionStats;

/// Facts about a loaded teacher that clients see.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub id: String,
    pub architecture: String,
    pub quantization: String,
    pub weights_sha256: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub context_length: usize,
    pub max_top_k: usize,
    pub licence: LicenceConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{message}")]
    BadInput {
        message: String,
        param: Option<&'static str>,
    },
    #[error("sequence of {len} tokens exceeds the context length {max}")]
    ContextLength { len: usize, max: usize },
    #[error("the engine queue is full")]
    Overloaded,
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl EngineError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        EngineError::BadInput {
            message: message.into(),
            param: Some(param),
        }
    }
}

/// One loaded teacher model.
pub struct Teacher {
    pub info: ModelInfo,
    backend: backend::Backend,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// The same tokenizer with special-token matching off: text through it never yields a
    /// special-token id (user content inside a chat template is data, not markup).
    plain_tokenizer: Arc<tokenizers::Tokenizer>,
    /// Ids of the special (added) tokens, e.g. `<|im_start|>`.
    special_ids: std::collections::HashSet<u32>,
    /// See `judge::digit_start`.
    digit_start: std::sync::OnceLock<Vec<bool>>,
    /// Raw bytes of every token (byte-level BPE undone), for `bytes` in chat logprobs.
    token_bytes: Vec<Vec<u8>>,
    eos: Vec<u32>,
    max_new_tokens: usize,
}

/// One scored sequence.
#[derive(Clone, Debug)]
pub struct ScoreResult {
    /// Row j is token index `score_from + j`.
    pub rows: Vec<PositionStats>,
}

impl Teacher {
    pub fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| EngineError::bad("prompt", format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Teacher::tokenize`] on a blocking thread: a 4 MiB prompt must not stall the async
    /// workers (the ledger writer and every other client run there).
    pub async fn tokenize_async(
        self: &Arc<Self>,
        text: String,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.tokenize(&text, add_special_tokens))
            .await
            .map_err(|e| EngineError::Internal(anyhow::anyhow!(e)))?
    }

    /// 503 `overloaded` now if the engine queue is full (so that a stream can be refused before
    /// its 200 headers rather than with an error event inside them).
    pub fn check_capacity(&self) -> Result<(), EngineError> {
        if self.backend.queue_full() {
            Err(EngineError::Overloaded)
        } else {
            Ok(())
        }
    }

    /// Render `messages` with the model's chat template and tokenize the result. Message
    /// contents are data: a content that spells a special token of the template (e.g.
    /// `<|im_end|>`) is tokenized as plain text, so the only special-token ids in the result
    /// are the template's own.
    pub async fn tokenize_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::bad("messages", "messages must not be empty"));
        }
        let render = |contents: &dyn Fn(usize, &ChatMessage) -> String| {
            messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut map = indexmap::IndexMap::new();
                    map.insert("role".to_string(), either::Either::Left(m.role.clone()));
                    map.insert("content".to_string(), either::Either::Left(contents(i, m)));
                    map
                })
                .collect()
        };
        let ids = self
            .backend
            .tokenize_chat(render(&|_, m| m.content.clone()), add_generation_prompt)
            .await?;
        if !messages.iter().any(|m| self.spells_special(&m.content)) {
            return Ok(ids);
        }
        // Some content spells a special token. Render the template around placeholders, then
        // tokenize the template's text with special tokens and each content as plain text.
        let marker = |i: usize| format!("\u{E000}teachd-content-{i}\u{E001}");
        let skeleton_ids = self
            .backend
            .tokenize_chat(render(&|i, _| marker(i)), add_generation_prompt)
            .await?;
        let skeleton = self
            .tokenizer
            .decode(&skeleton_ids, false)
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("decode: {e}")))?;
        let mut out = Vec::with_capacity(ids.len());
        let mut rest = skeleton.as_str();
        for (i, m) in messages.iter().enumerate() {
            let mark = marker(i);
            let Some(at) = rest.find(&mark) else {
                // The template dropped or transformed this message: it cannot carry content.
                continue;
            };
            out.extend(self.tokenize(&rest[..at], false)?);
            let plain = self
                .plain_tokenizer
                .encode_fast(m.content.as_str(), false)
                .map_err(|e| EngineError::bad("messages", format!("cannot tokenize: {e}")))?;
            out.extend_from_slice(plain.get_ids());
            rest = &rest[at + mark.len()..];
        }
        out.extend(self.tokenize(rest, false)?);
        Ok(out)
    }

    /// Whether `text` contains the content of a special token.
    fn spells_special(&self, text: &str) -> bool {
        text.contains('<')
            && self
                .special_ids
                .iter()
                .filter_map(|&id| self.tokenizer.id_to_token(id))
                .any(|t| !t.is_empty() && text.contains(t.as_str()))
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.check_ids(ids, "token_ids")?;
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("decode: {e}")))
    }

    /// The vocabulary entry of `id` (e.g. `Ġhello`).
    pub fn token_str(&self, id: u32) -> String {
        self.tokenizer.id_to_token(id).unwrap_or_default()
    }

    /// The text `id` decodes to on its own (lossy for partial UTF-8).
    pub fn decode_one(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Requests waiting for this model's engine.
    pub fn queue_depth(&self) -> usize {
        self.backend.queue_depth()
    }

    /// Whether teacher forcing has a lane of its own, so it never waits behind generations
    /// (`scoring_engine` native or separate).
    pub fn separate_scoring(&self) -> bool {
        self.backend.separate_scoring()
    }

    /// What runs teacher forcing: `native`, `separate` or `shared` (`scoring_engine`).
    pub fn scoring_engine(&self) -> &'static str {
        self.backend.scoring_engine()
    }

    /// What runs generations (`native` or `mistralrs`) and how many at once.
    pub fn generation_engine(&self) -> (&'static str, usize) {
        self.backend.generation_engine()
    }

    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    pub fn check_ids(&self, ids: &[u32], param: &'static str) -> Result<(), EngineError> {
        if let Some((i, bad)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.info.vocab_size)
        {
            return Err(EngineError::bad(
                param,
                format!(
                    "token id {bad} at index {i} is out of range for vocabulary size {}",
                    self.info.vocab_size
                ),
            ));
        }
        Ok(())
    }

    pub fn check_len(&self, len: usize) -> Result<(), EngineError> {
        if len > self.info.context_length {
            return Err(EngineError::ContextLength {
                len,
                max: self.info.context_length,
            });
        }
        Ok(())
    }

    /// Teacher forcing: stats for every position `i >= score_from` of `tokens`, each given
    /// `tokens[..i]`, over the full vocabulary at `temperature`.
    pub async fn score(
        &self,
        tokens: &[u32],
        score_from: usize,
        top_k: usize,
        temperature: f64,
    ) -> Result<ScoreResult, EngineError> {
        self.score_on(tokens, score_from, top_k, temperature, Lane::Foreground)
            .await
    }

    /// Teacher-forcing passes started: (on the scoring engine, on spare turns of the
    /// generation engine).
    pub fn raw_passes(&self) -> (u64, u64) {
        self.backend.raw_passes()
    }

    /// The generation engine for one teacher-forcing pass of `len` tokens, if it is idle
    /// (batch lines; see [`SpareTurn`]).
    pub async fn spare(&self, len: usize) -> Option<SpareTurn> {
        self.backend.spare(len).await
    }

    /// [`Teacher::score`] on a [`Lane`] (batch lines run in the background, or on a spare turn
    /// of the generation engine).
    pub async fn score_on(
        &self,
        tokens: &[u32],
        score_from: usize,
        top_k: usize,
        temperature: f64,
        lane: Lane,
    ) -> Result<ScoreResult, EngineError> {
        self.check_ids(tokens, "token_ids")?;
        self.check_len(tokens.len())?;
        if score_from == 0 || score_from >= tokens.len() {
            return Err(EngineError::bad(
                "score_from",
                format!(
                    "score_from must satisfy 1 <= score_from < len (len = {})",
                    tokens.len()
                ),
            ));
        }
        let owned = tokens.to_vec();
        let len = tokens.len();
        // Row i predicts token i + 1; only the positions asked for are scored.
        let scored = self
            .backend
            .map_logit_rows(tokens.to_vec(), lane, move |i, row| {
                let at = i + 1;
                (score_from..len)
                    .contains(&at)
                    .then(|| math::score_position(row, owned[at], top_k, temperature))
            })
            .await?;
        if scored.len() < len - 1 {
            return Err(EngineError::Internal(anyhow::anyhow!(
                "engine returned {} logit rows for {len} tokens",
                scored.len()
            )));
        }
        let rows: Vec<_> = scored.into_iter().flatten().collect();
        Ok(ScoreResult { rows })
    }

    /// The model's full-vocabulary logits for `tokens`, row-major `[len, vocab]`; row i
    /// predicts token i+1. For reference checks; clients get [`Teacher::score`].
    pub async fn raw_logits(&self, tokens: &[u32]) -> Result<(Vec<f32>, usize), EngineError> {
        self.check_ids(tokens, "token_ids")?;
        self.check_len(tokens.len())?;
        let out = self
            .backend
            .with_raw_logits(tokens.to_vec(), Lane::Foreground, |logits| {
                logits.to_vec().map(|v| (v, logits.vocab))
            })
            .await?;
        out.map_err(EngineError::Internal)
    }

    /// Start a generation; tokens arrive on the returned handle as they are sampled.
    pub fn generate(self: &Arc<Self>, params: GenerateParams) -> Result<GenHandle, EngineError> {
        self.check_ids(&params.prompt, "prompt")?;
        self.check_len(params.prompt.len())?;
        if params.prompt.is_empty() {
            return Err(EngineError::bad("prompt", "the prompt must not be empty"));
        }
        Ok(generate::start(self.clone(), params))
    }
}

/// A chat message with text content.
#[derive(Clone, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Every configured teacher, by id, in configuration order. Cheap to clone (the teachers are
/// shared).
#[derive(Clone)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<Teacher>>,
    order: Vec<String>,
}

impl ModelRegistry {
    /// Load every configured model (sequentially: each load takes the machine's memory
    /// bandwidth).
    pub async fn load(models: &[ModelConfig], engine: &EngineConfig) -> anyhow::Result<Self> {
        let mut registry = Self::empty();
        for cfg in models {
            let teacher = load::load_teacher(cfg, engine).await?;
            tracing::info!(
                model = %cfg.id,
                weights_sha256 = %teacher.info.weights_sha256,
                vocab = teacher.info.vocab_size,
                context = teacher.info.context_length,
                "teacher loaded"
            );
            registry.order.push(cfg.id.clone());
            registry.models.insert(cfg.id.clone(), Arc::new(teacher));
        }
        Ok(registry)
    }

    /// A registry without models (admin-only deployments, tests of the non-model surface).
    pub fn empty() -> Self {
        Self {
            models: BTreeMap::new(),
            order: Vec::new(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Teacher>> {
        self.models.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Teacher>> {
        self.order.iter().filter_map(|id| self.models.get(id))
    }
}
