//! The daily token quota, persisted in `client_daily_usage` so that it survives restarts and is
//! shared by every instance. Tokens are added when reserved (atomically, only if they fit) and
//! the unused part is subtracted at settlement: a crash in between over-counts, never under.

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

pub struct DailyQuota {
    db: PgPool,
}

/// How long a quota adjustment is retried while the database is down.
pub const ADJUST_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(1800);

/// The reservation did not fit; `used` tokens are already spent today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub used: i64,
}

/// The quota day: UTC.
pub fn today() -> NaiveDate {
    Utc::now().date_naive()
}

impl DailyQuota {
    pub fn new(db: PgPool) -> Self {
        DailyQuota { db }
    }

    /// Adds `tokens` to the client's day if the total stays within `limit`; returns the new
    /// total.
    pub async fn try_spend(
        &self,
        client: Uuid,
        day: NaiveDate,
        tokens: i64,
        limit: i64,
    ) -> anyhow::Result<Result<i64, QuotaExceeded>> {
        if tokens > limit {
            let used = self.used(client, day).await?;
            return Ok(Err(QuotaExceeded { used }));
        }
        let total: Option<i64> = sqlx::query_scalar(
            "INSERT INTO client_daily_usage AS u (client_id, day, tokens) VALUES ($1, $2, $3)
             ON CONFLICT ON CONSTRAINT client_daily_usage_pkey
             DO UPDATE SET tokens = u.tokens + EXCLUDED.tokens
             WHERE u.tokens + EXCLUDED.tokens <= $4
             RETURNING tokens",
        )
        .bind(client)
        .bind(day)
        .bind(tokens)
        .bind(limit)
        .fetch_optional(&self.db)
        .await
        .context("reserving daily tokens")?;
        match total {
            Some(total) => Ok(Ok(total)),
            None => Ok(Err(QuotaExceeded {
                used: self.used(client, day).await?,
            })),
        }
    }

    /// Adds `delta` (negative: a refund) to the client's day, never going below zero.
    pub async fn adjust(&self, client: Uuid, day: NaiveDate, delta: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO client_daily_usage AS u (client_id, day, tokens) VALUES ($1, $2, GREATEST($3, 0))
             ON CONFLICT ON CONSTRAINT client_daily_usage_pkey
             DO UPDATE SET tokens = GREATEST(u.tokens + $3, 0)",
        )
        .bind(client)
        .bind(day)
        .bind(delta)
        .execute(&self.db)
        .await
        .context("adjusting daily tokens")?;
        Ok(())
    }

    /// [`DailyQuota::adjust`], retried in the background (with backoff, for up to
    /// [`ADJUST_RETRY_FOR`]) while the database is down: a refund or charge settled during an
    /// outage lands once it is back instead of being lost.
    pub async fn adjust_durably(&self, client: Uuid, day: NaiveDate, delta: i64) {
        let err = match self.adjust(client, day, delta).await {
            Ok(()) => return,
            Err(err) => err,
        };
        if !crate::db::is_outage_chain(&err) {
            tracing::error!(%client, delta, error = ?err, "could not settle daily tokens");
            return;
        }
        tracing::warn!(%client, delta, "database down: settling daily tokens in the background");
        let db = self.db.clone();
        tokio::spawn(async move {
            let quota = DailyQuota { db };
            let until = tokio::time::Instant::now() + ADJUST_RETRY_FOR;
            let mut wait = std::time::Duration::from_millis(250);
            loop {
                tokio::time::sleep(wait).await;
                match quota.adjust(client, day, delta).await {
                    Ok(()) => return,
                    Err(err) if tokio::time::Instant::now() > until => {
                        tracing::error!(%client, delta, error = ?err, "gave up settling daily tokens");
                        return;
                    }
                    Err(_) => wait = (wait * 2).min(std::time::Duration::from_secs(10)),
                }
            }
        });
    }

    pub async fn used(&self, client: Uuid, day: NaiveDate) -> anyhow::Result<i64> {
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT tokens FROM client_daily_usage WHERE client_id = $1 AND day = $2",
        )
        .bind(client)
        .bind(day)
        .fetch_optional(&self.db)
        .await
        .context("reading daily tokens")?;
        Ok(used.unwrap_or(0))
    }
}
