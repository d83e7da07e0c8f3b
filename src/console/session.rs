//! Console sessions: sign-in with an admin key, a server-side session behind an HttpOnly,
//! SameSite=Strict cookie, a CSRF token per session, sign-out that deletes the session.
//!
//! The cookie holds 32 random bytes; the table holds only their SHA-256, so a copy of the
//! database cannot be replayed as a cookie. Every request looks its session up together with
//! the key and client behind it: a revoked or expired key, a suspended client or a key that lost
//! the admin scope ends the session at once, as it would end the key's API access.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum_extra::extract::cookie::CookieJar;
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::ConsoleError;
use crate::auth::{ClientCtx, Scope};
use crate::config::SecureCookie;
use crate::error::ApiError;
use crate::AppState;

pub const COOKIE: &str = "teachd_console";

/// A signed-in admin, as the console's gate found it.
#[derive(Clone, Debug)]
pub struct Session {
    pub ctx: ClientCtx,
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
    token_hash: [u8; 32],
}

impl Session {
    /// 403 unless `sent` is this session's CSRF token (every state-changing form carries it).
    pub fn check_csrf(&self, sent: &str) -> Result<(), ConsoleError> {
        if bool::from(sent.as_bytes().ct_eq(self.csrf.as_bytes())) {
            Ok(())
        } else {
            Err(ConsoleError::Api(ApiError::forbidden(
                "csrf_failed",
                "the form's CSRF token does not match this session; reload the page and retry",
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or_else(|| {
            ConsoleError::Api(ApiError::Internal(anyhow::anyhow!(
                "console route outside the console gate"
            )))
        })
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    csrf_token: String,
    expires_at: DateTime<Utc>,
    key_id: Uuid,
    client_id: Uuid,
    client_name: String,
    scopes: Vec<String>,
}

/// The session of the request's cookie, if it is live (not expired, not signed out, its key
/// still a valid admin key of an active client).
pub async fn lookup(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let jar = CookieJar::from_headers(headers);
    let Some(token) = jar.get(COOKIE).map(|c| c.value().to_string()) else {
        return Ok(None);
    };
    let token_hash = hash(&token);
    let row: Option<SessionRow> = sqlx::query_as(
        "SELECT s.csrf_token, s.expires_at, k.id AS key_id, c.id AS client_id,
                c.name AS client_name, k.scopes
         FROM console_sessions s
         JOIN api_keys k ON k.id = s.key_id
         JOIN clients c ON c.id = k.client_id
         WHERE s.token_hash = $1 AND s.expires_at > now()
           AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
           AND NOT c.suspended AND 'admin' = ANY(k.scopes)",
    )
    .bind(&token_hash[..])
    .fetch_optional(&state.db)
    .await?;
    Ok(row.map(|r| Session {
        ctx: ClientCtx {
            client_id: r.client_id,
            key_id: r.key_id,
            client_name: r.client_name,
            scopes: r.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
            limits: state.auth.defaults().clone(),
        },
        csrf: r.csrf_token,
        expires_at: r.expires_at,
        token_hash,
    }))
}

/// The admin behind a key typed into the sign-in form: exactly the API's authentication
/// (401 unknown/revoked/expired, 403 suspended or not an admin key).
pub async fn authenticate_key(state: &AppState, key: &str) -> Result<ClientCtx, ApiError> {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
        .map_err(|_| ApiError::Unauthorized("invalid API key".into()))?;
    headers.insert(header::AUTHORIZATION, value);
    crate::http::gate::authenticate(state, &headers, &[Scope::Admin]).await
}

/// Starts a session for `ctx`; returns the `Set-Cookie` value.
pub async fn start(
    state: &AppState,
    ctx: &ClientCtx,
    headers: &HeaderMap,
) -> Result<HeaderValue, ApiError> {
    let ttl = state.config.console.session_ttl_secs.max(1);
    let token = random_hex();
    // Sign-ins are rare: a good moment to forget sessions that ended on their own.
    sqlx::query("DELETE FROM console_sessions WHERE expires_at <= now()")
        .execute(&state.db)
        .await?;
    sqlx::query(
        "INSERT INTO console_sessions (token_hash, key_id, csrf_token, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
    )
    .bind(&hash(&token)[..])
    .bind(ctx.key_id)
    .bind(random_hex())
    .bind(ttl as f64)
    .execute(&state.db)
    .await?;
    Ok(cookie(state, headers, token, ttl as i64))
}

/// Ends the session server-side; returns the `Set-Cookie` value that clears the browser's copy.
pub async fn end(
    state: &AppState,
    session: &Session,
    headers: &HeaderMap,
) -> Result<HeaderValue, ApiError> {
    sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
        .bind(&session.token_hash[..])
        .execute(&state.db)
        .await?;
    Ok(cookie(state, headers, String::new(), 0))
}

/// `HttpOnly` (no script can read it), `SameSite=Strict` (no other site's page can send it),
/// scoped to `/console`, `Secure` per `console.secure_cookie`.
fn cookie(state: &AppState, headers: &HeaderMap, value: String, max_age: i64) -> HeaderValue {
    let behind_tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let secure = match state.config.console.secure_cookie {
        SecureCookie::Always => true,
        SecureCookie::Never => false,
        SecureCookie::Auto => behind_tls,
    };
    let secure = if secure { "; Secure" } else { "" };
    // `value` is hex (or empty): always a valid header value.
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("hex cookie value")
}
