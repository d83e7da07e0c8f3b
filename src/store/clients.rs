//! The `clients` table: create, read, list, change (limits, suspension).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::keys::{self, Key};
use super::{Overrides, Result, StoreError};
use crate::limits::Limits;

/// A client as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub id: Uuid,
    pub name: String,
    pub contact: Option<String>,
    /// A suspended client's keys get 403 `client_suspended` on their very next request.
    pub suspended: bool,
    pub overrides: Overrides,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Client {
    /// Effective limits: this client's overrides over `defaults` (the `[limits]` config).
    pub fn limits(&self, defaults: &Limits) -> Limits {
        self.overrides.over(defaults)
    }
}

/// A client, its keys (never their secrets), oldest key first.
#[derive(Clone, Debug)]
pub struct ClientDetail {
    pub client: Client,
    pub keys: Vec<Key>,
}

/// A new client. [`create_client`] trims and checks every field.
#[derive(Clone, Debug, Default)]
pub struct NewClient {
    /// Unique, 1 to 200 characters once trimmed, no NUL.
    pub name: String,
    /// At most 320 characters, no NUL; blank is stored as none.
    pub contact: Option<String>,
    pub limits: NewLimits,
}

/// Limit overrides asked for; `None`: the configured default. `rpm`, `tpm` and
/// `max_concurrent` must be in 1..=2^31-1, `daily_tokens` in 1..=2^52.
#[derive(Clone, Copy, Debug, Default)]
pub struct NewLimits {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub daily_tokens: Option<i64>,
}

/// Changes to a client; `None` keeps a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ClientPatch {
    pub name: Option<String>,
    /// `Some(None)` (or a blank contact) clears it.
    pub contact: Option<Option<String>>,
    pub suspended: Option<bool>,
    pub limits: LimitsPatch,
}

/// Changes to limit overrides: `None` keeps one, `Some(None)` goes back to the configured
/// default, `Some(Some(v))` sets it (ranges as in [`NewLimits`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct LimitsPatch {
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    pub max_concurrent: Option<Option<i64>>,
    pub daily_tokens: Option<Option<i64>>,
}

/// A window of the client list, oldest first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Page {
    /// Start after this client (a [`ClientPage::next`]); `None`: from the first. An id that
    /// names no client gives an empty page.
    pub after: Option<Uuid>,
    /// At most this many clients; `None`: all of them.
    pub limit: Option<u32>,
}

impl Page {
    /// Every client.
    pub const ALL: Page = Page {
        after: None,
        limit: None,
    };
}

#[derive(Clone, Debug)]
pub struct ClientPage {
    pub clients: Vec<Client>,
    /// The [`Page::after`] of the next page; `None` when this one is the last.
    pub next: Option<Uuid>,
}

// --- rows ------------------------------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct ClientRow {
    id: Uuid,
    name: String,
    contact: Option<String>,
    suspended: bool,
    rpm: Option<i32>,
    tpm: Option<i32>,
    max_concurrent: Option<i32>,
    daily_tokens: Option<i64>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const CLIENT_COLUMNS: &str =
    "id, name, contact, suspended, rpm, tpm, max_concurrent, daily_tokens, created_at, updated_at";

impl From<ClientRow> for Client {
    fn from(r: ClientRow) -> Self {
        Client {
            id: r.id,
            name: r.name,
            contact: r.contact,
            suspended: r.suspended,
            overrides: Overrides {
                rpm: r.rpm,
                tpm: r.tpm,
                max_concurrent: r.max_concurrent,
                daily_tokens: r.daily_tokens,
            },
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

// --- validation ------------------------------------------------------------------------------

fn no_nul(param: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(StoreError::invalid(
            param,
            format!("`{param}` must not contain NUL (U+0000)"),
        ));
    }
    Ok(())
}

fn valid_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(StoreError::invalid(
            "name",
            "`name` must be 1 to 200 characters",
        ));
    }
    no_nul("name", name)?;
    Ok(name.to_string())
}

fn valid_contact(contact: Option<&str>) -> Result<Option<String>> {
    if let Some(c) = contact {
        no_nul("contact", c)?;
    }
    match contact.map(str::trim) {
        Some(c) if c.chars().count() > 320 => Err(StoreError::invalid(
            "contact",
            "`contact` must be at most 320 characters",
        )),
        Some("") | None => Ok(None),
        Some(c) => Ok(Some(c.to_string())),
    }
}

const MAX_I32: i64 = i32::MAX as i64;
const MAX_DAILY: i64 = 1 << 52;

/// A limit in 1..=`max` (the i32 columns cap rpm, tpm and max_concurrent).
fn valid_limit(field: &str, value: Option<i64>, max: i64) -> Result<Option<i64>> {
    match value {
        Some(v) if !(1..=max).contains(&v) => Err(StoreError::invalid(
            &format!("limits.{field}"),
            format!("`limits.{field}` must be between 1 and {max}"),
        )),
        other => Ok(other),
    }
}

impl NewLimits {
    fn checked(&self) -> Result<Overrides> {
        let narrow = |field: &str, v: Option<i64>| -> Result<Option<i32>> {
            Ok(valid_limit(field, v, MAX_I32)?.map(|v| v as i32))
        };
        Ok(Overrides {
            rpm: narrow("rpm", self.rpm)?,
            tpm: narrow("tpm", self.tpm)?,
            max_concurrent: narrow("max_concurrent", self.max_concurrent)?,
            daily_tokens: valid_limit("daily_tokens", self.daily_tokens, MAX_DAILY)?,
        })
    }
}

/// Per limit: (set?, value); `set` false keeps the column as it is.
struct CheckedPatch {
    rpm: (bool, Option<i32>),
    tpm: (bool, Option<i32>),
    max_concurrent: (bool, Option<i32>),
    daily_tokens: (bool, Option<i64>),
}

impl LimitsPatch {
    fn checked(&self) -> Result<CheckedPatch> {
        let lim = |field: &str, v: Option<Option<i64>>, max: i64| -> Result<(bool, Option<i64>)> {
            match v {
                None => Ok((false, None)),
                Some(v) => Ok((true, valid_limit(field, v, max)?)),
            }
        };
        let narrow = |(set, v): (bool, Option<i64>)| (set, v.map(|v| v as i32));
        Ok(CheckedPatch {
            rpm: narrow(lim("rpm", self.rpm, MAX_I32)?),
            tpm: narrow(lim("tpm", self.tpm, MAX_I32)?),
            max_concurrent: narrow(lim("max_concurrent", self.max_concurrent, MAX_I32)?),
            daily_tokens: lim("daily_tokens", self.daily_tokens, MAX_DAILY)?,
        })
    }
}

fn name_taken(err: sqlx::Error, name: &str) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.constraint() == Some("clients_name_key") => {
            StoreError::NameTaken(name.to_string())
        }
        _ => err.into(),
    }
}

// --- queries ---------------------------------------------------------------------------------

/// Creates a client; 400-class [`StoreError::Invalid`] or [`StoreError::NameTaken`] when a
/// field is refused.
pub async fn create_client(db: &PgPool, new: &NewClient) -> Result<Client> {
    let name = valid_name(&new.name)?;
    let contact = valid_contact(new.contact.as_deref())?;
    let o = new.limits.checked()?;
    let row = sqlx::query_as::<_, ClientRow>(&format!(
        "INSERT INTO clients (id, name, contact, rpm, tpm, max_concurrent, daily_tokens)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {CLIENT_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(&name)
    .bind(contact)
    .bind(o.rpm)
    .bind(o.tpm)
    .bind(o.max_concurrent)
    .bind(o.daily_tokens)
    .fetch_one(db)
    .await
    .map_err(|e| name_taken(e, &name))?;
    tracing::info!(client_id = %row.id, "client created");
    Ok(row.into())
}

/// The client with `id`, or [`StoreError::NoSuchClient`].
pub async fn get_client(db: &PgPool, id: Uuid) -> Result<Client> {
    sqlx::query_as::<_, ClientRow>(&format!(
        "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?
    .map(Client::from)
    .ok_or(StoreError::NoSuchClient(id))
}

/// The client with `id` and its keys.
pub async fn client_detail(db: &PgPool, id: Uuid) -> Result<ClientDetail> {
    let client = get_client(db, id).await?;
    let keys = keys::list_keys(db, id).await?;
    Ok(ClientDetail { client, keys })
}

/// Clients oldest first (by creation time, then id), one page at a time.
pub async fn list_clients(db: &PgPool, page: Page) -> Result<ClientPage> {
    // One more than asked for tells whether there is a next page.
    let fetch = page.limit.map(|n| i64::from(n) + 1);
    let rows = sqlx::query_as::<_, ClientRow>(&format!(
        "SELECT {CLIENT_COLUMNS} FROM clients
         WHERE $1::uuid IS NULL
            OR (created_at, id) > (SELECT created_at, id FROM clients WHERE id = $1)
         ORDER BY created_at, id
         LIMIT $2"
    ))
    .bind(page.after)
    .bind(fetch)
    .fetch_all(db)
    .await?;
    let mut clients: Vec<Client> = rows.into_iter().map(Client::from).collect();
    let next = match page.limit {
        Some(n) if clients.len() > n as usize => {
            clients.truncate(n as usize);
            clients.last().map(|c| c.id)
        }
        _ => None,
    };
    Ok(ClientPage { clients, next })
}

/// Changes a client in one statement; takes effect on its next request.
pub async fn update_client(db: &PgPool, id: Uuid, patch: &ClientPatch) -> Result<Client> {
    let name = patch.name.as_deref().map(valid_name).transpose()?;
    let contact = patch
        .contact
        .as_ref()
        .map(|c| valid_contact(c.as_deref()))
        .transpose()?;
    let l = patch.limits.checked()?;
    let row = sqlx::query_as::<_, ClientRow>(&format!(
        "UPDATE clients SET
            name = COALESCE($2, name),
            contact = CASE WHEN $3 THEN $4 ELSE contact END,
            suspended = COALESCE($5, suspended),
            rpm = CASE WHEN $6 THEN $7 ELSE rpm END,
            tpm = CASE WHEN $8 THEN $9 ELSE tpm END,
            max_concurrent = CASE WHEN $10 THEN $11 ELSE max_concurrent END,
            daily_tokens = CASE WHEN $12 THEN $13 ELSE daily_tokens END,
            updated_at = now()
         WHERE id = $1 RETURNING {CLIENT_COLUMNS}"
    ))
    .bind(id)
    .bind(name.as_deref())
    .bind(contact.is_some())
    .bind(contact.flatten())
    .bind(patch.suspended)
    .bind(l.rpm.0)
    .bind(l.rpm.1)
    .bind(l.tpm.0)
    .bind(l.tpm.1)
    .bind(l.max_concurrent.0)
    .bind(l.max_concurrent.1)
    .bind(l.daily_tokens.0)
    .bind(l.daily_tokens.1)
    .fetch_optional(db)
    .await
    .map_err(|e| name_taken(e, name.as_deref().unwrap_or_default()))?
    .ok_or(StoreError::NoSuchClient(id))?;
    tracing::info!(client_id = %id, suspended = row.suspended, "client updated");
    Ok(row.into())
}

/// Changes only a client's limit overrides.
pub async fn update_limits(db: &PgPool, id: Uuid, limits: &LimitsPatch) -> Result<Client> {
    let patch = ClientPatch {
        limits: *limits,
        ..ClientPatch::default()
    };
    update_client(db, id, &patch).await
}

/// Suspends (`true`) or resumes (`false`) a client.
pub async fn set_suspended(db: &PgPool, id: Uuid, suspended: bool) -> Result<Client> {
    let patch = ClientPatch {
        suspended: Some(suspended),
        ..ClientPatch::default()
    };
    update_client(db, id, &patch).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_range_checked_with_their_name() {
        let err = valid_limit("rpm", Some(0), MAX_I32).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { ref param, .. } if param == "limits.rpm"));
        assert!(valid_limit("tpm", Some(MAX_I32 + 1), MAX_I32).is_err());
        assert_eq!(valid_limit("tpm", None, MAX_I32).unwrap(), None);
        assert!(valid_name("   ").is_err());
        assert!(valid_name("a\0b").is_err());
        assert!(valid_contact(Some("x\0")).is_err());
        assert_eq!(valid_contact(Some("  ")).unwrap(), None);
    }

    #[test]
    fn limits_patch_keeps_clears_and_sets() {
        let p = LimitsPatch {
            rpm: None,
            tpm: Some(None),
            max_concurrent: Some(Some(3)),
            daily_tokens: Some(Some(MAX_DAILY + 1)),
        };
        let err = p.checked().err().expect("daily_tokens over 2^52");
        assert!(
            matches!(err, StoreError::Invalid { ref param, .. } if param == "limits.daily_tokens")
        );
        let ok = LimitsPatch {
            daily_tokens: None,
            ..p
        }
        .checked()
        .unwrap();
        assert_eq!(ok.rpm, (false, None));
        assert_eq!(ok.tpm, (true, None));
        assert_eq!(ok.max_concurrent, (true, Some(3)));
        assert_eq!(ok.daily_tokens, (false, None));
    }

    #[test]
    fn overrides_fall_back_to_defaults() {
        let defaults = Limits {
            rpm: 10,
            tpm: 20,
            max_concurrent: 3,
            daily_tokens: 40,
        };
        let o = Overrides {
            tpm: Some(7),
            daily_tokens: Some(9),
            ..Overrides::default()
        };
        let l = o.over(&defaults);
        assert_eq!(
            (l.rpm, l.tpm, l.max_concurrent, l.daily_tokens),
            (10, 7, 3, 9)
        );
    }
}
