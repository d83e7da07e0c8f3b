//! The teacher engine: model registry, mistralrs backend, logprob math, judge prompts.
//! Knows nothing of HTTP, clients or Postgres.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{EngineConfig, LicenceConfig, ModelConfig};

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

pub struct Teacher {
    pub info: ModelInfo,
}

/// Every configured teacher, by id, in configuration order.
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<Teacher>>,
    order: Vec<String>,
}

impl ModelRegistry {
    pub async fn load(_models: &[ModelConfig], _engine: &EngineConfig) -> anyhow::Result<Self> {
        Ok(Self {
            models: BTreeMap::new(),
            order: Vec::new(),
        })
    }

    /// No models: for tests and benchmarks of the HTTP layers.
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
