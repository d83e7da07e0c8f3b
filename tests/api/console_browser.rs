//! The console in a real browser (headless Chromium over WebDriver): sign in, open every page,
//! check the charts drew the seeded data, issue and revoke a key, sign out; a screenshot of
//! each page under `$TEACHD_SCREENSHOTS` (default: the target dir's `tmp/console-screenshots`).

use serde_json::Value;

use crate::app::TestApp;
use crate::console::Console;
use crate::console_pages::seed;
use crate::webdriver::Browser;

fn screenshots_dir() -> std::path::PathBuf {
    let dir = std::env::var("TEACHD_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Per chart on the page: (declared points or bars, circles drawn, bars drawn, width on screen).
async fn charts(b: &Browser) -> Vec<(u64, u64, u64, f64)> {
    let v = b
        .eval(
            "return [...document.querySelectorAll('figure.chart')].map(f => {
               const svg = f.querySelector('svg');
               return [Number(f.dataset.points ?? f.dataset.bars),
                       f.querySelectorAll('circle').length,
                       Math.max(0, f.querySelectorAll('rect').length - 1),
                       svg ? svg.getBoundingClientRect().width : 0];
             });",
        )
        .await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let n = |i: usize| c[i].as_f64().unwrap_or(0.0);
            (n(0) as u64, n(1) as u64, n(2) as u64, n(3))
        })
        .collect()
}

/// Every line chart drew a circle per declared point, every chart is on screen.
fn assert_drawn(page: &str, charts: &[(u64, u64, u64, f64)], want: usize) {
    assert_eq!(charts.len(), want, "{page}: charts {charts:?}");
    for &(declared, circles, bars, width) in charts {
        assert!(width > 200.0, "{page}: chart not rendered ({width}px)");
        assert!(
            declared == circles || declared == bars,
            "{page}: {declared} declared, {circles} points, {bars} bars"
        );
    }
}

#[tokio::test]
async fn a_browser_signs_in_opens_every_page_and_issues_and_revokes_a_key() {
    let app = TestApp::spawn().await;
    let (lab, teacher_key) = {
        let console = Console::sign_in(&app).await;
        seed(&app, &console).await
    };
    let out = screenshots_dir();
    let b = Browser::start().await;

    b.goto(&app.url("/console")).await;
    assert!(b.url().await.ends_with("/console/login"), "not signed in");
    b.screenshot(&out.join("01-sign-in.png")).await;
    let key = b.one("#key").await;
    b.type_into(&key, &app.admin_key).await;
    b.click(&b.one("#sign-in").await).await;
    b.wait_url("/console").await;
    // No script on the page can read the session cookie.
    assert_eq!(b.eval("return document.cookie;").await, Value::from(""));

    for (range, file) in [
        ("hour", "02-overview-hour.png"),
        ("day", "03-overview-day.png"),
        ("30d", "04-overview-30-days.png"),
    ] {
        b.goto(&app.url(&format!("/console?range={range}"))).await;
        let c = charts(&b).await;
        assert_drawn(range, &c, 6);
        assert!(c[0].0 > 0 && c[1].0 > 0, "{range}: {c:?}");
        let text = b.text(&b.one("#top-clients").await).await;
        assert!(text.contains("lab-alpha"), "{range}: {text}");
        b.screenshot(&out.join(file)).await;
    }
    let mix = charts(&b).await;
    assert_eq!(mix[4].2, 2, "30 days: one bar per seeded teacher");

    b.goto(&app.url("/console/clients")).await;
    assert_eq!(b.all("tr.client").await.len(), 3);
    b.screenshot(&out.join("05-clients.png")).await;
    b.click(&b.one(&format!("a[href='/console/clients/{lab}']")).await)
        .await;
    b.wait_url(&format!("/console/clients/{lab}")).await;
    assert_drawn("client", &charts(&b).await, 2);
    assert_eq!(b.all("tr.event").await.len(), 25);

    // Issue a key: shown once, works at once; revoke it: refused at once.
    let keys_before = b.all("tr.key").await.len();
    b.click(&b.one("#issue-key button").await).await;
    let new_key = b.text(&b.wait_for("#new-key code").await).await;
    assert!(new_key.starts_with("tk_"), "{new_key}");
    b.screenshot(&out.join("06-client-key-issued.png")).await;
    let models = |k: String| {
        let rb = app.get("/v1/models", Some(&k));
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    // Accepted (lab-alpha's tiny rpm, spent by the seed, may answer 429, never 401).
    assert_ne!(models(new_key.clone()).await, 401);
    let revokes = b.all("button.revoke").await;
    assert_eq!(revokes.len(), keys_before + 1);
    b.click(revokes.last().unwrap()).await;
    b.wait_url(&format!("/console/clients/{lab}")).await;
    b.wait_for("#status").await;
    assert_eq!(b.all("button.revoke").await.len(), keys_before);
    assert_eq!(models(new_key).await, 401);
    assert_ne!(models(teacher_key).await, 401, "the other key is untouched");
    b.screenshot(&out.join("07-client.png")).await;

    b.goto(&app.url("/console/audit")).await;
    b.click(&b.one("#verify button").await).await;
    let result = b.text(&b.wait_for("#verify-result").await).await;
    assert!(result.contains("Intact"), "{result}");
    b.screenshot(&out.join("08-audit.png")).await;

    b.click(&b.one("#sign-out").await).await;
    b.wait_url("/console/login").await;
    b.goto(&app.url("/console")).await;
    assert!(b.url().await.ends_with("/console/login"), "signed out");
    b.quit().await;
    eprintln!("console screenshots in {}", out.display());
}
