//! Which teacher serves a request, and what every teacher response carries: the model lookup
//! (404), the ToS and licence checks (403, see [`super::tos`]) and the provenance headers.

use std::sync::Arc;

use crate::engine::Teacher;
use crate::error::ApiError;
use crate::AppState;

pub fn teacher(state: &AppState, model: &str) -> Result<Arc<Teacher>, ApiError> {
    state
        .models
        .get(model)
        .cloned()
        .ok_or_else(|| ApiError::model_not_found(model))
}

/// The teacher `model`, once `ctx` passed the ToS and licence checks for it.
pub async fn teacher_for(
    state: &AppState,
    ctx: &crate::auth::ClientCtx,
    model: &str,
) -> Result<Arc<Teacher>, ApiError> {
    let teacher = teacher(state, model)?;
    super::tos::check_tos_and_licence(&state.tos, ctx, &teacher.info).await?;
    Ok(teacher)
}

/// A teacher response as it leaves the handler: with the provenance headers of `teacher`.
pub fn provenance(
    mut response: axum::response::Response,
    teacher: &Teacher,
) -> axum::response::Response {
    response
        .headers_mut()
        .extend(super::tos::provenance_headers(&teacher.info));
    response
}
