//! The transparency log's reads under `/v1/ledger` (teacher or admin scope): the latest signed
//! checkpoint, the verifier key, inclusion and consistency proofs, and a row's leaf (its
//! canonical bytes: a teacher key sees only its own rows).

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::{ClientCtx, Scope};
use crate::error::{ApiError, ErrorEnvelope, Result};
use crate::http::extract::{Json, Query};
use crate::ledger::queries::{self, EventFilter};
use crate::ledger::transparency::canonical;
use crate::ledger::tree::{self, PgStore};
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(checkpoint))
        .routes(routes!(verifier_key))
        .routes(routes!(inclusion))
        .routes(routes!(consistency))
        .routes(routes!(leaf))
}

fn text(body: String) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn b64(h: &[u8]) -> String {
    BASE64_STANDARD.encode(h)
}

/// The latest signed checkpoint (a C2SP tlog-checkpoint in a C2SP signed note, Ed25519). A new
/// one is signed first when the tree grew and the latest is older than
/// `tlog.checkpoint_interval_secs`.
#[utoipa::path(get, path = "/v1/ledger/checkpoint", tag = "teacher",
    responses((status = 200, description = "The signed checkpoint", content_type = "text/plain", body = String)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn checkpoint(State(state): State<AppState>) -> Result<Response> {
    let cp = state.ledger.tlog().checkpoint().await?;
    Ok(text(cp.note))
}

/// The verifier key of the ledger's signatures: `<name>+<hex key id>+<base64(0x01 || key)>`.
#[utoipa::path(get, path = "/v1/ledger/key", tag = "teacher",
    responses((status = 200, description = "The C2SP verifier key", content_type = "text/plain", body = String)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn verifier_key(State(state): State<AppState>) -> Response {
    text(format!("{}\n", state.ledger.tlog().key.verifier_key()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InclusionParams {
    /// 0-based leaf index (= ledger row id - 1).
    pub leaf_index: u64,
    /// Size of the tree the proof is against (e.g. a checkpoint's).
    pub tree_size: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub tree_size: u64,
    /// RFC 9162 audit path, base64 hashes, leaf to root.
    pub audit_path: Vec<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsistencyParams {
    pub first: u64,
    pub second: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConsistencyProof {
    pub first: u64,
    pub second: u64,
    /// RFC 9162 consistency proof, base64 hashes.
    pub proof: Vec<String>,
}

/// 400 unless `size` is at most the committed tree's size.
async fn check_size(state: &AppState, param: &str, size: u64) -> Result<()> {
    let have = state.ledger.tlog().size().await?;
    if size > have {
        return Err(ApiError::bad_param(
            param,
            format!("the tree has {have} leaves; {param} {size} is beyond it"),
        ));
    }
    Ok(())
}

/// Inclusion proof of a leaf in the tree of `tree_size` leaves.
#[utoipa::path(get, path = "/v1/ledger/proof/inclusion", tag = "teacher", params(InclusionParams),
    responses((status = 200, body = InclusionProof), (status = 400, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn inclusion(
    State(state): State<AppState>,
    Query(p): Query<InclusionParams>,
) -> Result<Json<InclusionProof>> {
    check_size(&state, "tree_size", p.tree_size).await?;
    if p.leaf_index >= p.tree_size {
        return Err(ApiError::bad_param(
            "leaf_index",
            format!(
                "leaf_index {} is not in a tree of size {}",
                p.leaf_index, p.tree_size
            ),
        ));
    }
    let path = tree::inclusion(&PgStore(&state.db), p.leaf_index, p.tree_size).await?;
    Ok(Json(InclusionProof {
        leaf_index: p.leaf_index,
        tree_size: p.tree_size,
        audit_path: path.iter().map(|h| b64(h)).collect(),
    }))
}

/// Consistency proof between the trees of `first` and `second` leaves.
#[utoipa::path(get, path = "/v1/ledger/proof/consistency", tag = "teacher", params(ConsistencyParams),
    responses((status = 200, body = ConsistencyProof), (status = 400, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn consistency(
    State(state): State<AppState>,
    Query(p): Query<ConsistencyParams>,
) -> Result<Json<ConsistencyProof>> {
    check_size(&state, "second", p.second).await?;
    if p.first == 0 || p.first > p.second {
        return Err(ApiError::bad_param(
            "first",
            "a consistency proof needs 1 <= first <= second",
        ));
    }
    let proof = tree::consistency(&PgStore(&state.db), p.first, p.second).await?;
    Ok(Json(ConsistencyProof {
        first: p.first,
        second: p.second,
        proof: proof.iter().map(|h| b64(h)).collect(),
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Leaf {
    pub leaf_index: u64,
    /// base64; the leaf hash is SHA-256(0x00 || row_hash).
    pub row_hash: String,
    /// base64 of the row's canonical encoding; `row_hash = SHA-256(prev_hash || canonical)`.
    pub canonical: String,
    /// base64 `row_hash` of the previous row (32 zero bytes for the first).
    pub prev_hash: String,
}

/// A row's leaf: its canonical bytes and hash. Teacher keys see their own rows only (another
/// client's row is a 404, like a row that does not exist); admin keys see every row.
#[utoipa::path(get, path = "/v1/ledger/leaf/{index}", tag = "teacher",
    params(("index" = u64, Path, description = "0-based leaf index (= row id - 1)")),
    responses((status = 200, body = Leaf), (status = 400, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
async fn leaf(
    State(state): State<AppState>,
    ctx: ClientCtx,
    Path(index): Path<String>,
) -> Result<Json<Leaf>> {
    let index: i64 = index
        .parse()
        .ok()
        .filter(|i| *i >= 0 && *i < i64::MAX)
        .ok_or_else(|| ApiError::bad_param("index", "index must be a leaf index (0, 1, ...)"))?;
    let filter = EventFilter {
        client_id: (!ctx.has_scope(Scope::Admin)).then_some(ctx.client_id),
        ..Default::default()
    };
    let rows = queries::events_after(&state.db, &filter, index, 1).await?;
    let row = rows
        .into_iter()
        .next()
        .filter(|r| r.id == index + 1)
        .ok_or_else(|| ApiError::not_found(format!("no leaf {index} of yours in the ledger")))?;
    Ok(Json(Leaf {
        leaf_index: index as u64,
        row_hash: b64(&row.row_hash),
        canonical: b64(&canonical(&row)),
        prev_hash: b64(&row.prev_hash),
    }))
}
