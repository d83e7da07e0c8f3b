//! Authentication: `Authorization: Bearer tk_…` -> [`ClientCtx`].
//!
//! Keys look like `tk_<30 base62 chars of randomness><6 base62 chars of checksum>`. The checksum
//! (the first 32 bits of SHA-256 over the rest of the key) lets us refuse mistyped or truncated
//! keys without a database query. Only SHA-256 of the whole key is stored; lookups go by that
//! hash, and the stored hash is compared again in constant time.
//!
//! There is deliberately no cache: every request reads its key and client in one indexed query,
//! so a revocation, an expiry or a suspension takes effect on the very next request, on every
//! instance. `BENCH_AUTH.md` measures what that costs.

use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::ApiError;
use crate::limits::Limits;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Teacher,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Teacher => "teacher",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "teacher" => Some(Scope::Teacher),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

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

    /// 403 unless the key carries `scope`.
    pub fn require_scope(&self, scope: Scope) -> Result<(), ApiError> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "insufficient_scope",
                format!("this API key lacks the `{}` scope", scope.as_str()),
            ))
        }
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

/// Id of the client that requests run as when `server.disable_auth` is set.
pub const ANONYMOUS_CLIENT_ID: Uuid = Uuid::nil();
pub const ANONYMOUS_CLIENT_NAME: &str = "anonymous";

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
// Key format

const KEY_PREFIX: &str = "tk_";
const SECRET_LEN: usize = 30;
const CHECK_LEN: usize = 6;
/// `tk_` + secret + checksum.
pub const KEY_LEN: usize = KEY_PREFIX.len() + SECRET_LEN + CHECK_LEN;
/// Characters of the key kept as its display prefix (`tk_` + 8).
const DISPLAY_LEN: usize = KEY_PREFIX.len() + 8;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A well-formed API key. Its Debug shows only the display prefix; there is no Display, so a
/// key cannot end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}…)", self.prefix())
    }
}

impl ApiKey {
    /// A new random key (~178 bits from the OS-seeded CSPRNG).
    pub fn generate() -> ApiKey {
        let mut rng = rand::thread_rng();
        let mut key = String::with_capacity(KEY_LEN);
        key.push_str(KEY_PREFIX);
        for _ in 0..SECRET_LEN {
            key.push(BASE62[rng.gen_range(0..BASE62.len())] as char);
        }
        let check = checksum(&key);
        key.push_str(&check);
        ApiKey(key)
    }

    /// Checks the shape and the checksum; no database involved.
    pub fn parse(raw: &str) -> Option<ApiKey> {
        if raw.len() != KEY_LEN || !raw.starts_with(KEY_PREFIX) {
            return None;
        }
        let body = &raw.as_bytes()[KEY_PREFIX.len()..];
        if !body.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let (without_check, check) = raw.split_at(KEY_LEN - CHECK_LEN);
        let expected = checksum(without_check);
        if bool::from(expected.as_bytes().ct_eq(check.as_bytes())) {
            Some(ApiKey(raw.to_string()))
        } else {
            None
        }
    }

    /// What is stored and looked up: SHA-256 of the whole key.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// `tk_` and the first 8 characters: safe to show and store.
    pub fn prefix(&self) -> &str {
        &self.0[..DISPLAY_LEN]
    }

    /// The plaintext, for the single response that shows a new key.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

/// First 32 bits of SHA-256, as 6 base62 digits (62^6 > 2^32).
fn checksum(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ascii")
}

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

#[derive(sqlx::FromRow)]
struct KeyRow {
    key_id: Uuid,
    key_hash: Vec<u8>,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    client_id: Uuid,
    client_name: String,
    suspended: bool,
    rpm: Option<i32>,
    tpm: Option<i32>,
    max_concurrent: Option<i32>,
    daily_tokens: Option<i64>,
}

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
        scope: Scope,
    ) -> Result<ClientCtx, ApiError> {
        if self.disabled && scope == Scope::Teacher {
            return Ok(ClientCtx::anonymous(self.defaults.clone()));
        }
        let key = bearer_key(headers)?;
        let hash = key.hash();
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT k.id AS key_id, k.key_hash, k.scopes, k.expires_at, k.revoked_at, k.last_used_at,
                    c.id AS client_id, c.name AS client_name, c.suspended,
                    c.rpm, c.tpm, c.max_concurrent, c.daily_tokens
             FROM api_keys k JOIN clients c ON c.id = k.client_id
             WHERE k.key_hash = $1",
        )
        .bind(&hash[..])
        .fetch_optional(&self.db)
        .await?; // a database outage is a 503 (see `From<sqlx::Error> for ApiError`)
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
            scopes: row.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
            limits: Limits {
                rpm: row.rpm.map_or(self.defaults.rpm, |v| v as u32),
                tpm: row.tpm.map_or(self.defaults.tpm, |v| v as u32),
                max_concurrent: row
                    .max_concurrent
                    .map_or(self.defaults.max_concurrent, |v| v as u32),
                daily_tokens: row.daily_tokens.unwrap_or(self.defaults.daily_tokens),
            },
        };
        ctx.require_scope(scope)?;
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
            if let Err(err) = sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
                .bind(key_id)
                .execute(&db)
                .await
            {
                tracing::warn!(%key_id, error = %err, "could not record last_used_at");
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Issuing keys

/// A key as stored (no secret).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: Uuid,
    pub client_id: Uuid,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Creates a key for `client_id` and returns it with its plaintext, which exists nowhere else.
pub async fn issue_key(
    db: &PgPool,
    client_id: Uuid,
    scopes: &[Scope],
    expires_at: Option<DateTime<Utc>>,
) -> anyhow::Result<(KeyRecord, ApiKey)> {
    let key = ApiKey::generate();
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let record: KeyRecord = sqlx::query_as(
        "INSERT INTO api_keys (id, client_id, key_hash, prefix, scopes, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, client_id, prefix, scopes, created_at, expires_at, revoked_at, last_used_at",
    )
    .bind(Uuid::now_v7())
    .bind(client_id)
    .bind(&key.hash()[..])
    .bind(key.prefix())
    .bind(&scopes)
    .bind(expires_at)
    .fetch_one(db)
    .await
    .context("inserting an API key")?;
    Ok((record, key))
}

/// The client `teachd admin bootstrap` issues admin keys to: a reserved id, so that no tenant
/// (one named `admin`, say) can be mistaken for it.
pub const BOOTSTRAP_ADMIN_ID: Uuid = Uuid::from_u128(0x7eac_6d00_0000_4000_8000_0000_0000_ad31);

/// `teachd admin bootstrap`: makes sure the reserved admin client exists and is not suspended,
/// and issues it a new admin key. Always yields a working key: a tenant that took the name,
/// or a suspension of the admin client, cannot break it (the operator running this has the
/// database credentials anyway). Each call issues another key; earlier ones stay valid.
pub async fn bootstrap_admin(db: &PgPool) -> anyhow::Result<(KeyRecord, ApiKey)> {
    let exists: Option<bool> = sqlx::query_scalar("SELECT suspended FROM clients WHERE id = $1")
        .bind(BOOTSTRAP_ADMIN_ID)
        .fetch_optional(db)
        .await
        .context("looking up the admin client")?;
    match exists {
        Some(true) => {
            tracing::warn!("the admin client was suspended; bootstrap resumes it");
            sqlx::query("UPDATE clients SET suspended = false, updated_at = now() WHERE id = $1")
                .bind(BOOTSTRAP_ADMIN_ID)
                .execute(db)
                .await
                .context("resuming the admin client")?;
        }
        Some(false) => {}
        None => {
            // The name is for people; a tenant may already use it.
            let mut name = "teachd-admin".to_string();
            for attempt in 0.. {
                let inserted = sqlx::query(
                    "INSERT INTO clients (id, name, contact) VALUES ($1, $2, 'created by teachd admin bootstrap')
                     ON CONFLICT DO NOTHING",
                )
                .bind(BOOTSTRAP_ADMIN_ID)
                .bind(&name)
                .execute(db)
                .await
                .context("creating the admin client")?;
                if inserted.rows_affected() == 1 {
                    break;
                }
                let ours: Option<Uuid> = sqlx::query_scalar("SELECT id FROM clients WHERE id = $1")
                    .bind(BOOTSTRAP_ADMIN_ID)
                    .fetch_optional(db)
                    .await?;
                if ours.is_some() || attempt > 5 {
                    break; // created concurrently by another bootstrap, or give up renaming
                }
                name = format!("teachd-admin-{}", &Uuid::new_v4().simple().to_string()[..8]);
            }
        }
    }
    issue_key(db, BOOTSTRAP_ADMIN_ID, &[Scope::Admin], None).await
}

/// The row the anonymous client of `server.disable_auth` needs for its daily quota.
pub async fn ensure_anonymous_client(db: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO clients (id, name, contact) VALUES ($1, $2, 'server.disable_auth')
         ON CONFLICT DO NOTHING",
    )
    .bind(ANONYMOUS_CLIENT_ID)
    .bind(ANONYMOUS_CLIENT_NAME)
    .execute(db)
    .await
    .context("creating the anonymous client")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_parse_and_look_right() {
        for _ in 0..100 {
            let key = ApiKey::generate();
            let raw = key.expose_secret();
            assert_eq!(raw.len(), KEY_LEN);
            assert!(raw.starts_with("tk_"));
            assert_eq!(ApiKey::parse(raw).as_ref(), Some(&key));
            assert!(raw.starts_with(key.prefix()));
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = ApiKey::generate();
        let shown = format!("{key:?}");
        assert!(
            !shown.contains(&key.expose_secret()[DISPLAY_LEN..]),
            "{shown}"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let key = ApiKey::generate();
        let raw = key.expose_secret();
        assert!(ApiKey::parse("").is_none());
        assert!(ApiKey::parse(&raw[..KEY_LEN - 1]).is_none());
        assert!(ApiKey::parse(&format!("{raw}x")).is_none());
        assert!(ApiKey::parse(&raw.replacen("tk_", "sk_", 1)).is_none());
        let mut bad = raw.to_string();
        bad.replace_range(10..11, "!");
        assert!(ApiKey::parse(&bad).is_none());
    }

    proptest! {
        /// Any single mistyped character is caught by the checksum (or the alphabet check).
        #[test]
        fn one_typo_is_caught(pos in 3usize..KEY_LEN, c in proptest::char::range('0', 'z')) {
            let key = ApiKey::generate();
            let raw = key.expose_secret();
            prop_assume!(raw.as_bytes()[pos] as char != c);
            let mut typo = raw.to_string();
            typo.replace_range(pos..pos + 1, &c.to_string());
            // A 32-bit checksum lets ~1 in 4 billion through; proptest draws a few hundred.
            prop_assert!(ApiKey::parse(&typo).is_none());
        }
    }

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
