//! The two reserved clients: the bootstrap admin (`teachd admin bootstrap`) and the anonymous
//! client of `server.disable_auth`.

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use super::keys::{self, Key, NewKey};
use super::{ApiKey, Scope};

/// The client `teachd admin bootstrap` issues admin keys to: a reserved id, so that no tenant
/// (one named `admin`, say) can be mistaken for it.
pub const BOOTSTRAP_ADMIN_ID: Uuid = Uuid::from_u128(0x7eac_6d00_0000_4000_8000_0000_0000_ad31);

/// Id of the client that requests run as when `server.disable_auth` is set.
pub const ANONYMOUS_CLIENT_ID: Uuid = Uuid::nil();
pub const ANONYMOUS_CLIENT_NAME: &str = "anonymous";

/// `teachd admin bootstrap`: makes sure the reserved admin client exists and is not suspended,
/// and issues it a new admin key. Always yields a working key: a tenant that took the name,
/// or a suspension of the admin client, cannot break it (the operator running this has the
/// database credentials anyway). Each call issues another key; earlier ones stay valid.
pub async fn bootstrap_admin(db: &PgPool) -> anyhow::Result<(Key, ApiKey)> {
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
    let new = NewKey {
        scopes: vec![Scope::Admin],
        expires_at: None,
    };
    keys::issue_key(db, BOOTSTRAP_ADMIN_ID, &new)
        .await
        .context("inserting an API key")
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
