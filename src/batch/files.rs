//! `/v1/files`: uploads of batch input files and the outputs batches write (stored as
//! [`super::filestore`] says), visible to the client that owns them only.

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::filestore::with_defaults;
pub use super::filestore::{db_error, find, insert, write_file, FileObject};
use super::input;
use crate::auth::ClientCtx;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{Json, Query};
use crate::http::ledger_layer::StreamedBody;
use crate::AppState;

/// The upload route: the gate reads its body up to `batch.max_file_bytes`.
pub const UPLOAD_ROUTE: &str = "/v1/files";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload, list))
        .routes(routes!(get_file, delete_file))
        .routes(routes!(content))
        // The gate has read (and bounded) the body already; the multipart parser must not
        // apply the router's smaller default on top.
        .layer(DefaultBodyLimit::disable())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    pub object: String,
    pub data: Vec<FileObject>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileDeleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// The multipart form of an upload.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the form
pub struct FileUpload {
    /// Must be `batch`.
    purpose: String,
    /// JSONL batch lines, or Parquet with an `input_ids` list column (+ optional `custom_id`).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only files with this purpose.
    pub purpose: Option<String>,
    /// At most this many (1..=10000, default 10000), newest first.
    pub limit: Option<i64>,
}

/// Upload a batch input file.
#[utoipa::path(
    post, path = "/v1/files", tag = "teacher",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The stored file", body = FileObject),
        (status = 400, description = "Not a batch file, or over the line cap", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn upload(
    State(state): State<AppState>,
    ctx: ClientCtx,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let bad_form = |e: String| ApiError::BadRequest {
        message: format!("expected a multipart form with `purpose` and `file`: {e}"),
        param: None,
        code: Some("invalid_multipart"),
    };
    let mut form = form.map_err(|e| bad_form(e.body_text()))?;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| bad_form(e.body_text()))?
    {
        let name = field.name().map(str::to_string);
        match name.as_deref() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| bad_form(e.body_text()))?)
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload").to_string();
                let bytes = field.bytes().await.map_err(|e| bad_form(e.body_text()))?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    if purpose.as_deref() != Some("batch") {
        return Err(ApiError::bad_param("purpose", "`purpose` must be `batch`"));
    }
    let Some((filename, bytes)) = file else {
        return Err(ApiError::bad_param("file", "the form has no `file` part"));
    };
    let filename: String = filename
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect();
    let max_lines = state.config.batch.max_lines;
    let inspect = bytes.clone();
    let (format, _lines) = tokio::task::spawn_blocking(move || input::inspect(&inspect, max_lines))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))??;
    let id = super::new_id("file-");
    write_file(&state, &id, &bytes).await?;
    let stored = insert(
        &state.db,
        &id,
        ctx.client_id,
        "batch",
        &filename,
        bytes.len() as i64,
        format,
    )
    .await;
    if stored.is_err() {
        let _ = tokio::fs::remove_file(super::file_path(&state, &id)).await;
    }
    Ok(Json(stored?))
}

/// List the caller's files, newest first.
#[utoipa::path(
    get, path = "/v1/files", tag = "teacher", params(ListQuery),
    responses((status = 200, description = "The caller's files", body = FileList),
        (status = 400, description = "Bad query parameters", body = ErrorEnvelope)),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Query(q): Query<ListQuery>,
) -> Result<Json<FileList>, ApiError> {
    let limit = q.limit.unwrap_or(10_000).clamp(1, 10_000);
    let mut data: Vec<FileObject> = sqlx::query_as(
        "SELECT id, bytes, created_at, filename, purpose, format FROM batch_files
         WHERE client_id = $1 AND ($2::text IS NULL OR purpose = $2)
         ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(ctx.client_id)
    .bind(q.purpose)
    .bind(limit + 1)
    .fetch_all(&state.db)
    .await
    .map_err(db_error)?;
    let has_more = data.len() as i64 > limit;
    data.truncate(limit as usize);
    Ok(Json(FileList {
        object: "list".into(),
        data: data.into_iter().map(with_defaults).collect(),
        has_more,
    }))
}

/// One of the caller's files.
#[utoipa::path(
    get, path = "/v1/files/{file_id}", tag = "teacher",
    params(("file_id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 404, description = "No such file of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_file(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Path(id): Path<String>,
) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(find(&state.db, ctx.client_id, &id).await?))
}

/// Delete one of the caller's files (refused while an active batch reads it).
#[utoipa::path(
    delete, path = "/v1/files/{file_id}", tag = "teacher",
    params(("file_id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "Deleted", body = FileDeleted),
        (status = 400, description = "An active batch reads the file", body = ErrorEnvelope),
        (status = 404, description = "No such file of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn delete_file(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Path(id): Path<String>,
) -> Result<Json<FileDeleted>, ApiError> {
    let file = find(&state.db, ctx.client_id, &id).await?;
    let in_use: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM batches WHERE input_file_id = $1
                AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling'))",
    )
    .bind(&file.id)
    .fetch_one(&state.db)
    .await
    .map_err(db_error)?;
    if in_use {
        return Err(ApiError::BadRequest {
            message: format!("file `{id}` is the input of an active batch; cancel it first"),
            param: Some("file_id".into()),
            code: Some("file_in_use"),
        });
    }
    sqlx::query("DELETE FROM batch_files WHERE id = $1 AND client_id = $2")
        .bind(&file.id)
        .bind(ctx.client_id)
        .execute(&state.db)
        .await
        .map_err(db_error)?;
    if let Err(e) = tokio::fs::remove_file(super::file_path(&state, &file.id)).await {
        tracing::warn!(error = %e, file = %file.id, "could not remove a deleted file's bytes");
    }
    Ok(Json(FileDeleted {
        id: file.id,
        object: "file".into(),
        deleted: true,
    }))
}

/// The bytes of one of the caller's files, streamed.
#[utoipa::path(
    get, path = "/v1/files/{file_id}/content", tag = "teacher",
    params(("file_id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "The file's bytes", content(
            (String = "application/jsonl"), (String = "application/vnd.apache.parquet"))),
        (status = 404, description = "No such file of the caller's", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn content(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let file = find(&state.db, ctx.client_id, &id).await?;
    let handle = tokio::fs::File::open(super::file_path(&state, &file.id))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("opening file {}: {e}", file.id)))?;
    let content_type = match file.format.as_str() {
        "parquet" => "application/vnd.apache.parquet",
        _ => "application/jsonl",
    };
    let chunks = futures::stream::unfold(handle, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, file.bytes.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response();
    // Streamed and hashed on the way out: constant memory whatever the file's size.
    response.extensions_mut().insert(StreamedBody);
    Ok(response)
}
