//! Terms of Service: published versions, client acceptances, and the licence policy.
//!
//! Teacher requests check the ToS on every call, so the current version and positive
//! acceptances are cached for [`CACHE_TTL`]: a version published by another process is seen
//! within that time; one published by this process is seen at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{DistillationPolicy, LicenceConfig};

pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// A refresh that takes longer serves the stale value (if any): a slow or unreachable database
/// must not stall every request (those that need the database fail on their own).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TosVersion {
    pub version: String,
    pub text: String,
    pub published_at: DateTime<Utc>,
}

/// A client's acceptance of a ToS version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Acceptance {
    pub client_id: Uuid,
    pub key_id: Uuid,
    pub version: String,
    /// What the client distils for, in its own words.
    pub purpose: String,
    /// The student model being trained.
    pub student_model: String,
    /// Declared commercial use; `non_commercial` teachers refuse such clients.
    pub commercial: bool,
    pub accepted_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum TosError {
    #[error("ToS version `{0}` is already published")]
    VersionExists(String),
    #[error("no Terms of Service have been published yet")]
    NothingPublished,
    #[error("`{given}` is not the current ToS version (`{current}`)")]
    NotCurrent { given: String, current: String },
    #[error("timed out reading the Terms of Service")]
    Timeout,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// ToS storage with a small read cache.
pub struct TosStore {
    db: PgPool,
    current: RwLock<Option<(Instant, Option<TosVersion>)>>,
    refreshing: AtomicBool,
    accepted: DashMap<(Uuid, String), (Instant, Acceptance)>,
}

impl TosStore {
    pub fn new(db: PgPool) -> Self {
        Self {
            db,
            current: RwLock::new(None),
            refreshing: AtomicBool::new(false),
            accepted: DashMap::new(),
        }
    }

    /// The version in force: the one published last. Cached for [`CACHE_TTL`]; while one
    /// caller refreshes, the others get the stale value.
    pub async fn current(&self) -> Result<Option<TosVersion>, TosError> {
        let cached = self.current.read().clone();
        if let Some((at, v)) = &cached {
            if at.elapsed() < CACHE_TTL || self.refreshing.swap(true, Ordering::AcqRel) {
                return Ok(v.clone());
            }
        }
        let fetched = tokio::time::timeout(
            REFRESH_TIMEOUT,
            sqlx::query_as::<_, TosVersion>(
                "SELECT version, text, published_at FROM tos_versions ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&self.db),
        )
        .await;
        self.refreshing.store(false, Ordering::Release);
        match (fetched, cached) {
            (Ok(Ok(v)), _) => {
                *self.current.write() = Some((Instant::now(), v.clone()));
                Ok(v)
            }
            (_, Some((_, stale))) => Ok(stale),
            (Ok(Err(e)), None) => Err(TosError::Db(e)),
            (Err(_), None) => Err(TosError::Timeout),
        }
    }

    /// The version in force for a ledger row: best effort, never an error.
    pub async fn current_version_for_ledger(&self) -> Option<String> {
        self.current().await.ok().flatten().map(|v| v.version)
    }

    pub async fn publish(&self, version: &str, text: &str) -> Result<TosVersion, TosError> {
        let v: TosVersion = sqlx::query_as(
            "INSERT INTO tos_versions (version, text) VALUES ($1, $2)
             RETURNING version, text, published_at",
        )
        .bind(version)
        .bind(text)
        .fetch_one(&self.db)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some("tos_versions_version_key") => {
                TosError::VersionExists(version.to_string())
            }
            _ => TosError::Db(e),
        })?;
        *self.current.write() = Some((Instant::now(), Some(v.clone())));
        Ok(v)
    }

    /// Record an acceptance of `version`, which must be the current one.
    pub async fn accept(
        &self,
        client_id: Uuid,
        key_id: Uuid,
        version: &str,
        purpose: &str,
        student_model: &str,
        commercial: bool,
    ) -> Result<Acceptance, TosError> {
        // Read the current version fresh: accepting a superseded text must not count.
        *self.current.write() = None;
        let current = self.current().await?.ok_or(TosError::NothingPublished)?;
        if current.version != version {
            return Err(TosError::NotCurrent {
                given: version.to_string(),
                current: current.version,
            });
        }
        let a: Acceptance = sqlx::query_as(
            "INSERT INTO tos_acceptances (client_id, key_id, version, purpose, student_model, commercial)
             VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING client_id, key_id, version, purpose, student_model, commercial, accepted_at",
        )
        .bind(client_id)
        .bind(key_id)
        .bind(version)
        .bind(purpose)
        .bind(student_model)
        .bind(commercial)
        .fetch_one(&self.db)
        .await?;
        self.accepted.insert(
            (client_id, version.to_string()),
            (Instant::now(), a.clone()),
        );
        Ok(a)
    }

    /// The client's latest acceptance of `version`, if any. Positive answers are cached for
    /// [`CACHE_TTL`] and served stale when the database does not answer (an acceptance is never
    /// withdrawn, only superseded).
    pub async fn acceptance(
        &self,
        client_id: Uuid,
        version: &str,
    ) -> Result<Option<Acceptance>, TosError> {
        let key = (client_id, version.to_string());
        let cached = self.accepted.get(&key).map(|e| e.value().clone());
        if let Some((at, a)) = &cached {
            if at.elapsed() < CACHE_TTL {
                return Ok(Some(a.clone()));
            }
        }
        let fetched = tokio::time::timeout(
            REFRESH_TIMEOUT,
            sqlx::query_as::<_, Acceptance>(
                "SELECT client_id, key_id, version, purpose, student_model, commercial, accepted_at
                 FROM tos_acceptances WHERE client_id = $1 AND version = $2 ORDER BY id DESC LIMIT 1",
            )
            .bind(client_id)
            .bind(version)
            .fetch_optional(&self.db),
        )
        .await;
        match (fetched, cached) {
            (Ok(Ok(a)), _) => {
                match &a {
                    Some(a) => {
                        self.accepted.insert(key, (Instant::now(), a.clone()));
                    }
                    None => {
                        self.accepted.remove(&key);
                    }
                }
                Ok(a)
            }
            (_, Some((_, stale))) => Ok(Some(stale)),
            (Ok(Err(e)), None) => Err(TosError::Db(e)),
            (Err(_), None) => Err(TosError::Timeout),
        }
    }
}

/// Why a licence refuses a client, or `None` when it may be served.
pub fn licence_refusal(licence: &LicenceConfig, commercial: bool) -> Option<String> {
    match licence.distillation {
        DistillationPolicy::Prohibited => Some(format!(
            "the licence of this model (`{}`) does not allow distillation",
            licence.id
        )),
        DistillationPolicy::NonCommercial if commercial => Some(format!(
            "the licence of this model (`{}`) allows only non-commercial distillation, and you declared commercial use",
            licence.id
        )),
        DistillationPolicy::Allowed
        | DistillationPolicy::AttributionRequired
        | DistillationPolicy::NonCommercial => None,
    }
}

/// The attribution a response must carry, if the licence asks for one.
pub fn attribution(licence: &LicenceConfig) -> Option<String> {
    match (&licence.attribution, licence.distillation) {
        (Some(text), _) => Some(text.clone()),
        (None, DistillationPolicy::AttributionRequired) => {
            Some(format!("Built with a model licensed under {}", licence.id))
        }
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lic(d: DistillationPolicy, attribution: Option<&str>) -> LicenceConfig {
        LicenceConfig {
            id: "x".into(),
            distillation: d,
            attribution: attribution.map(str::to_string),
        }
    }

    #[test]
    fn licence_policies_refuse_exactly_the_forbidden_uses() {
        use DistillationPolicy::*;
        for commercial in [false, true] {
            assert!(licence_refusal(&lic(Allowed, None), commercial).is_none());
            assert!(licence_refusal(&lic(AttributionRequired, None), commercial).is_none());
            assert!(licence_refusal(&lic(Prohibited, None), commercial).is_some());
        }
        assert!(licence_refusal(&lic(NonCommercial, None), false).is_none());
        assert!(licence_refusal(&lic(NonCommercial, None), true).is_some());
    }

    #[test]
    fn attribution_uses_the_configured_text_or_a_fallback() {
        use DistillationPolicy::*;
        assert_eq!(
            attribution(&lic(AttributionRequired, Some("Built with Llama"))).as_deref(),
            Some("Built with Llama")
        );
        assert!(attribution(&lic(AttributionRequired, None)).is_some());
        assert_eq!(attribution(&lic(Allowed, None)), None);
    }
}
