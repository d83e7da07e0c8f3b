//! The console's overview and audit pages (GET); ranges come from the rollups
//! ([`super::data`]). The clients pages are in [`super::clients`].

use askama::Template;
use axum::extract::State;
use axum::response::Html;
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use serde::Deserialize;

use super::charts::{self, Line};
use super::data::{self, Share, Span, Verification, Window};
use super::lists::{self, TosRow};
use super::session::Session;
use super::{render, ConsoleError, Nav};
use crate::http::extract::Query;
use crate::ledger::queries::{parse_time, VerifyReport};
use crate::AppState;

pub type Page = Result<Html<String>, ConsoleError>;

/// A time as the pages show it.
pub fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` (a `datetime-local` input, read as UTC) or RFC 3339.
fn parse_input(raw: &str) -> Option<DateTime<Utc>> {
    parse_time(raw).or_else(|| {
        NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M")
            .ok()
            .map(|t| t.and_utc())
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct RangeParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

fn window(p: &RangeParams, now: DateTime<Utc>) -> Result<Window, ConsoleError> {
    let span = match p.range.as_deref().unwrap_or("day") {
        "hour" => Span::Hour,
        "day" => Span::Day,
        "30d" => Span::Month,
        "custom" => Span::Custom,
        _ => return Err(crate::error::ApiError::bad_param("range", "unknown range").into()),
    };
    if span != Span::Custom {
        return Ok(Window::last(span, now));
    }
    let bad = |p: &str| crate::error::ApiError::bad_param(p, format!("`{p}` must be a date"));
    let from = p
        .from
        .as_deref()
        .and_then(parse_input)
        .ok_or_else(|| bad("from"))?;
    let to = match p.to.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => parse_input(t).ok_or_else(|| bad("to"))?,
        None => now,
    };
    if from >= to || to - from > TimeDelta::days(400) {
        return Err(bad("to").into());
    }
    Ok(Window::new(span, from, to))
}

pub struct Totals {
    pub requests: i64,
    pub scored: i64,
    pub generated: i64,
    pub judgments: i64,
    pub bytes: i64,
    pub refused: i64,
}

impl Totals {
    /// Bytes served, e.g. `1.50 MiB`.
    pub fn bytes_human(&self) -> String {
        indicatif::HumanBytes(self.bytes.max(0) as u64).to_string()
    }
}

pub struct Engine {
    pub id: String,
    pub queue_depth: usize,
    pub licence: String,
    pub policy: String,
}

#[derive(Template)]
#[template(path = "overview.html", config = "src/console/askama.toml")]
struct Overview {
    nav: Nav,
    range: &'static str,
    from: String,
    to: String,
    totals: Totals,
    charts: Vec<String>,
    top: Vec<Share>,
    models: Vec<(Share, String)>,
    model_chart: String,
    engines: Vec<Engine>,
    latency: Option<[f64; 3]>,
    ledger_healthy: bool,
    head: Option<(i64, String)>,
    last_verify: Option<Verification>,
    /// The latest signed checkpoint: tree size, base64 root, when.
    checkpoint: Option<(i64, String, String)>,
    verifier_key: String,
    batches: Vec<data::BatchLine>,
}

fn sum(v: &[f64]) -> i64 {
    v.iter().sum::<f64>() as i64
}

/// The charts of a range's series: requests, tokens, judgments, bytes served, refusals by
/// reason.
fn series_charts(w: &Window, s: &data::Series) -> Vec<String> {
    let labels: Vec<String> = s.buckets.iter().map(|t| w.label(*t)).collect();
    let one = |name: &str, v: &Vec<f64>| Line {
        name: name.into(),
        values: v.clone(),
    };
    let mut out = vec![
        charts::lines("Requests", &labels, &[one("requests", &s.requests)]),
        charts::lines(
            "Positions scored and tokens generated",
            &labels,
            &[
                one("positions scored", &s.scored),
                one("tokens generated", &s.generated),
            ],
        ),
        charts::lines("Judgments", &labels, &[one("judgments", &s.judgments)]),
        charts::lines("Bytes served", &labels, &[one("response bytes", &s.bytes)]),
    ];
    let reasons: Vec<Line> = s.refusals.iter().map(|(k, v)| one(k, v)).collect();
    out.push(charts::lines(
        "Errors and refusals by reason",
        &labels,
        &reasons,
    ));
    out
}

pub async fn overview(
    State(state): State<AppState>,
    session: Session,
    Query(p): Query<RangeParams>,
) -> Page {
    let w = window(&p, Utc::now())?;
    // The page's queries are independent: run them at once, each on its own connection.
    let db = &state.db;
    let (s, mix, top, latency, head, last_verify, checkpoint, batches) = tokio::try_join!(
        data::series(db, &w, None),
        data::model_mix(db, &w),
        data::top_clients(db, &w, 10),
        data::latency(db, &w),
        data::ledger_head(db),
        data::verifications(db, 1),
        data::latest_checkpoint(db),
        data::recent_batches(db, 20),
    )?;
    let refused = s.refusals.values().map(|v| sum(v)).sum();
    let totals = Totals {
        requests: sum(&s.requests),
        scored: sum(&s.scored),
        generated: sum(&s.generated),
        judgments: sum(&s.judgments),
        bytes: sum(&s.bytes),
        refused,
    };
    let licence_of = |model: &str| {
        state
            .config
            .models
            .iter()
            .find(|m| m.id == model)
            .map(|m| format!("{} ({:?})", m.licence.id, m.licence.distillation))
            .unwrap_or_else(|| "not served now".into())
    };
    let model_chart = charts::bars(
        "Requests per teacher",
        &mix.iter()
            .map(|m| (m.key.clone().unwrap_or_default(), m.requests as f64))
            .collect::<Vec<_>>(),
    );
    let models = mix
        .into_iter()
        .map(|m| {
            let l = licence_of(m.key.as_deref().unwrap_or_default());
            (m, l)
        })
        .collect();
    let engines = state
        .models
        .iter()
        .map(|t| Engine {
            id: t.info.id.clone(),
            queue_depth: t.queue_depth(),
            licence: t.info.licence.id.clone(),
            policy: format!("{:?}", t.info.licence.distillation),
        })
        .collect();
    let page = Overview {
        nav: Nav::new(&session, "overview"),
        range: match w.span {
            Span::Hour => "hour",
            Span::Day => "day",
            Span::Month => "30d",
            Span::Custom => "custom",
        },
        from: when(&w.from),
        to: when(&w.to),
        charts: series_charts(&w, &s),
        totals,
        top,
        models,
        model_chart,
        engines,
        latency,
        ledger_healthy: state.ledger.is_healthy(),
        head: head.map(|(id, ts)| (id, when(&ts))),
        last_verify: last_verify.into_iter().next(),
        checkpoint: checkpoint.map(|(size, root, at)| {
            (
                size,
                base64::Engine::encode(&base64::prelude::BASE64_STANDARD, root),
                when(&at),
            )
        }),
        verifier_key: state.ledger.tlog().key.verifier_key().to_string(),
        batches,
    };
    render(page)
}

#[derive(Template)]
#[template(path = "audit.html", config = "src/console/askama.toml")]
pub struct AuditPage {
    pub nav: Nav,
    pub result: Option<(VerifyReport, String)>,
    pub verifications: Vec<Verification>,
    pub tos: Vec<TosRow>,
}

pub async fn audit_page(
    state: &AppState,
    session: &Session,
    result: Option<(VerifyReport, String)>,
) -> Page {
    render(AuditPage {
        nav: Nav::new(session, "audit"),
        result,
        verifications: data::verifications(&state.db, 10).await?,
        tos: lists::tos_versions(&state.db).await?,
    })
}

pub async fn audit(State(state): State<AppState>, session: Session) -> Page {
    audit_page(&state, &session, None).await
}
