use std::collections::{BTreeMap, HashSet};

use uuid::Uuid;

use crate::app::{TestApp, MODEL, MODEL_ATTRIBUTION, MODEL_NON_COMMERCIAL, MODEL_PROHIBITED};

/// A mixed workload on the real model: 3 clients, several endpoints and models, successes and
/// refusals (ToS not accepted, licences).
async fn workload(app: &TestApp) -> Vec<Uuid> {
    app.publish_tos("v1").await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let (c, key) = app
            .teacher(&format!("client-{i}"), serde_json::json!({}))
            .await;
        if i != 2 {
            app.accept_tos(&key, "v1", i == 1).await;
        }
        for n in 0..(20 + 7 * i as u64) {
            let model = [
                MODEL,
                MODEL_ATTRIBUTION,
                MODEL_NON_COMMERCIAL,
                MODEL_PROHIBITED,
            ][(n % 4) as usize];
            let ids: Vec<u32> = (0..(n % 5 + 2) as u32)
                .map(|k| 100 + k * 7 + n as u32)
                .collect();
            let r = app
                .post(
                    "/v1/logprobs",
                    &key,
                    serde_json::json!({"model": model, "token_ids": ids, "top_k": 2}),
                )
                .send()
                .await
                .unwrap();
            assert!(r.status() == 200 || r.status() == 403, "{}", r.status());
            if n % 5 == 0 {
                app.get("/v1/tos", Some(&key)).send().await.unwrap();
            }
        }
        clients.push(c);
    }
    clients
}

async fn all_events(app: &TestApp, query: &str, limit: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("/admin/usage/events?limit={limit}{query}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: serde_json::Value = app
            .admin(reqwest::Method::GET, &url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= limit);
        out.extend(data.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn pagination_returns_every_event_exactly_once() {
    let app = TestApp::with_model(|_| {}).await;
    let clients = workload(&app).await;
    let total_before = app.row_count().await;
    let events = all_events(&app, "", 7).await;
    // Pages requested while paginating are appended to the ledger too; they come after the
    // rows that existed when pagination started, so those all appear exactly once.
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    assert!(ids.len() as i64 >= total_before);
    assert_eq!(
        ids[..total_before as usize],
        (1..=total_before).collect::<Vec<_>>()[..]
    );

    // Per-client pages hold exactly that client's rows.
    let mine = all_events(&app, &format!("&client_id={}", clients[1]), 5).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE client_id = $1")
        .bind(clients[1])
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(mine.len() as i64, n);
    assert!(mine
        .iter()
        .all(|e| e["client_id"] == clients[1].to_string()));

    // Bad parameters are 400s.
    for q in [
        "limit=0",
        "limit=5000",
        "cursor=abc",
        "from=yesterday",
        "bogus=1",
    ] {
        let r = app
            .admin(reqwest::Method::GET, &format!("/admin/usage/events?{q}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
}

#[tokio::test]
async fn usage_totals_equal_the_sum_of_the_events() {
    let app = TestApp::with_model(|_| {}).await;
    workload(&app).await;
    // Freeze the range before the audit requests add their own rows: just after the last row.
    let last: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(ts) FROM usage_events")
            .fetch_one(&app.db)
            .await
            .unwrap();
    let to = (last + chrono::Duration::microseconds(1)).to_rfc3339();
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let to_q = urlencode(&to);
    let events = all_events(&app, &format!("&to={to_q}"), 100).await;
    assert!(events.len() > 100);

    let key_of = |e: &serde_json::Value, key: &str| -> String {
        match key {
            "client" => e["client_id"].to_string(),
            "model" => e["model"].to_string(),
            "endpoint" => e["endpoint"].to_string(),
            "day" => e["ts"].as_str().unwrap()[..10].to_string(),
            "hour" => e["ts"].as_str().unwrap()[..13].to_string(),
            _ => unreachable!(),
        }
    };
    for group in ["client", "model", "endpoint", "day", "hour"] {
        let mut expected: BTreeMap<String, [i64; 6]> = BTreeMap::new();
        for e in &events {
            let t = expected.entry(key_of(e, group)).or_default();
            t[0] += 1;
            t[1] += i64::from(e["status"].as_i64().unwrap() >= 400);
            t[2] += e["prompt_tokens"].as_i64().unwrap();
            t[3] += e["scored_tokens"].as_i64().unwrap();
            t[4] += e["generated_tokens"].as_i64().unwrap();
            t[5] += e["judgments"].as_i64().unwrap();
        }
        let r: serde_json::Value = app
            .admin(
                reqwest::Method::GET,
                &format!("/admin/usage?group_by={group}&to={to_q}"),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut got: BTreeMap<String, [i64; 6]> = BTreeMap::new();
        for row in r["data"].as_array().unwrap() {
            let key = match group {
                "client" => row["client_id"].to_string(),
                "model" => row["model"].to_string(),
                "endpoint" => row["endpoint"].to_string(),
                "day" => row["day"].as_str().unwrap().to_string(),
                "hour" => row["hour"].as_str().unwrap()[..13].to_string(),
                _ => unreachable!(),
            };
            let vals = [
                "requests",
                "errors",
                "prompt_tokens",
                "scored_tokens",
                "generated_tokens",
                "judgments",
            ]
            .map(|k| row[k].as_i64().unwrap());
            assert!(got.insert(key, vals).is_none(), "one row per group");
        }
        assert_eq!(got, expected, "group_by={group}");
    }

    // Totals without grouping, and a filtered total.
    let r: serde_json::Value = app
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?to={to_q}&model={MODEL}"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let open: Vec<_> = events.iter().filter(|e| e["model"] == MODEL).collect();
    assert_eq!(
        r["data"][0]["requests"].as_i64().unwrap(),
        open.len() as i64
    );
    let r = app
        .admin(reqwest::Method::GET, "/admin/usage?group_by=week")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn export_streams_every_row_as_jsonl_and_csv() {
    let app = TestApp::with_model(|_| {}).await;
    workload(&app).await;
    let before = app.row_count().await;

    let r = app
        .admin(reqwest::Method::GET, "/admin/audit/export?format=jsonl")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() as i64 >= before);
    let ids: Vec<i64> = lines.iter().map(|l| l["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=lines.len() as i64).collect::<Vec<_>>());
    // Each line carries the chain.
    for w in lines.windows(2) {
        assert_eq!(w[1]["prev_hash"], w[0]["row_hash"]);
    }

    let r = app
        .admin(reqwest::Method::GET, "/admin/audit/export?format=csv")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("id,request_id,ts,"));
    let n = lines.count() as i64;
    // The JSONL export's own row was committed when its stream ended.
    assert!(n > before, "{n} > {before}");

    let r = app
        .admin(reqwest::Method::GET, "/admin/audit/export?format=xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
