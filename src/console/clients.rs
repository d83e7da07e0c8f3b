//! The clients list and a client's page (GET), from the admin API's own handlers, plus the
//! client's usage charts (rollups), ToS acceptances and keyset-paged ledger events.

use askama::Template;
use axum::extract::{Path, State};
use chrono::Utc;
use serde::Deserialize;

use super::charts::{self, Line};
use super::data::{self, Span, Window};
use super::lists::{self, AcceptanceRow, EventRow};
use super::pages::Page;
use super::session::Session;
use super::{render, Nav};
use crate::http::admin::clients::{self, ClientView};
use crate::http::admin::KeyView;
use crate::http::extract::Query;
use crate::AppState;

pub struct ClientLine {
    pub view: ClientView,
    pub spent: i64,
    pub percent: u32,
}

#[derive(Template)]
#[template(path = "clients.html", config = "src/console/askama.toml")]
struct Clients {
    nav: Nav,
    clients: Vec<ClientLine>,
}

pub async fn clients(State(state): State<AppState>, session: Session) -> Page {
    let list = clients::list_clients(State(state.clone())).await?.0.data;
    let spent = lists::spent_today(&state.db).await?;
    let clients = list
        .into_iter()
        .map(|view| {
            let spent = spent.get(&view.id).copied().unwrap_or(0);
            let limit = view.limits.daily_tokens.max(1);
            let percent = ((spent as f64 / limit as f64) * 100.0).clamp(0.0, 100.0) as u32;
            ClientLine {
                view,
                spent,
                percent,
            }
        })
        .collect();
    render(Clients {
        nav: Nav::new(&session, "clients"),
        clients,
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct ClientParams {
    pub before: Option<i64>,
}

#[derive(Template)]
#[template(path = "client.html", config = "src/console/askama.toml")]
pub struct ClientPage {
    pub nav: Nav,
    pub client: ClientView,
    pub keys: Vec<(KeyView, String)>,
    pub charts: Vec<String>,
    pub acceptances: Vec<AcceptanceRow>,
    pub events: Vec<EventRow>,
    pub next_before: Option<i64>,
    pub paged: bool,
    /// A key just issued: shown on this one response only.
    pub new_key: Option<String>,
}

/// The client page; `new_key` is the key issued by the request that renders it, if any.
pub async fn client_page(
    state: &AppState,
    session: &Session,
    id: String,
    before: Option<i64>,
    new_key: Option<String>,
) -> Page {
    let mut client = clients::get_client(State(state.clone()), Path(id)).await?.0;
    let keys = client
        .keys
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|k| {
            let scopes = k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>();
            let scopes = scopes.join(", ");
            (k, scopes)
        })
        .collect();
    let w = Window::last(Span::Month, Utc::now());
    let s = data::series(&state.db, &w, Some(client.id)).await?;
    let labels: Vec<String> = s.buckets.iter().map(|t| w.label(*t)).collect();
    let charts = vec![
        charts::lines(
            "Requests per day (30 days)",
            &labels,
            &[Line {
                name: "requests".into(),
                values: s.requests.clone(),
            }],
        ),
        charts::lines(
            "Tokens per day (30 days)",
            &labels,
            &[
                Line {
                    name: "positions scored".into(),
                    values: s.scored.clone(),
                },
                Line {
                    name: "tokens generated".into(),
                    values: s.generated.clone(),
                },
            ],
        ),
    ];
    let (events, next_before) = lists::events(&state.db, client.id, before).await?;
    render(ClientPage {
        nav: Nav::new(session, "clients"),
        acceptances: lists::acceptances(&state.db, client.id).await?,
        client,
        keys,
        charts,
        events,
        next_before,
        paged: before.is_some(),
        new_key,
    })
}

pub async fn client(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(p): Query<ClientParams>,
) -> Page {
    client_page(&state, &session, id, p.before, None).await
}
