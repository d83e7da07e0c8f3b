//! Batch jobs in the OpenAI Batch API shape: a client uploads a file of requests
//! (`/v1/files`), creates a batch over it (`/v1/batches`), and gets back an output file.
//!
//! - [`files`]: the `/v1/files` routes; [`filestore`]: where files live (disk + `batch_files`);
//! - [`input`]: reading the lines of an input file (JSONL batch lines or Parquet rows);
//! - [`validate`]: every line checked before any engine time, the job's token cost;
//! - [`store`]: the `batches` table: state, resume point, progress;
//! - [`create`]: `POST /v1/batches`: validation and the quota reservation up front;
//! - [`api`]: the other `/v1/batches` routes and the SSE progress stream;
//! - [`runner`]: the background task that runs lines (two at once on an idle machine) and resumes after a
//!   restart; `line`: one line run, recorded in the ledger, settled and committed;
//! - [`output`]: output lines (JSONL) and the Parquet dataset of a logprobs batch;
//! - [`finish`]: the end of a batch: output files, final status, the unused quota refunded;
//! - [`cli`]: `teachd batch ...`, the client side.
//!
//! Files and batches belong to the client that created them: another client gets 404.

pub mod api;
pub mod cli;
pub mod create;
pub mod files;
pub mod filestore;
pub mod finish;
pub mod input;
mod line;
pub mod output;
pub mod runner;
pub mod store;
pub mod validate;

use std::path::PathBuf;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// The endpoints a batch may target.
pub const ENDPOINTS: &[&str] = &[
    "/v1/logprobs",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/judgments",
];

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(files::routes())
        .merge(api::routes())
}

/// `batch.data_dir` with `~` expanded.
pub fn data_dir(state: &AppState) -> PathBuf {
    crate::config::expand_home(&state.config.batch.data_dir)
}

/// Where the bytes of file `id` live.
pub fn file_path(state: &AppState, id: &str) -> PathBuf {
    data_dir(state).join("files").join(id)
}

/// Work files of a running batch: output and error lines, appended as lines finish.
pub fn work_path(state: &AppState, batch_id: &str, kind: &str) -> PathBuf {
    data_dir(state)
        .join("work")
        .join(format!("{batch_id}.{kind}.jsonl"))
}

/// A new id with `prefix` (`file-`, `batch_`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

/// Path ids are bounded and plain (they go into file names).
pub fn valid_id(id: &str, prefix: &str) -> bool {
    id.len() <= 64
        && id.starts_with(prefix)
        && id[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

/// Unix seconds.
pub fn unix(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_checked_before_they_name_files() {
        let id = super::new_id("file-");
        assert!(super::valid_id(&id, "file-"));
        assert!(!super::valid_id("file-../../etc", "file-"));
        assert!(!super::valid_id("batch_abc", "file-"));
    }
}
