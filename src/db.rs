use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::{redact_url, DatabaseConfig};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let opts: PgConnectOptions = cfg
        .url
        .parse()
        .with_context(|| format!("invalid database url {}", redact_url(&cfg.url)))?;
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms.max(1)))
        .connect_with(opts)
        .await
        .with_context(|| format!("connecting to {}", redact_url(&cfg.url)))
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("running migrations")
}

/// Runs the migrations as configured: over `database.migrate_url` (the owner role) when set,
/// else over `pool`.
pub async fn migrate_as_owner(cfg: &DatabaseConfig, pool: &PgPool) -> anyhow::Result<()> {
    if cfg.migrate_url.is_empty() {
        return migrate(pool).await;
    }
    let owner = DatabaseConfig {
        url: cfg.migrate_url.clone(),
        max_connections: 1,
        ..cfg.clone()
    };
    let owner_pool = connect(&owner).await?;
    let result = migrate(&owner_pool).await;
    owner_pool.close().await;
    result
}

/// Who `pool` logs in as, when that role could rewrite the ledger: a superuser, or the owner
/// of the ledger's table (who can disable its append-only triggers).
pub async fn ledger_rewriter(pool: &PgPool) -> anyhow::Result<Option<String>> {
    let (user, superuser, owner): (String, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, r.rolsuper, \
                coalesce((SELECT pg_has_role(current_user, c.relowner, 'USAGE') \
                          FROM pg_class c WHERE c.oid = to_regclass('usage_events')), false) \
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    Ok(match (superuser, owner) {
        (true, _) => Some(format!("{user} (a superuser)")),
        (false, true) => Some(format!("{user} (owner of the ledger's tables)")),
        _ => None,
    })
}

/// Whether `err` means the database is unreachable, down or overloaded (an outage: 503), as
/// opposed to a query that is wrong (a bug: 500).
pub fn is_outage(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // Class 08 (connection exception), 53 (insufficient resources), 57P01-57P03
            // (admin shutdown, crash shutdown, cannot connect now).
            db.code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57P"))
        }
        _ => false,
    }
}

/// Whether an error chain holds a database outage.
pub fn is_outage_chain(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<sqlx::Error>().is_some_and(is_outage))
}

/// A circuit breaker in front of the database: once a query failed because the database is
/// down, requests fail fast (503 with `Retry-After`) for `backoff` instead of each waiting out
/// the pool's acquire timeout; then one request at a time probes until one succeeds.
pub struct DbHealth {
    origin: std::time::Instant,
    /// Milliseconds since `origin` until which the database counts as down; 0 when up.
    down_until_ms: std::sync::atomic::AtomicU64,
    probing: std::sync::atomic::AtomicBool,
    backoff: Duration,
}

/// What [`DbHealth::admit`] allows.
#[derive(Debug, PartialEq, Eq)]
pub enum DbAdmit {
    /// The database is up: go ahead.
    Go,
    /// It was down; this request is the one that probes it. Report the result.
    Probe,
    /// It is down: fail fast.
    Down,
}

impl DbHealth {
    pub fn new(backoff: Duration) -> Self {
        DbHealth {
            origin: std::time::Instant::now(),
            down_until_ms: Default::default(),
            probing: Default::default(),
            backoff,
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    pub fn admit(&self) -> DbAdmit {
        use std::sync::atomic::Ordering;
        let until = self.down_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return DbAdmit::Go;
        }
        if self.now_ms() < until {
            return DbAdmit::Down;
        }
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            DbAdmit::Probe
        } else {
            DbAdmit::Down
        }
    }

    /// A query succeeded: the database is up.
    pub fn up(&self) {
        use std::sync::atomic::Ordering;
        self.down_until_ms.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// A query failed with an outage: fail fast for the backoff.
    pub fn down(&self) {
        use std::sync::atomic::Ordering;
        let until = self.now_ms() + self.backoff.as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// A probe ended without telling either way (e.g. the key was unknown before any query
    /// failed): let the next request probe.
    pub fn release_probe(&self) {
        self.probing
            .store(false, std::sync::atomic::Ordering::Release);
    }

    pub fn is_down(&self) -> bool {
        self.down_until_ms
            .load(std::sync::atomic::Ordering::Acquire)
            != 0
    }
}
