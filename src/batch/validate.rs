//! Every line of a batch checked before any engine time, with the code the interactive
//! endpoints use: the model lookup, ToS and licence ([`crate::http::access::teacher_for`]) and
//! the endpoint's own checks ([`crate::http::logprobs::plan`]: top_k, temperature, input,
//! length). The sum of the lines' costs is what the batch reserves against the daily quota.
//!
//! Two kinds of trouble: a line whose *request* is bad (unknown model, top_k over the cap, too
//! long, ToS not accepted...) goes to the error file with its line number and the rest of the
//! batch runs; a *file* that is not a batch file (a line that is not JSON, without `custom_id`,
//! for another endpoint, a repeated `custom_id`) fails the whole batch with `errors.data`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::input::{FileError, InputLine, Item};
use crate::auth::ClientCtx;
use crate::engine::Teacher;
use crate::error::ApiError;
use crate::http::{access, chat, completions, logprobs};
use crate::AppState;

/// One line's work, ready for the engine.
pub enum Job {
    Logprobs {
        teacher: Arc<Teacher>,
        plan: logprobs::Plan,
    },
    Completions {
        teacher: Arc<Teacher>,
        checked: completions::Checked,
    },
    Chat {
        teacher: Arc<Teacher>,
        checked: chat::Checked,
    },
    /// One judgment (a line is one judgment; `items` belong in separate lines).
    Judgment {
        teacher: Arc<Teacher>,
        planned: crate::http::judgments::Planned,
    },
}

impl Job {
    /// What the line costs against the daily quota (exact for teacher forcing).
    pub fn cost(&self) -> u64 {
        match self {
            Job::Logprobs { plan, .. } => plan.cost(),
            Job::Completions { checked, .. } => checked.cost,
            Job::Chat { checked, .. } => checked.cost,
            Job::Judgment { planned, .. } => planned.cost() as u64,
        }
    }

    pub fn teacher(&self) -> &Arc<Teacher> {
        match self {
            Job::Logprobs { teacher, .. }
            | Job::Completions { teacher, .. }
            | Job::Chat { teacher, .. }
            | Job::Judgment { teacher, .. } => teacher,
        }
    }

    /// The top-k the line's row records.
    pub fn top_k(&self) -> Option<u32> {
        match self {
            Job::Logprobs { plan, .. } => Some(plan.top_k as u32),
            Job::Completions { checked, .. } => checked.top_k,
            Job::Chat { checked, .. } => checked.top_k,
            Job::Judgment { .. } => None,
        }
    }
}

/// How teachers are looked up: with the ToS and licence checks of `ctx` (validation, once per
/// model), or without (the runner: the batch was checked when it was created).
pub struct Lookup<'a> {
    ctx: Option<&'a ClientCtx>,
    checked: HashMap<String, Result<Arc<Teacher>, Refusal>>,
}

/// A refusal remembered for the other lines of the same model.
#[derive(Clone)]
struct Refusal {
    code: &'static str,
    message: String,
}

impl<'a> Lookup<'a> {
    pub fn checked_for(ctx: &'a ClientCtx) -> Self {
        Lookup {
            ctx: Some(ctx),
            checked: HashMap::new(),
        }
    }

    pub fn unchecked() -> Lookup<'static> {
        Lookup {
            ctx: None,
            checked: HashMap::new(),
        }
    }

    async fn teacher(&mut self, state: &AppState, model: &str) -> Result<Arc<Teacher>, ApiError> {
        let Some(ctx) = self.ctx else {
            return access::teacher(state, model);
        };
        if let Some(known) = self.checked.get(model) {
            return known
                .clone()
                .map_err(|r| ApiError::forbidden(r.code, r.message));
        }
        match access::teacher_for(state, ctx, model).await {
            Ok(t) => {
                self.checked.insert(model.into(), Ok(t.clone()));
                Ok(t)
            }
            Err(ApiError::Forbidden { message, code }) => {
                let refusal = Refusal { code, message };
                self.checked.insert(model.into(), Err(refusal.clone()));
                Err(ApiError::forbidden(refusal.code, refusal.message))
            }
            // Not found, or an outage: not remembered.
            Err(other) => Err(other),
        }
    }
}

/// The line's `body` as the endpoint's request type; 400 `invalid_body` when it is not one.
fn body<T: serde::de::DeserializeOwned>(line: &InputLine) -> Result<T, ApiError> {
    crate::http::extract::object(line.body.clone()).map_err(|e| ApiError::BadRequest {
        message: format!("invalid `body`: {e}"),
        param: Some("body".into()),
        code: Some("invalid_body"),
    })
}

/// The line's body made into engine work for `endpoint`.
pub async fn prepare(
    state: &AppState,
    lookup: &mut Lookup<'_>,
    endpoint: &str,
    line: &InputLine,
) -> Result<Job, ApiError> {
    match endpoint {
        "/v1/logprobs" => {
            let req: logprobs::LogprobsRequest = body(line)?;
            let teacher = lookup.teacher(state, &req.model).await?;
            let plan = logprobs::plan(&teacher, req).await?;
            Ok(Job::Logprobs { teacher, plan })
        }
        "/v1/completions" => {
            let req: completions::CompletionRequest = body(line)?;
            if req.stream == Some(true) {
                return Err(ApiError::bad_param("stream", "batch lines cannot stream"));
            }
            let teacher = lookup.teacher(state, &req.model).await?;
            let checked = completions::plan(&teacher, req).await?;
            Ok(Job::Completions { teacher, checked })
        }
        "/v1/chat/completions" => {
            let req: chat::ChatRequest = body(line)?;
            if req.stream == Some(true) {
                return Err(ApiError::bad_param("stream", "batch lines cannot stream"));
            }
            let teacher = lookup.teacher(state, &req.model).await?;
            let checked = chat::plan(&teacher, req).await?;
            Ok(Job::Chat { teacher, checked })
        }
        "/v1/judgments" => {
            let req: crate::http::judgments::JudgmentRequest = body(line)?;
            if req.items.is_some() {
                return Err(ApiError::bad_param(
                    "items",
                    "a batch line is one judgment: put each item on a line of its own",
                ));
            }
            let teacher = lookup.teacher(state, &req.model).await?;
            let planned = crate::http::judgments::plan_one(&teacher, &req.spec).await?;
            Ok(Job::Judgment { teacher, planned })
        }
        other => Err(ApiError::bad_param(
            "endpoint",
            format!("batches cannot target `{other}`"),
        )),
    }
}

/// A request-level refusal of one line: it goes to the error file.
pub struct LineError {
    pub line: InputLine,
    pub error: ApiError,
}

/// What validation found.
#[derive(Default)]
pub struct Validated {
    /// Requests in the file.
    pub total: usize,
    pub total_tokens: u64,
    pub line_errors: Vec<LineError>,
    /// Non-empty: the file is malformed and the batch fails (at most [`MAX_FILE_ERRORS`]).
    pub file_errors: Vec<FileError>,
    /// The (model, top_k, temperature) of every valid line, while they all agree.
    pub uniform: Option<(String, usize, f64)>,
    pub mixed: bool,
}

/// `errors.data` holds at most this many entries.
pub const MAX_FILE_ERRORS: usize = 100;

/// Reads and checks every line of `items`.
pub async fn validate(
    state: &AppState,
    ctx: &ClientCtx,
    endpoint: &str,
    mut items: tokio::sync::mpsc::Receiver<Item>,
) -> Result<Validated, ApiError> {
    let mut out = Validated::default();
    let mut lookup = Lookup::checked_for(ctx);
    let mut seen = HashSet::new();
    let file_error = |out: &mut Validated, e: FileError| {
        if out.file_errors.len() < MAX_FILE_ERRORS {
            out.file_errors.push(e);
        }
    };
    while let Some(item) = items.recv().await {
        let line = match item {
            Item::Malformed(e) => {
                file_error(&mut out, e);
                continue;
            }
            Item::Line(line) => line,
        };
        out.total += 1;
        if line.url != endpoint {
            let message = format!(
                "line {}: `url` is `{}`, but the batch's endpoint is `{endpoint}`",
                line.line, line.url
            );
            file_error(
                &mut out,
                FileError {
                    code: "mismatched_url",
                    message,
                    line: Some(line.line),
                },
            );
            continue;
        }
        if !seen.insert(line.custom_id.clone()) {
            let message = format!(
                "line {}: `custom_id` `{}` is repeated",
                line.line, line.custom_id
            );
            file_error(
                &mut out,
                FileError {
                    code: "duplicate_custom_id",
                    message,
                    line: Some(line.line),
                },
            );
            continue;
        }
        match prepare(state, &mut lookup, endpoint, &line).await {
            Ok(job) => {
                out.total_tokens += job.cost();
                let this = match &job {
                    Job::Logprobs { teacher, plan } => {
                        (teacher.info.id.clone(), plan.top_k, plan.temperature)
                    }
                    // Parquet is for teacher forcing only: never uniform.
                    Job::Completions { .. } | Job::Chat { .. } | Job::Judgment { .. } => {
                        (String::new(), usize::MAX, f64::NAN)
                    }
                };
                match &out.uniform {
                    None if !out.mixed => out.uniform = Some(this),
                    Some(u) if *u != this => {
                        out.uniform = None;
                        out.mixed = true;
                    }
                    _ => {}
                }
            }
            // An outage is no fault of the line: the whole request fails, retryable.
            Err(e @ ApiError::ServiceUnavailable(_)) => return Err(e),
            Err(error) => out.line_errors.push(LineError { line, error }),
        }
    }
    if out.total == 0 && out.file_errors.is_empty() {
        out.file_errors.push(FileError {
            code: "empty_file",
            message: "the input file has no requests".into(),
            line: None,
        });
    }
    Ok(out)
}
