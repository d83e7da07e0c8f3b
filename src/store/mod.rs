//! Clients and their API keys: the key format and every query on the `clients` and `api_keys`
//! tables, returning domain types.
//!
//! The rules for what may be stored (names, contacts, limit ranges, scopes, expiry) are checked
//! here, so the admin API, the console and the CLI cannot disagree on them; a refused value is a
//! [`StoreError::Invalid`] naming its field. Authentication reads keys through
//! [`key_by_hash`]; it knows no SQL.
//!
//! No cache: every function reads or writes Postgres, so a revocation, a suspension or a change
//! of limits is seen by the very next request on every instance.

pub mod apikey;
pub mod clients;
pub mod keys;
pub mod reserved;

use uuid::Uuid;

use crate::limits::Limits;

pub use apikey::{ApiKey, Scope};
pub use clients::{
    client_detail, create_client, get_client, list_clients, set_suspended, update_client,
    update_limits, Client, ClientDetail, ClientPage, ClientPatch, LimitsPatch, NewClient,
    NewLimits, Page,
};
pub use keys::{issue_key, key_by_hash, list_keys, revoke_key, touch_key, Credential, Key, NewKey};
pub use reserved::{
    bootstrap_admin, ensure_anonymous_client, ANONYMOUS_CLIENT_ID, ANONYMOUS_CLIENT_NAME,
    BOOTSTRAP_ADMIN_ID,
};

/// Why a store call failed. `From<StoreError> for ApiError` (in `error.rs`) says what each
/// becomes on the wire.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A value the store refuses to keep; `param` names the field as the API spells it.
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("a client named `{0}` already exists")]
    NameTaken(String),
    #[error("no client with id `{0}`")]
    NoSuchClient(Uuid),
    #[error("no API key with id `{0}`")]
    NoSuchKey(Uuid),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

/// A client's limit overrides as stored; `None`: the configured default applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub rpm: Option<i32>,
    pub tpm: Option<i32>,
    pub max_concurrent: Option<i32>,
    pub daily_tokens: Option<i64>,
}

impl Overrides {
    /// The limits in force: each override, or the default where there is none.
    pub fn over(&self, defaults: &Limits) -> Limits {
        // The columns only hold values > 0 (checked here and by constraints), so the casts
        // cannot wrap.
        Limits {
            rpm: self.rpm.map_or(defaults.rpm, |v| v as u32),
            tpm: self.tpm.map_or(defaults.tpm, |v| v as u32),
            max_concurrent: self
                .max_concurrent
                .map_or(defaults.max_concurrent, |v| v as u32),
            daily_tokens: self.daily_tokens.unwrap_or(defaults.daily_tokens),
        }
    }
}
