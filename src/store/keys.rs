//! The `api_keys` table: issue (the plaintext exists only in the return value), revoke, list,
//! and the lookup authentication makes on every request.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{ApiKey, Overrides, Result, Scope, StoreError};

/// A key as stored: no secret, only its display prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub id: Uuid,
    pub client_id: Uuid,
    /// `tk_` and the key's first 8 characters.
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A key to issue. [`issue_key`] checks it.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// At least one; repeats are dropped.
    pub scopes: Vec<Scope>,
    /// When the key stops working; must be in the future. `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A key and its client, as authentication reads them in one indexed query.
#[derive(Clone, Debug)]
pub struct Credential {
    pub key_id: Uuid,
    /// The stored SHA-256, for the caller's constant-time comparison.
    pub key_hash: Vec<u8>,
    pub scopes: Vec<Scope>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub client_id: Uuid,
    pub client_name: String,
    pub suspended: bool,
    pub overrides: Overrides,
}

// --- rows ------------------------------------------------------------------------------------

/// Stored scopes this build does not know are ignored (the column's constraint allows only
/// known ones).
fn scopes_of(raw: &[String]) -> Vec<Scope> {
    raw.iter().filter_map(|s| Scope::parse(s)).collect()
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    client_id: Uuid,
    prefix: String,
    scopes: Vec<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

const KEY_COLUMNS: &str =
    "id, client_id, prefix, scopes, created_at, expires_at, revoked_at, last_used_at";

impl From<KeyRow> for Key {
    fn from(k: KeyRow) -> Self {
        Key {
            id: k.id,
            client_id: k.client_id,
            prefix: k.prefix,
            scopes: scopes_of(&k.scopes),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            last_used_at: k.last_used_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct CredentialRow {
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

// --- validation ------------------------------------------------------------------------------

fn valid_scopes(scopes: &[Scope]) -> Result<Vec<Scope>> {
    if scopes.is_empty() {
        return Err(StoreError::invalid(
            "scopes",
            "`scopes` must name at least one scope",
        ));
    }
    let mut out = Vec::with_capacity(scopes.len());
    for &scope in scopes {
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(out)
}

// --- queries ---------------------------------------------------------------------------------

/// Issues a key to `client_id` ([`StoreError::NoSuchClient`] if there is none) and returns it
/// with its plaintext, which exists nowhere else: show it once, store only the record.
pub async fn issue_key(db: &PgPool, client_id: Uuid, new: &NewKey) -> Result<(Key, ApiKey)> {
    let scopes = valid_scopes(&new.scopes)?;
    if new.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(StoreError::invalid(
            "expires_at",
            "`expires_at` must be in the future",
        ));
    }
    let key = ApiKey::generate();
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    // Inserting from the client's row: no row, no key (and no separate existence check).
    let row = sqlx::query_as::<_, KeyRow>(&format!(
        "INSERT INTO api_keys (id, client_id, key_hash, prefix, scopes, expires_at)
         SELECT $1, c.id, $3, $4, $5, $6 FROM clients c WHERE c.id = $2
         RETURNING {KEY_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(client_id)
    .bind(&key.hash()[..])
    .bind(key.prefix())
    .bind(&scopes)
    .bind(new.expires_at)
    .fetch_optional(db)
    .await?
    .ok_or(StoreError::NoSuchClient(client_id))?;
    let record = Key::from(row);
    tracing::info!(%client_id, key_id = %record.id, prefix = %record.prefix, "API key issued");
    Ok((record, key))
}

/// Revokes a key: its next request gets 401. Revoking twice keeps the first time.
pub async fn revoke_key(db: &PgPool, id: Uuid) -> Result<Key> {
    let row = sqlx::query_as::<_, KeyRow>(&format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING {KEY_COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?
    .ok_or(StoreError::NoSuchKey(id))?;
    tracing::info!(key_id = %id, "API key revoked");
    Ok(row.into())
}

/// A client's keys, revoked and expired ones included, oldest first.
pub async fn list_keys(db: &PgPool, client_id: Uuid) -> Result<Vec<Key>> {
    let rows = sqlx::query_as::<_, KeyRow>(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE client_id = $1 ORDER BY created_at, id"
    ))
    .bind(client_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Key::from).collect())
}

/// The key whose SHA-256 is `hash`, with its client. The caller decides what revoked, expired
/// or suspended means; this only reads.
pub async fn key_by_hash(db: &PgPool, hash: &[u8; 32]) -> Result<Option<Credential>> {
    let row: Option<CredentialRow> = sqlx::query_as(
        "SELECT k.id AS key_id, k.key_hash, k.scopes, k.expires_at, k.revoked_at, k.last_used_at,
                c.id AS client_id, c.name AS client_name, c.suspended,
                c.rpm, c.tpm, c.max_concurrent, c.daily_tokens
         FROM api_keys k JOIN clients c ON c.id = k.client_id
         WHERE k.key_hash = $1",
    )
    .bind(&hash[..])
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| Credential {
        key_id: r.key_id,
        key_hash: r.key_hash,
        scopes: scopes_of(&r.scopes),
        expires_at: r.expires_at,
        revoked_at: r.revoked_at,
        last_used_at: r.last_used_at,
        client_id: r.client_id,
        client_name: r.client_name,
        suspended: r.suspended,
        overrides: Overrides {
            rpm: r.rpm,
            tpm: r.tpm,
            max_concurrent: r.max_concurrent,
            daily_tokens: r.daily_tokens,
        },
    }))
}

/// Records that a key was used now.
pub async fn touch_key(db: &PgPool, key_id: Uuid) -> Result<()> {
    sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
        .bind(key_id)
        .execute(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_validated() {
        assert!(valid_scopes(&[]).is_err());
        assert_eq!(
            valid_scopes(&[Scope::Teacher, Scope::Admin, Scope::Teacher]).unwrap(),
            vec![Scope::Teacher, Scope::Admin]
        );
    }
}
