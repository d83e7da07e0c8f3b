//! `GET /admin/audit/export` (streamed JSONL/CSV) and `GET /admin/audit/verify`.

use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::usage::EventView;
use super::{parse_range, Query};
use crate::auth::ClientCtx;
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::Json;
use crate::http::ledger_layer::StreamedBody;
use crate::ledger::queries::{self, EventFilter, VerifyReport};
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(export))
        .routes(routes!(verify, verify_checkpoints))
}

/// Rows per database round trip while exporting; with the channel bound below this caps the
/// memory one export holds, however large the ledger.
const EXPORT_CHUNK: i64 = 1_000;
const EXPORT_CHANNEL: usize = 4;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Jsonl,
    Csv,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportParams {
    pub from: Option<String>,
    pub to: Option<String>,
    /// `jsonl` (default) or `csv`.
    pub format: Option<ExportFormat>,
}

pub const CSV_HEADER: &str = "id,request_id,ts,client_id,key_id,method,endpoint,model,status,error_code,\
prompt_tokens,scored_tokens,generated_tokens,judgments,top_k,latency_ms,request_sha256,response_sha256,\
tos_version,weights_sha256,refusals,response_bytes,prev_hash,row_hash\n";

/// One CSV cell. A cell that a spreadsheet would read as a formula (leading `=`, `+`, `-`, `@`,
/// tab or carriage return: client-chosen request ids and error codes end up here) is prefixed
/// with `'`, as OWASP recommends, so opening an export never runs anything.
fn csv_field(out: &mut String, v: &str) {
    let neutral;
    let v = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutral = format!("'{v}");
        neutral.as_str()
    } else {
        v
    };
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

fn csv_line(out: &mut String, e: &EventView) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let fields = [
        e.id.to_string(),
        e.request_id.clone(),
        e.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        e.client_id.to_string(),
        e.key_id.to_string(),
        e.method.clone(),
        e.endpoint.clone(),
        opt(&e.model),
        e.status.to_string(),
        opt(&e.error_code),
        e.prompt_tokens.to_string(),
        e.scored_tokens.to_string(),
        e.generated_tokens.to_string(),
        e.judgments.to_string(),
        e.top_k.map(|k| k.to_string()).unwrap_or_default(),
        e.latency_ms.to_string(),
        e.request_sha256.clone(),
        e.response_sha256.clone(),
        opt(&e.tos_version),
        opt(&e.weights_sha256),
        e.refusals.to_string(),
        e.response_bytes.to_string(),
        e.prev_hash.clone(),
        e.row_hash.clone(),
    ];
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, f);
    }
    out.push('\n');
}

/// Stream the ledger rows in `[from, to)` in id order, as JSON lines or CSV (with a header).
/// Memory stays constant: rows are read in keyset chunks and at most a few chunks are buffered
/// ahead of a slow reader. If the database fails mid-way the body is aborted (truncated
/// transfer), never silently shortened.
#[utoipa::path(get, path = "/admin/audit/export", tag = "admin", params(ExportParams),
    responses(
        (status = 200, description = "JSON lines (`application/x-ndjson`) or CSV (`text/csv`)", content(
            (String = "application/x-ndjson"),
            (String = "text/csv"))),
        (status = 400, body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub(crate) async fn export(
    State(state): State<AppState>,
    _ctx: ClientCtx,
    Query(p): Query<ExportParams>,
) -> Result<Response> {
    let format = p.format.unwrap_or_default();
    let filter = EventFilter {
        range: parse_range(p.from.as_deref(), p.to.as_deref())?,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(EXPORT_CHANNEL);
    let db = state.db.clone();
    tokio::spawn(async move {
        if format == ExportFormat::Csv
            && tx
                .send(Ok(Bytes::from_static(CSV_HEADER.as_bytes())))
                .await
                .is_err()
        {
            return;
        }
        let mut after = 0;
        loop {
            let rows = match queries::events_after(&db, &filter, after, EXPORT_CHUNK).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "export failed mid-stream");
                    let _ = tx.send(Err(std::io::Error::other("export failed"))).await;
                    return;
                }
            };
            let Some(last) = rows.last() else { return };
            after = last.id;
            let mut out = String::with_capacity(rows.len() * 400);
            for row in rows {
                let view = EventView::from(row);
                match format {
                    ExportFormat::Jsonl => {
                        let _ =
                            writeln!(out, "{}", serde_json::to_string(&view).unwrap_or_default());
                    }
                    ExportFormat::Csv => csv_line(&mut out, &view),
                }
            }
            if tx.send(Ok(Bytes::from(out))).await.is_err() {
                return; // the client went away
            }
        }
    });
    let content_type = match format {
        ExportFormat::Jsonl => "application/x-ndjson",
        ExportFormat::Csv => "text/csv; charset=utf-8",
    };
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.extensions_mut().insert(StreamedBody);
    Ok(response)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VerifyParams {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Recompute the hash chain and name the first row that does not verify.
#[utoipa::path(get, path = "/admin/audit/verify", tag = "admin", params(VerifyParams),
    responses(
        (status = 200, body = VerifyReport),
        (status = 400, body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub(crate) async fn verify(
    State(state): State<AppState>,
    _ctx: ClientCtx,
    Query(p): Query<VerifyParams>,
) -> Result<Json<VerifyReport>> {
    let range = parse_range(p.from.as_deref(), p.to.as_deref())?;
    let report = queries::verify(&state.db, range)
        .await
        .map_err(ApiError::from)?;
    queries::record_verification(&state.db, range, &report)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(report))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Also recompute the chain over this range alone (the tree and the checkpoints always
    /// cover the whole ledger).
    pub from: Option<String>,
    pub to: Option<String>,
    /// Signed checkpoints saved earlier (their text, as `GET /v1/ledger/checkpoint` gave it).
    #[serde(default)]
    pub checkpoints: Vec<String>,
}

/// Most checkpoints one request may check.
const MAX_CHECKPOINTS: usize = 1_000;

/// Recompute the chain and the Merkle tree from every row and check each given checkpoint
/// (signature, origin, size, root): tail truncation, rows edited with a recomputed chain and a
/// replaced history are each named in `failures`.
#[utoipa::path(post, path = "/admin/audit/verify", tag = "admin", request_body = VerifyRequest,
    responses(
        (status = 200, body = crate::ledger::transparency::AuditReport),
        (status = 400, body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn verify_checkpoints(
    State(state): State<AppState>,
    _ctx: ClientCtx,
    Json(body): Json<VerifyRequest>,
) -> Result<Json<crate::ledger::transparency::AuditReport>> {
    if body.checkpoints.len() > MAX_CHECKPOINTS {
        return Err(ApiError::bad_param(
            "checkpoints",
            format!("at most {MAX_CHECKPOINTS} checkpoints per request"),
        ));
    }
    let range = parse_range(body.from.as_deref(), body.to.as_deref())?;
    let ranged = (body.from.is_some() || body.to.is_some()).then_some(range);
    let key = &state.ledger.tlog().key;
    let report = crate::ledger::transparency::audit_with_range(
        &state.db,
        key.verifier_key(),
        key.origin(),
        &body.checkpoints,
        ranged,
    )
    .await
    .map_err(ApiError::from)?;
    Ok(Json(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_with_separators_are_quoted() {
        let mut s = String::new();
        csv_field(&mut s, "plain");
        s.push('|');
        csv_field(&mut s, "a,b \"c\"");
        assert_eq!(s, "plain|\"a,b \"\"c\"\"\"");
    }

    #[test]
    fn formula_cells_are_neutralised() {
        for (raw, want) in [
            ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
            ("+1", "'+1"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("ok=1", "ok=1"),
        ] {
            let mut s = String::new();
            csv_field(&mut s, raw);
            assert_eq!(s, want, "{raw}");
        }
    }
}
