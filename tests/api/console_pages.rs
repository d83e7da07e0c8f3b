//! The console's pages with seeded data: every page 200, charts with a point per bucket, the
//! seeded clients, teachers, acceptances and events on them; audit actions; no page (nor
//! `/docs`) references another host; `console.enabled = false` removes the console.

use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use serde_json::json;
use teachd::ledger::UsageEvent;
use uuid::Uuid;

use crate::app::{on_server, TestApp};
use crate::console::{browser, Console};

fn synthetic(client: Uuid, ts: DateTime<Utc>, n: i64) -> UsageEvent {
    UsageEvent {
        request_id: format!("seed-{n}"),
        ts: teachd::ledger::chain::to_db_precision(ts),
        client_id: client,
        key_id: Uuid::now_v7(),
        method: "POST".into(),
        endpoint: "/v1/logprobs".into(),
        model: Some(["teacher-a", "teacher-b"][(n % 2) as usize].into()),
        status: if n % 5 == 0 { 429 } else { 200 },
        error_code: (n % 5 == 0).then(|| "rate_limit_exceeded".into()),
        prompt_tokens: 10,
        scored_tokens: 9 + n % 3,
        generated_tokens: n % 4,
        judgments: 0,
        top_k: Some(5),
        latency_ms: 3.0 + (n % 10) as f64,
        request_sha256: [3; 32],
        response_sha256: [4; 32],
        tos_version: Some("t1".into()),
        weights_sha256: None,
        refusals: 0,
        response_bytes: 1000 + n % 7,
    }
}

/// Two clients that accepted the ToS (published from the console), real API traffic with
/// refusals, and a month of synthetic rows.
pub async fn seed(app: &TestApp, console: &Console<'_>) -> (Uuid, String) {
    let r = console
        .post(
            "/console/tos",
            &[("version", "t1"), ("text", "Distil responsibly.")],
        )
        .await;
    assert_eq!(r.status(), 303);
    let (lab, key) = app.teacher("lab-alpha", json!({"rpm": 4})).await;
    app.accept_tos(&key, "t1", true).await;
    let (other, _) = app.ready_teacher("lab-beta", json!({})).await;
    for _ in 0..8 {
        app.get("/v1/models", Some(&key)).send().await.unwrap();
    }
    let ledger = app.state.ledger.clone();
    let now = Utc::now();
    on_server(async move {
        let writes = (0..300i64).map(|n| {
            let client = if n % 3 == 0 { other } else { lab };
            let ts = now - Duration::minutes(n * 143 + 1);
            let ledger = ledger.clone();
            async move { ledger.record(synthetic(client, ts, n), None).await }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    })
    .await;
    (lab, key)
}

/// Buckets of a range ending now, as the overview draws them.
fn buckets(len: TimeDelta, step: TimeDelta) -> usize {
    let now = Utc::now();
    let mut t = (now - len).duration_trunc(step).unwrap();
    let mut n = 0;
    while t < now {
        n += 1;
        t += step;
    }
    n
}

fn first_points(html: &str) -> usize {
    let at = html.find("data-points=\"").expect("a chart") + "data-points=\"".len();
    html[at..at + html[at..].find('"').unwrap()]
        .parse()
        .unwrap()
}

#[tokio::test]
async fn every_page_renders_the_seeded_data() {
    let app = TestApp::spawn().await;
    let console = Console::sign_in(&app).await;
    let (lab, _) = seed(&app, &console).await;

    for (range, len, step) in [
        ("hour", TimeDelta::hours(1), TimeDelta::minutes(5)),
        ("day", TimeDelta::days(1), TimeDelta::hours(1)),
        ("30d", TimeDelta::days(30), TimeDelta::days(1)),
    ] {
        let (status, html) = console.get(&format!("/console?range={range}")).await;
        assert_eq!(status, 200, "{html}");
        assert_eq!(
            html.matches("<figure class=\"chart\"").count(),
            6,
            "{range}"
        );
        assert_eq!(first_points(&html), buckets(len, step), "{range}");
        assert!(html.contains("lab-alpha"), "top clients ({range})");
        assert!(
            html.contains("Bytes served"),
            "bytes served chart ({range})"
        );
        assert!(
            html.contains("rate_limit_exceeded"),
            "refusals by reason ({range})"
        );
    }
    // Ledger health shows the latest signed checkpoint; batch jobs have their section.
    let r = app
        .admin(reqwest::Method::GET, "/v1/ledger/checkpoint")
        .send()
        .await
        .unwrap();
    let size = r.text().await.unwrap().lines().nth(1).unwrap().to_string();
    let (_, html) = console.get("/console").await;
    assert!(
        html.contains(&format!("tree size {size}, root")),
        "the checkpoint on the overview"
    );
    assert!(html.contains("id=\"batches\""));
    let (_, month) = console.get("/console?range=30d").await;
    // The seeded rows served 1000-1006 bytes each: the total is at least some KiB.
    let kpi = &month[month.find("id=\"kpi-bytes\">").unwrap()..];
    let kpi = &kpi[kpi.find('>').unwrap() + 1..kpi.find("</b>").unwrap()];
    assert!(
        kpi.ends_with("KiB") || kpi.ends_with("MiB"),
        "bytes served: {kpi}"
    );
    assert!(month.contains("teacher-a") && month.contains("teacher-b"));
    assert!(month.contains("data-bars=\"2\""), "one bar per teacher");
    assert!(month.contains("id=\"latency\""));
    let from = (Utc::now() - Duration::days(10)).format("%Y-%m-%d");
    let (status, custom) = console
        .get(&format!("/console?range=custom&from={from}"))
        .await;
    assert_eq!(status, 200);
    // From that day's midnight to now, by day: ten whole days and today's part.
    assert_eq!(first_points(&custom), 11);
    let (status, _) = console.get("/console?range=custom&from=nonsense").await;
    assert_eq!(status, 400);

    let (status, list) = console.get("/console/clients").await;
    assert_eq!(status, 200);
    assert!(list.contains("lab-alpha") && list.contains("lab-beta"));
    assert_eq!(
        list.matches("<tr class=\"client\">").count(),
        3,
        "two labs and the admin"
    );

    let (status, page) = console.get(&format!("/console/clients/{lab}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("distil a student"), "its ToS acceptance");
    assert_eq!(
        first_points(&page),
        buckets(TimeDelta::days(30), TimeDelta::days(1))
    );
    assert_eq!(page.matches("<tr class=\"event\">").count(), 25);
    let at = page.find("?before=").expect("a link to older events") + "?before=".len();
    let before: i64 = page[at..at + page[at..].find('"').unwrap()]
        .parse()
        .unwrap();
    let (status, older) = console
        .get(&format!("/console/clients/{lab}?before={before}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(older.matches("<tr class=\"event\">").count(), 25);
    assert!(
        !older.contains(&format!("<td>{before}</td>")),
        "keyset: strictly older"
    );

    // Audit: verify shows its result and becomes the overview's ledger health.
    let r = console
        .post("/console/audit/verify", &[("from", ""), ("to", "")])
        .await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("id=\"verify-result\"") && html.contains("Intact"),
        "{html}"
    );
    let (_, overview) = console.get("/console").await;
    assert!(overview.contains("<span class=\"ok\">intact</span>"));
    let (status, audit) = console.get("/console/audit").await;
    assert_eq!(status, 200);
    assert!(audit.contains("<td>t1</td>"));

    // Export downloads the API's stream.
    let r = console
        .http
        .get(app.url("/console/audit/export?format=jsonl&from=&to="))
        .header(reqwest::header::COOKIE, &console.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("attachment"));
    let lines = r.text().await.unwrap().lines().count() as i64;
    assert!(lines > 300, "{lines} rows exported");

    // Every page view is a ledger row of the admin, like an admin API call.
    let views: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE endpoint = '/console/clients/{id}' AND status = 200",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(views, 2);
}

/// Absolute URLs in `text` that point anywhere but `origin`.
fn foreign_urls(text: &str, origin: &str) -> Vec<String> {
    let mut out = Vec::new();
    for scheme in ["http://", "https://", "//cdn", "//unpkg"] {
        let mut rest = text;
        while let Some(at) = rest.find(scheme) {
            let url: String = rest[at..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !"\"'<>)`".contains(*c))
                .collect();
            // SVG's and XHTML's namespace names are identifiers, not fetched.
            let namespace = url.starts_with("http://www.w3.org/");
            if !url.starts_with(origin) && !namespace {
                out.push(url);
            }
            rest = &rest[at + scheme.len()..];
        }
    }
    out
}

/// `src`/`href` targets of a page.
fn references(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attr) {
            let v = &rest[at + attr.len()..];
            out.push(v[..v.find('"').unwrap()].to_string());
            rest = v;
        }
    }
    out
}

#[tokio::test]
async fn console_pages_and_docs_reference_no_other_host() {
    let app = TestApp::spawn().await;
    let console = Console::sign_in(&app).await;
    let (lab, _) = seed(&app, &console).await;
    let origin = app.url("");
    let mut pages = vec![];
    for path in [
        "/console".to_string(),
        "/console?range=30d".into(),
        "/console/clients".into(),
        format!("/console/clients/{lab}"),
        "/console/audit".into(),
    ] {
        let (status, html) = console.get(&path).await;
        assert_eq!(status, 200);
        pages.push((path, html));
    }
    let login = browser()
        .get(app.url("/console/login"))
        .send()
        .await
        .unwrap();
    let csp = login.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    pages.push(("/console/login".into(), login.text().await.unwrap()));
    let docs = reqwest::get(app.url("/docs/")).await.unwrap();
    assert_eq!(docs.status(), 200);
    pages.push(("/docs/".into(), docs.text().await.unwrap()));

    let mut fetched = Vec::new();
    for (path, html) in &pages {
        assert_eq!(foreign_urls(html, &origin), Vec::<String>::new(), "{path}");
        for r in references(html) {
            assert!(
                !r.starts_with("http") && !r.starts_with("//"),
                "{path} references {r}"
            );
            if r.ends_with(".js") || r.ends_with(".css") {
                let url = if r.starts_with('/') {
                    app.url(&r)
                } else {
                    format!(
                        "{}/{}",
                        app.url(path.trim_end_matches('/')),
                        r.trim_start_matches("./")
                    )
                };
                fetched.push(url);
            }
        }
    }
    assert!(fetched
        .iter()
        .any(|u| u.ends_with("/console/assets/console.css")));
    assert!(
        fetched
            .iter()
            .any(|u| u.contains("/docs/") && u.ends_with(".js")),
        "{fetched:?}"
    );
    for url in fetched {
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let body = r.text().await.unwrap();
        if url.ends_with("swagger-initializer.js") || url.ends_with(".css") {
            assert_eq!(foreign_urls(&body, &origin), Vec::<String>::new(), "{url}");
        }
        if url.ends_with("swagger-initializer.js") {
            // Swagger UI would otherwise load a badge from validator.swagger.io.
            assert!(
                body.contains("\"validatorUrl\": \"none\"")
                    || body.contains("\"validatorUrl\":\"none\""),
                "{body}"
            );
        }
    }
}

#[tokio::test]
async fn the_console_can_be_turned_off() {
    let app = TestApp::spawn_with(None, |c| c.console.enabled = false).await;
    for path in ["/console", "/console/login", "/console/assets/console.css"] {
        let r = browser().get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}
