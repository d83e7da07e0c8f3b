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

/// `fut` with the current request id (if any) in scope: for tasks a request spawns, so that
/// errors built there carry the id too.
pub fn in_request_scope<F: std::future::Future>(
    fut: F,
) -> impl std::future::Future<Output = F::Output> {
    let id = current_request_id();
    async move {
        match id {
            Some(id) => REQUEST_ID.scope(id, fut).await,
            None => fut.await,
        }
    }
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
    /// 503 service_unavailable: a dependency (the database) is down or too slow; retry later.
    /// An outage, not a bug: it carries `Retry-After`.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 408: the request (its body) did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
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
        self.wire().status
    }

    /// The machine-readable `error.code`.
    pub fn code(&self) -> Option<&'static str> {
        self.wire().code
    }

    /// What this error is on the wire: status, `error.type`, `error.code`, `error.param`. The
    /// one place that decides it, for JSON responses and SSE error events alike.
    fn wire(&self) -> Wire<'_> {
        use StatusCode as S;
        let w = |status, kind, code| Wire {
            status,
            kind,
            code,
            param: None,
        };
        match self {
            ApiError::BadRequest { param, code, .. } => Wire {
                param: param.as_deref(),
                ..w(S::BAD_REQUEST, "invalid_request_error", *code)
            },
            ApiError::Unauthorized(_) => w(
                S::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            ApiError::Forbidden { code, .. } => w(S::FORBIDDEN, "permission_error", Some(code)),
            ApiError::NotFound { param, .. } => Wire {
                param: param.as_deref(),
                ..w(
                    S::NOT_FOUND,
                    "not_found_error",
                    (param.as_deref() == Some("model")).then_some("model_not_found"),
                )
            },
            ApiError::RequestTimeout(_) => w(
                S::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
            ),
            ApiError::PayloadTooLarge { code, .. } => {
                w(S::PAYLOAD_TOO_LARGE, "invalid_request_error", *code)
            }
            ApiError::TooManyRequests { kind, .. } => w(S::TOO_MANY_REQUESTS, kind, Some(kind)),
            ApiError::Overloaded(_) => w(S::SERVICE_UNAVAILABLE, "overloaded", Some("overloaded")),
            ApiError::LedgerUnavailable => w(
                S::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                Some("ledger_unavailable"),
            ),
            ApiError::ServiceUnavailable(_) => w(
                S::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("service_unavailable"),
            ),
            ApiError::Internal(_) => w(
                S::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("internal_error"),
            ),
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
        let wire = self.wire();
        ErrorEnvelope {
            error: ErrorBody {
                message: self.public_message(),
                r#type: wire.kind.to_string(),
                code: wire.code.map(str::to_string),
                param: wire.param.map(str::to_string),
                request_id,
            },
        }
    }

    /// The error as one SSE event (`data: <envelope>`), for failures after a stream started.
    pub fn sse_event(&self) -> axum::response::sse::Event {
        axum::response::sse::Event::default()
            .data(serde_json::to_string(&self.envelope(current_request_id())).unwrap_or_default())
    }
}

struct Wire<'a> {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'a str>,
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
        let code = self.code();
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
        match self {
            ApiError::TooManyRequests { headers, .. } => response.headers_mut().extend(*headers),
            ApiError::ServiceUnavailable(_)
            | ApiError::LedgerUnavailable
            | ApiError::Overloaded(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response.extensions_mut().insert(ErrorMarker { code });
        response
    }
}

/// Set on responses built from an [`ApiError`], so layers above can tell them apart.
#[derive(Clone, Copy, Debug)]
pub struct ErrorMarker {
    pub code: Option<&'static str>,
}

/// The `error.code` of a response built from an [`ApiError`].
pub fn code_of(response: &Response) -> Option<&'static str> {
    response
        .extensions()
        .get::<ErrorMarker>()
        .and_then(|m| m.code)
}

/// A database that is down or slow is an outage (503 `service_unavailable`), not a bug; other
/// database errors are bugs (500).
impl From<crate::ledger::tree::TreeError> for ApiError {
    fn from(e: crate::ledger::tree::TreeError) -> Self {
        use crate::ledger::tree::TreeError;
        match e {
            TreeError::Input(m) => ApiError::bad_request(m),
            TreeError::Db(e) => e.into(),
            TreeError::Missing(m) => ApiError::Internal(anyhow::anyhow!(m)),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_outage(&err) {
            tracing::warn!(error = %err, "database unavailable");
            ApiError::ServiceUnavailable("the database is unavailable; retry shortly".into())
        } else {
            ApiError::Internal(err.into())
        }
    }
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(err: crate::ledger::LedgerError) -> Self {
        use crate::ledger::LedgerError;
        match err {
            LedgerError::DuplicateRequestId(id) => ApiError::BadRequest {
                message: format!("the request id `{id}` was already used; send a new x-request-id"),
                param: None,
                code: Some("duplicate_request_id"),
            },
            LedgerError::Unavailable(why) => {
                tracing::warn!(error = %why, "ledger commit failed; answering 503");
                ApiError::LedgerUnavailable
            }
            LedgerError::Closed => ApiError::LedgerUnavailable,
        }
    }
}

impl From<crate::engine::EngineError> for ApiError {
    fn from(e: crate::engine::EngineError) -> Self {
        match e {
            crate::engine::EngineError::BadInput { message, param } => ApiError::BadRequest {
                message,
                param: param.map(str::to_string),
                code: None,
            },
            crate::engine::EngineError::ContextLength { len, max } => {
                ApiError::context_length_exceeded(len, max)
            }
            crate::engine::EngineError::Overloaded => {
                ApiError::Overloaded("the teacher's queue is full; retry shortly".into())
            }
            crate::engine::EngineError::Unavailable(msg) => {
                ApiError::Internal(anyhow::anyhow!(msg))
            }
            crate::engine::EngineError::Internal(err) => ApiError::Internal(err),
        }
    }
}

impl From<crate::tos::TosError> for ApiError {
    fn from(e: crate::tos::TosError) -> Self {
        match e {
            crate::tos::TosError::VersionExists(_) => ApiError::BadRequest {
                message: e.to_string(),
                param: Some("version".into()),
                code: Some("tos_version_exists"),
            },
            crate::tos::TosError::NotCurrent { .. } => ApiError::BadRequest {
                message: e.to_string(),
                param: Some("version".into()),
                code: Some("tos_version_not_current"),
            },
            crate::tos::TosError::NothingPublished => ApiError::not_found(e.to_string()),
            // The ToS tables are part of the ledger's evidence: when they cannot be read the
            // service fails closed exactly like the ledger.
            crate::tos::TosError::Timeout => ApiError::LedgerUnavailable,
            crate::tos::TosError::Db(err) => {
                tracing::warn!(error = %err, "ToS storage failed");
                ApiError::LedgerUnavailable
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Invalid { param, message } => ApiError::bad_param(&param, message),
            StoreError::NameTaken(_) => ApiError::bad_param("name", e.to_string()),
            StoreError::NoSuchClient(_) | StoreError::NoSuchKey(_) => {
                ApiError::not_found(e.to_string())
            }
            StoreError::Db(err) => err.into(),
        }
    }
}
