//! Authentication: `Authorization: Bearer tk_…` -> [`ClientCtx`].
//!
//! The key's format and checksum ([`ApiKey`], in `store::apikey`) refuse mistyped or truncated
//! keys without a database query; a well-formed key is looked up by its SHA-256
//! ([`store::key_by_hash`]) and the stored hash is compared again in constant time.
//!
//! There is deliberately no cache: every request reads its key and client in one indexed query,
//! so a revocation, an expiry or a suspension takes effect on the very next request, on every
//! instance. `BENCH_AUTH.md` measures what that costs.

use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::ApiError;
use crate::limits::Limits;
use crate::store::{self, ANONYMOUS_CLIENT_ID, ANONYMOUS_CLIENT_NAME};

// The key format, scopes and the admin bootstrap belong to the store; callers that
// authenticate meet them here, so they keep their `auth::` paths.
pub use crate::store::{bootstrap_admin, ApiKey, Scope, BOOTSTRAP_ADMIN_ID};

/// The authenticated caller of a request, inserted into request extensions by the gate.
#[derive(Clone, Debug)]
pub struct ClientCtx {
    pub client_id: Uuid,
    /// The key used; `Uuid::nil()` for the anonymous client of `server.disable_auth`.
    pub key_id: Uuid,
    pub client_name: String,
    pub scopes: Vec<Scope>,
    /// Effective limits: the client's overrides over the configured defaults.
    pub limits: Limits,
}

impl ClientCtx {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// 403 unless the key carries one of `scopes`.
    pub fn require_any(&self, scopes: &[Scope]) -> Result<(), ApiError> {
        if scopes.iter().any(|s| self.has_scope(*s)) {
            return Ok(());
        }
        let names: Vec<String> = scopes.iter().map(|s| format!("`{}`", s.as_str())).collect();
        Err(ApiError::forbidden(
            "insufficient_scope",
            format!("this API key lacks the {} scope", names.join(" or ")),
        ))
    }

    /// The fixed client every request runs as when `server.disable_auth` is set.
    pub fn anonymous(limits: Limits) -> Self {
        ClientCtx {
            client_id: ANONYMOUS_CLIENT_ID,
            key_id: Uuid::nil(),
            client_name: ANONYMOUS_CLIENT_NAME.into(),
            scopes: vec![Scope::Teacher],
            limits,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientCtx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ClientCtx>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("missing API key".into()))
    }
}

// ---------------------------------------------------------------------------------------------
// Bearer keys

/// The Bearer token of a request, or 401.
fn bearer_key(headers: &HeaderMap) -> Result<ApiKey, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("missing API key: send `Authorization: Bearer tk_…`".into())
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        ApiError::Unauthorized("malformed Authorization header: expected `Bearer <key>`".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthorized(
            "malformed Authorization header: expected `Bearer <key>`".into(),
        ));
    }
    ApiKey::parse(token.trim())
        .ok_or_else(|| ApiError::Unauthorized("malformed API key (bad format or checksum)".into()))
}

// ---------------------------------------------------------------------------------------------
// Lookup

/// Resolves Bearer keys to clients.
pub struct Authenticator {
    db: PgPool,
    defaults: Limits,
    /// `server.disable_auth`: every teacher request runs as [`ClientCtx::anonymous`].
    disabled: bool,
    /// When this process last wrote `last_used_at` for a key, to write it at most once a minute.
    touched: DashMap<Uuid, Instant>,
}

/// `last_used_at` is accurate to this much; writing it on every request would double the
/// database work of authentication.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

impl Authenticator {
    pub fn new(db: PgPool, defaults: Limits, disabled: bool) -> Self {
        Authenticator {
            db,
            defaults,
            disabled,
            touched: DashMap::new(),
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    pub fn defaults(&self) -> &Limits {
        &self.defaults
    }

    /// The caller of a request, checked for `scope`: 401 for a missing, malformed, unknown,
    /// revoked or expired key; 403 for a suspended client or a missing scope.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        scopes: &[Scope],
    ) -> Result<ClientCtx, ApiError> {
        if self.disabled && scopes.contains(&Scope::Teacher) {
            return Ok(ClientCtx::anonymous(self.defaults.clone()));
        }
        let key = bearer_key(headers)?;
        let hash = key.hash();
        // A database outage is a 503 (see `From<StoreError> for ApiError`).
        let row = store::key_by_hash(&self.db, &hash).await?;
        let unknown = || ApiError::Unauthorized("invalid API key".into());
        let row = row.ok_or_else(unknown)?;
        if !bool::from(row.key_hash.as_slice().ct_eq(&hash[..])) {
            return Err(unknown());
        }
        let now = Utc::now();
        if row.revoked_at.is_some() {
            return Err(ApiError::Unauthorized(
                "this API key has been revoked".into(),
            ));
        }
        if row.expires_at.is_some_and(|at| at <= now) {
            return Err(ApiError::Unauthorized("this API key has expired".into()));
        }
        if row.suspended {
            return Err(ApiError::forbidden(
                "client_suspended",
                "this client is suspended; contact the operator",
            ));
        }
        self.touch(row.key_id, row.last_used_at, now);
        let ctx = ClientCtx {
            client_id: row.client_id,
            key_id: row.key_id,
            client_name: row.client_name,
            scopes: row.scopes,
            limits: row.overrides.over(&self.defaults),
        };
        ctx.require_any(scopes)?;
        Ok(ctx)
    }

    /// Best-effort `last_used_at`, off the request path and at most once a minute per key.
    fn touch(&self, key_id: Uuid, last_used: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        let fresh_in_db =
            last_used.is_some_and(|t| (now - t).to_std().is_ok_and(|age| age < TOUCH_EVERY));
        if fresh_in_db {
            return;
        }
        let at = Instant::now();
        let mut due = false;
        self.touched
            .entry(key_id)
            .and_modify(|last| {
                if at.duration_since(*last) >= TOUCH_EVERY {
                    *last = at;
                    due = true;
                }
            })
            .or_insert_with(|| {
                due = true;
                at
            });
        if !due {
            return;
        }
        if self.touched.len() > 100_000 {
            self.touched
                .retain(|_, last| at.duration_since(*last) < TOUCH_EVERY);
        }
        let db = self.db.clone();
        tokio::spawn(async move {
            if let Err(err) = store::touch_key(&db, key_id).await {
                tracing::warn!(%key_id, error = %err, "could not record last_used_at");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let key = ApiKey::generate();
        let mut h = HeaderMap::new();
        assert!(bearer_key(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())).unwrap(),
        );
        assert_eq!(bearer_key(&h).unwrap(), key);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("bearer {}", key.expose_secret())).unwrap(),
        );
        assert_eq!(bearer_key(&h).unwrap(), key);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {}", key.expose_secret())).unwrap(),
        );
        assert!(bearer_key(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tk_short"),
        );
        assert!(bearer_key(&h).is_err());
    }

    #[test]
    fn error_messages_do_not_echo_the_key() {
        let key = ApiKey::generate();
        let mut garbled = key.expose_secret().to_string();
        garbled.replace_range(5..6, if &garbled[5..6] == "a" { "b" } else { "a" });
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {garbled}")).unwrap(),
        );
        let err = bearer_key(&h).unwrap_err();
        assert!(!err.to_string().contains(&garbled[3..]));
    }
}
