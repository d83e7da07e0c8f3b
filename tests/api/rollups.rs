//! Hourly rollups (issue 15): kept by the ledger's INSERT, equal to a recount from the raw rows
//! after a mixed workload, and `/admin/usage` answered from them gives the raw answer for every
//! grouping and range (whole hours, partial hours, open ends).

use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use serde_json::json;
use teachd::ledger::queries::{self, EventFilter, GroupKey, TimeRange};
use teachd::ledger::{rollups, UsageEvent};
use uuid::Uuid;

use crate::app::{on_server, TestApp};

fn event(client: Uuid, ts: DateTime<Utc>, n: i64) -> UsageEvent {
    let (status, code, refusals) = match n % 6 {
        0 => (429, Some("rate_limit_exceeded"), 0),
        1 => (429, Some("rate_limit_exceeded"), 37), // an aggregated refusal row
        2 => (403, Some("tos_not_accepted"), 0),
        3 => (503, Some("overloaded"), 5),
        _ => (200, None, 0),
    };
    UsageEvent {
        request_id: format!("synthetic-{n}"),
        ts: teachd::ledger::chain::to_db_precision(ts),
        client_id: client,
        key_id: Uuid::now_v7(),
        method: "POST".into(),
        endpoint: ["/v1/logprobs", "/v1/chat/completions", "/v1/judgments"][(n % 3) as usize]
            .into(),
        model: (n % 4 != 0).then(|| ["m-a", "m-b", "m-c"][(n % 3) as usize].to_string()),
        status,
        error_code: code.map(str::to_string),
        prompt_tokens: n % 17,
        scored_tokens: n % 13,
        generated_tokens: n % 11,
        judgments: n % 2,
        top_k: None,
        latency_ms: (n % 7) as f64,
        request_sha256: [1; 32],
        response_sha256: [2; 32],
        tos_version: None,
        weights_sha256: None,
        refusals,
        response_bytes: 100 + n % 9,
    }
}

/// Synthetic rows over several hours and days (through the real writer, in batches) plus real
/// requests: admin calls, ToS refusals, rate-limit refusals past the row bound (aggregated).
async fn workload(app: &TestApp) -> Vec<Uuid> {
    let (a, key_a) = app.teacher("roll-a", json!({"rpm": 3})).await;
    let (b, _) = app.teacher("roll-b", json!({})).await;
    for _ in 0..12 {
        // ToS not published: 403 rows, then 429s past rpm, aggregated past the row bound.
        app.get("/v1/tos", Some(&key_a)).send().await.unwrap();
    }
    app.admin(reqwest::Method::GET, "/admin/clients")
        .send()
        .await
        .unwrap();
    let ledger = app.state.ledger.clone();
    let base = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap() - Duration::days(3);
    on_server(async move {
        let mut writes = Vec::new();
        for n in 0..400i64 {
            let client = if n % 2 == 0 { a } else { b };
            let ts = base + Duration::minutes(n * 13) + Duration::seconds(n % 60);
            let ledger = ledger.clone();
            writes.push(async move { ledger.record(event(client, ts, n), None).await });
        }
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        assert!(ledger.shutdown(std::time::Duration::from_secs(10)).await);
    })
    .await;
    vec![a, b]
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct RollupRow {
    t: DateTime<Utc>,
    client_id: Uuid,
    endpoint: String,
    model: Option<String>,
    status_class: i16,
    error_code: Option<String>,
    events: i64,
    requests: i64,
    prompt_tokens: i64,
    scored_tokens: i64,
    generated_tokens: i64,
    judgments: i64,
    response_bytes: i64,
}

type Recount = Vec<RollupRow>;

const ROLLUP_COLS: &str =
    "hour AS t, client_id, endpoint, model, status_class, error_code, events, \
    requests, prompt_tokens, scored_tokens, generated_tokens, judgments, response_bytes";

#[tokio::test]
async fn rollups_equal_a_recount_of_the_raw_rows() {
    let app = TestApp::spawn_with(None, |c| c.ledger.max_refusal_rows_per_minute = 2).await;
    workload(&app).await;
    let aggregated: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE refusals > 0 AND status = 429")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(aggregated > 0, "the workload has aggregated refusal rows");

    let rollups: Recount = sqlx::query_as(&format!(
        "SELECT {ROLLUP_COLS} FROM usage_rollups_hourly ORDER BY 1, 2, 3, 4, 5, 6"
    ))
    .fetch_all(&app.db)
    .await
    .unwrap();
    let recount: Recount = sqlx::query_as(&recount_sql("hour"))
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(rollups.len() > 50, "{} rollup rows", rollups.len());
    assert_eq!(rollups, recount);
    let daily: Recount = sqlx::query_as(&format!(
        "SELECT {} FROM usage_rollups_daily ORDER BY 1, 2, 3, 4, 5, 6",
        ROLLUP_COLS.replacen("hour", "day", 1)
    ))
    .fetch_all(&app.db)
    .await
    .unwrap();
    let by_day: Recount = sqlx::query_as(&recount_sql("day"))
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(daily.len() < rollups.len());
    assert_eq!(daily, by_day);

    // The app's role may read rollups but never write them.
    let mut su = crate::app::superuser(&app.db_name).await;
    sqlx::query("SET ROLE teachd_app")
        .execute(&mut su)
        .await
        .unwrap();
    let denied = sqlx::query("UPDATE usage_rollups_hourly SET requests = 0")
        .execute(&mut su)
        .await;
    assert!(denied.is_err(), "teachd_app must not update rollups");
    sqlx::query("RESET ROLE").execute(&mut su).await.unwrap();
}

#[tokio::test]
async fn usage_from_rollups_equals_the_raw_aggregate_for_every_grouping_and_range() {
    let app = TestApp::spawn_with(None, |c| c.ledger.max_refusal_rows_per_minute = 2).await;
    let clients = workload(&app).await;
    let now = Utc::now();
    let base = now.duration_trunc(TimeDelta::hours(1)).unwrap() - Duration::days(3);
    let ranges = [
        TimeRange::default(),
        TimeRange {
            from: Some(base + Duration::minutes(17)),
            to: Some(base + Duration::hours(40) + Duration::minutes(3)),
        },
        TimeRange {
            from: Some(base + Duration::hours(5)),
            to: Some(base + Duration::hours(29)),
        },
        // Several whole UTC days (from the daily rollups) with hours and minutes on each side.
        TimeRange {
            from: Some(base - Duration::days(1) + Duration::minutes(7)),
            to: Some(base + Duration::days(3) + Duration::minutes(5)),
        },
        TimeRange {
            from: Some(base + Duration::minutes(70)),
            to: Some(base + Duration::minutes(110)),
        },
        TimeRange {
            from: None,
            to: Some(base + Duration::hours(50) + Duration::seconds(1)),
        },
        TimeRange {
            from: Some(base + Duration::hours(20) + Duration::minutes(1)),
            to: None,
        },
    ];
    let groupings: &[&[GroupKey]] = &[
        &[],
        &[GroupKey::Client],
        &[GroupKey::Model],
        &[GroupKey::Endpoint],
        &[GroupKey::Day],
        &[GroupKey::Hour],
        &[GroupKey::Client, GroupKey::Day],
        &[GroupKey::Model, GroupKey::Endpoint, GroupKey::Hour],
    ];
    let mut compared = 0;
    for range in ranges {
        for filter in [
            EventFilter {
                range,
                ..Default::default()
            },
            EventFilter {
                range,
                client_id: Some(clients[0]),
                model: Some("m-b".into()),
                ..Default::default()
            },
            EventFilter {
                range,
                endpoint: Some("/v1/judgments".into()),
                ..Default::default()
            },
        ] {
            for keys in groupings {
                let raw = queries::usage(&app.db, &filter, keys).await.unwrap();
                let fast = rollups::usage(&app.db, &filter, keys).await.unwrap();
                assert_eq!(fast, raw, "{filter:?} {keys:?}");
                compared += raw.len();
            }
        }
    }
    assert!(compared > 500, "{compared} rows compared");

    // And through the API, whose JSON is the same shape as before.
    let r: serde_json::Value = app
        .admin(reqwest::Method::GET, "/admin/usage?group_by=client,day")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &r["data"][0];
    let mut keys: Vec<&str> = row
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "client_id",
            "day",
            "errors",
            "generated_tokens",
            "judgments",
            "prompt_tokens",
            "requests",
            "response_bytes",
            "scored_tokens"
        ]
    );
}

/// The rollup columns recounted from the raw rows, per `unit` ('hour' or 'day').
fn recount_sql(unit: &str) -> String {
    format!(
        "SELECT date_trunc('{unit}', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS t, client_id,
                endpoint, model, (status / 100)::int2 AS status_class, error_code,
                count(*)::int8 AS events, sum(greatest(refusals, 1))::int8 AS requests,
                sum(prompt_tokens)::int8 AS prompt_tokens, sum(scored_tokens)::int8 AS scored_tokens,
                sum(generated_tokens)::int8 AS generated_tokens, sum(judgments)::int8 AS judgments,
                sum(response_bytes)::int8 AS response_bytes
         FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6"
    )
}
