//! Admin endpoints (scope `admin`, enforced by the auth gate).

pub mod audit;
pub mod usage;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::ledger::queries::TimeRange;

/// Query-string extractor whose rejections use the error envelope (400), like `error::Json`.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|rej| ApiError::BadRequest {
                message: rej.body_text(),
                param: None,
                code: Some("invalid_query"),
            })
    }
}

/// `from` (inclusive) and `to` (exclusive), as 400s when malformed.
#[allow(clippy::result_large_err)] // ApiError carries rate-limit headers; fine off the hot path
pub(crate) fn parse_range(from: Option<&str>, to: Option<&str>) -> Result<TimeRange, ApiError> {
    TimeRange::parse(from, to).map_err(|(param, msg)| ApiError::bad_param(param, msg))
}
