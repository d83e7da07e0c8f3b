//! One error type for the whole HTTP surface, rendered as the OpenAI error envelope.
//!
//! 4xx variants are precise and safe to show; 5xx variants never leak internals: the cause chain
//! is logged with the request id, and the client sees only an opaque message plus that id.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

tokio::task_local! {
    /// The request id of the request being served; set by the request-id middleware so that
    /// errors built anywhere below it can carry it in their envelope.
    pub static REQUEST_ID: String;
}

/// The current request id, if called inside a request.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 invalid_request_error; `param` names the offending field.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401 authentication_error.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 permission_error, with a machine-readable code (`tos_not_accepted`, `licence_forbids`,
    /// `insufficient_scope`, `client_suspended`).
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    /// 404 not_found_error.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
    },
    /// 413 invalid_request_error: body over the limit or sequence over the context.
    #[error("{message}")]
    PayloadTooLarge {
        message: String,
        code: Option<&'static str>,
    },
    /// 429 rate_limit_exceeded (retryable) or insufficient_quota (not retryable).
    #[error("{message}")]
    TooManyRequests {
        message: String,
        /// `rate_limit_exceeded` or `insufficient_quota`.
        kind: &'static str,
        /// Extra headers (RateLimit-*, x-ratelimit-*, Retry-After). Boxed: a bare `HeaderMap`
        /// makes every `Result<_, ApiError>` large (clippy::result_large_err).
        headers: Box<HeaderMap>,
    },
    /// 503 overloaded: the engine queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// 503 ledger_unavailable: the usage ledger could not commit (fail closed).
    #[error("the usage ledger is unavailable; no teacher output was served")]
    LedgerUnavailable,
    /// 500: always a bug or an unexpected failure; details are logged, never sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::NotFound {
            message: message.into(),
            param: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError::NotFound {
            message: format!("The model `{model}` does not exist"),
            param: Some("model".into()),
        }
    }

    pub fn context_length_exceeded(len: usize, context: usize) -> Self {
        ApiError::PayloadTooLarge {
            message: format!(
                "This model's maximum context length is {context} tokens; the request has {len}"
            ),
            code: Some("context_length_exceeded"),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Forbidden {
            message: message.into(),
            code,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded(_) | ApiError::LedgerUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::NotFound { .. } => {
                if matches!(self, ApiError::NotFound { .. }) {
                    "not_found_error"
                } else {
                    "invalid_request_error"
                }
            }
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden { .. } => "permission_error",
            ApiError::TooManyRequests { kind, .. } => kind,
            ApiError::Overloaded(_) => "overloaded",
            ApiError::LedgerUnavailable => "ledger_unavailable",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::PayloadTooLarge { code, .. } => *code,
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::Forbidden { code, .. } => Some(code),
            ApiError::NotFound { param, .. } if param.as_deref() == Some("model") => {
                Some("model_not_found")
            }
            ApiError::NotFound { .. } => None,
            ApiError::TooManyRequests { kind, .. } => Some(kind),
            ApiError::Overloaded(_) => Some("overloaded"),
            ApiError::LedgerUnavailable => Some("ledger_unavailable"),
            ApiError::Internal(_) => Some("internal_error"),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } | ApiError::NotFound { param, .. } => {
                param.as_deref()
            }
            _ => None,
        }
    }

    /// The message a client may see. Internal errors are opaque.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "The server had an error while processing your request; quote the request_id when reporting it"
                    .into()
            }
            other => other.to_string(),
        }
    }

    /// The envelope as JSON, for errors sent inside a stream (SSE) rather than as a status.
    pub fn envelope(&self, request_id: Option<String>) -> ErrorEnvelope {
        ErrorEnvelope {
            error: ErrorBody {
                message: self.public_message(),
                r#type: self.kind().to_string(),
                code: self.code().map(str::to_string),
                param: self.param().map(str::to_string),
                request_id,
            },
        }
    }
}

/// `{"error": {...}}`, the OpenAI error envelope.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub message: String,
    /// invalid_request_error, authentication_error, permission_error, not_found_error,
    /// rate_limit_exceeded, insufficient_quota, overloaded, ledger_unavailable, server_error.
    pub r#type: String,
    pub code: Option<String>,
    pub param: Option<String>,
    pub request_id: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = current_request_id();
        if let ApiError::Internal(err) = &self {
            tracing::error!(request_id = ?request_id, error = ?err, "internal error");
        }
        let status = self.status();
        let body = serde_json::to_vec(&self.envelope(request_id)).unwrap_or_default();
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let ApiError::TooManyRequests { headers, .. } = self {
            response.headers_mut().extend(*headers);
        }
        response.extensions_mut().insert(ErrorMarker);
        response
    }
}

/// Set on responses built from an [`ApiError`], so layers above can tell them apart.
#[derive(Clone, Copy, Debug)]
pub struct ErrorMarker;

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::Internal(err.into())
    }
}

/// JSON body extractor whose rejections are rendered in the error envelope (400/413/415),
/// instead of axum's plain-text rejections.
pub struct Json<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        // `Object`: a body that is a JSON array is a 400 even where serde would read a struct
        // from the array of its fields.
        match axum::Json::<crate::http::de::Object<T>>::from_request(req, state).await {
            Ok(axum::Json(crate::http::de::Object(value))) => Ok(Json(value)),
            Err(JsonRejection::BytesRejection(rej))
                if rej.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::PayloadTooLarge {
                    message: "request body is over the size limit".into(),
                    code: Some("body_too_large"),
                })
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::BadRequest {
                message: "expected `Content-Type: application/json`".into(),
                param: None,
                code: Some("invalid_content_type"),
            }),
            Err(rej) => Err(ApiError::BadRequest {
                message: rej.body_text(),
                param: None,
                code: Some("invalid_json"),
            }),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
