//! `GET /v1/models`: the teachers served, in OpenAI's list shape plus a `teacher` object.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::LicenceConfig;
use crate::error::{ErrorEnvelope, Json};
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_models))
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
    pub teacher: TeacherInfo,
}

#[derive(Serialize, ToSchema)]
pub struct TeacherInfo {
    pub architecture: String,
    pub quantization: String,
    pub weights_sha256: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub context_length: usize,
    pub max_top_k: usize,
    pub licence: LicenceConfig,
}

/// The teacher models served.
#[utoipa::path(
    get, path = "/v1/models", tag = "teacher",
    responses(
        (status = 200, body = ModelList),
        (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope),
        (status = 429, body = ErrorEnvelope),
    ),
    security(("bearer" = ["teacher"]))
)]
#[tracing::instrument(skip_all)]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .models
        .iter()
        .map(|t| {
            let i = &t.info;
            ModelEntry {
                id: i.id.clone(),
                object: "model",
                created: 0,
                owned_by: "teachd",
                teacher: TeacherInfo {
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
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}
