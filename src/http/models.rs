//! `GET /v1/models`: the OpenAI list, each entry with a `teacher` object.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::config::LicenceConfig;
use crate::engine::Teacher;
use crate::http::extract::Json;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_models))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelEntry {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
    pub teacher: TeacherDescription,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TeacherDescription {
    pub architecture: String,
    pub quantization: String,
    pub weights_sha256: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub context_length: usize,
    pub max_top_k: usize,
    pub licence: LicenceConfig,
}

impl ModelEntry {
    pub fn of(t: &Teacher) -> Self {
        let i = &t.info;
        Self {
            id: i.id.clone(),
            object: "model".into(),
            created: 0,
            owned_by: "teachd".into(),
            teacher: TeacherDescription {
                architecture: i.architecture.clone(),
                quantization: i.quantization.clone(),
                weights_sha256: i.weights_sha256.clone(),
                tokenizer_sha256: i.tokenizer_sha256.clone(),
                vocab_size: i.vocab_size,
                context_length: i.context_length,
                max_top_k: i.max_top_k,
                licence: i.licence.clone(),
            },
        }
    }
}

/// The teachers this server hosts.
#[utoipa::path(get, path = "/v1/models", tag = "teacher",
    responses((status = 200, body = ModelList)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state.models.iter().map(|t| ModelEntry::of(t)).collect(),
    })
}
