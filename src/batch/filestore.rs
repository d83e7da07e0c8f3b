//! Where files live: their bytes on disk under `batch.data_dir/files/<id>`, their owner and
//! facts in the `batch_files` table. Disk rather than a `bytea` column: outputs are appended
//! line by line while a batch runs and can be many times the size of their input (top-k
//! logprobs per token), Postgres caps a value at 1 GB and rewrites it whole on every change, and
//! a file on disk is served streamed, in constant memory. The container mounts a volume there.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

use super::input::Format;
use crate::error::ApiError;
use crate::AppState;

/// OpenAI's file object.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct FileObject {
    pub id: String,
    #[sqlx(skip)]
    #[serde(default = "file_object")]
    pub object: String,
    pub bytes: i64,
    #[serde(with = "chrono::serde::ts_seconds")]
    #[schema(value_type = i64)]
    pub created_at: DateTime<Utc>,
    pub filename: String,
    /// `batch` (uploads) or `batch_output` (outputs and error files of batches).
    pub purpose: String,
    /// `jsonl` or `parquet` (teachd's addition).
    pub format: String,
    #[sqlx(skip)]
    #[serde(default = "processed")]
    pub status: String,
}

pub(super) fn file_object() -> String {
    "file".into()
}
pub(super) fn processed() -> String {
    "processed".into()
}

/// Writes `bytes` as file `id` (through a temporary name, so a crash never leaves half a file
/// under the real one).
pub async fn write_file(state: &AppState, id: &str, bytes: &[u8]) -> Result<(), ApiError> {
    let path = super::file_path(state, id);
    let tmp = path.with_extension("part");
    let io = |e: std::io::Error| ApiError::Internal(anyhow::anyhow!("storing file {id}: {e}"));
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
    }
    tokio::fs::write(&tmp, bytes).await.map_err(io)?;
    tokio::fs::rename(&tmp, &path).await.map_err(io)
}

pub async fn insert(
    db: &PgPool,
    id: &str,
    client: uuid::Uuid,
    purpose: &str,
    filename: &str,
    bytes: i64,
    format: Format,
) -> Result<FileObject, ApiError> {
    let row: FileObject = sqlx::query_as(
        "INSERT INTO batch_files (id, client_id, purpose, filename, bytes, format)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, bytes, created_at, filename, purpose, format",
    )
    .bind(id)
    .bind(client)
    .bind(purpose)
    .bind(filename)
    .bind(bytes)
    .bind(format.as_str())
    .fetch_one(db)
    .await
    .map_err(db_error)?;
    Ok(with_defaults(row))
}

pub(super) fn with_defaults(mut f: FileObject) -> FileObject {
    f.object = file_object();
    f.status = processed();
    f
}

pub fn db_error(e: sqlx::Error) -> ApiError {
    if crate::db::is_outage(&e) {
        ApiError::ServiceUnavailable("the database is unavailable; retry shortly".into())
    } else {
        ApiError::Internal(e.into())
    }
}

/// The file `id` of `client`, or 404 (also when it is another client's).
pub async fn find(db: &PgPool, client: uuid::Uuid, id: &str) -> Result<FileObject, ApiError> {
    let not_found = || ApiError::NotFound {
        message: format!("No such file: `{id}`"),
        param: Some("file_id".into()),
    };
    if !super::valid_id(id, "file-") {
        return Err(not_found());
    }
    sqlx::query_as(
        "SELECT id, bytes, created_at, filename, purpose, format FROM batch_files
         WHERE id = $1 AND client_id = $2",
    )
    .bind(id)
    .bind(client)
    .fetch_optional(db)
    .await
    .map_err(db_error)?
    .map(with_defaults)
    .ok_or_else(not_found)
}
