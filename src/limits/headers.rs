//! Rate-limit response headers: IETF draft-ietf-httpapi-ratelimit-headers-11
//! (`RateLimit-Policy`, `RateLimit`) and OpenAI's `x-ratelimit-*`, plus `Retry-After` on 429.

use std::fmt::Write;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::Limits;

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
pub const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
pub const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Where a client stands, as the headers tell it.
#[derive(Clone, Debug)]
pub struct RateState {
    pub limits: Limits,
    pub requests_remaining: u32,
    pub requests_reset: Duration,
    pub tokens_remaining: u64,
    pub tokens_reset: Duration,
    /// Known only when this request touched the daily quota.
    pub daily: Option<DailyState>,
}

#[derive(Clone, Copy, Debug)]
pub struct DailyState {
    pub remaining: i64,
    pub reset: Duration,
}

/// Whole seconds, rounded up: a client that waits this long is never early.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

/// Go-style durations as OpenAI sends them: `0s`, `250ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        let ms = d.as_nanos().div_ceil(1_000_000);
        return format!("{ms}ms");
    }
    let total_ms = d.as_nanos().div_ceil(1_000_000) as u64;
    let (h, rest) = (total_ms / 3_600_000, total_ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if h > 0 || m > 0 {
        let _ = write!(out, "{m}m");
    }
    if ms == 0 {
        let _ = write!(out, "{s}s");
    } else {
        let frac = format!("{ms:03}");
        let _ = write!(out, "{s}.{}s", frac.trim_end_matches('0'));
    }
    out
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

fn previous_daily_item(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(RATELIMIT)?.to_str().ok()?;
    let start = value.find("\"daily\";")?;
    Some(value[start..].split(", ").next()?.to_string())
}

/// Writes (replacing) every rate-limit header; `Retry-After` too when `retry_after` is given.
pub fn write(headers: &mut HeaderMap, state: &RateState, retry_after: Option<Duration>) {
    let l = &state.limits;
    set(
        headers,
        RATELIMIT_POLICY,
        format!(
            "\"rpm\";q={};w=60, \"tpm\";q={};w=60;qu=\"tokens\", \"concurrency\";q={};qu=\"concurrent-requests\", \"daily\";q={};w=86400;qu=\"tokens\"",
            l.rpm, l.tpm, l.max_concurrent, l.daily_tokens
        ),
    );
    let mut rl = format!(
        "\"rpm\";r={};t={}, \"tpm\";r={};t={}",
        state.requests_remaining,
        ceil_secs(state.requests_reset),
        state.tokens_remaining,
        ceil_secs(state.tokens_reset)
    );
    if let Some(daily) = state.daily {
        let _ = write!(
            rl,
            ", \"daily\";r={};t={}",
            daily.remaining.max(0),
            ceil_secs(daily.reset)
        );
    } else if let Some(previous) = previous_daily_item(headers) {
        // Set by a 429 from the quota; the gate rewrites the headers after the handler and
        // must not drop what only the quota check knew.
        let _ = write!(rl, ", {previous}");
    }
    set(headers, RATELIMIT, rl);
    set(headers, LIMIT_REQUESTS, l.rpm.to_string());
    set(
        headers,
        REMAINING_REQUESTS,
        state.requests_remaining.to_string(),
    );
    set(headers, RESET_REQUESTS, go_duration(state.requests_reset));
    set(headers, LIMIT_TOKENS, l.tpm.to_string());
    set(
        headers,
        REMAINING_TOKENS,
        state.tokens_remaining.to_string(),
    );
    set(headers, RESET_TOKENS, go_duration(state.tokens_reset));
    if let Some(wait) = retry_after {
        set(
            headers,
            axum::http::header::RETRY_AFTER,
            ceil_secs(wait).max(1).to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_micros(1)), "1ms");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(go_duration(Duration::from_millis(61_020)), "1m1.02s");
    }

    #[test]
    fn retry_after_rounds_up() {
        let state = RateState {
            limits: Limits {
                rpm: 60,
                tpm: 1000,
                max_concurrent: 2,
                daily_tokens: 10,
            },
            requests_remaining: 0,
            requests_reset: Duration::from_millis(1001),
            tokens_remaining: 5,
            tokens_reset: Duration::ZERO,
            daily: None,
        };
        let mut h = HeaderMap::new();
        write(&mut h, &state, Some(Duration::from_millis(1001)));
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["ratelimit"], "\"rpm\";r=0;t=2, \"tpm\";r=5;t=0");
        assert_eq!(h[RESET_REQUESTS], "1.001s");
        write(&mut h, &state, Some(Duration::from_nanos(1)));
        assert_eq!(h["retry-after"], "1");
        let daily = RateState {
            daily: Some(DailyState {
                remaining: 3,
                reset: Duration::from_secs(10),
            }),
            ..state.clone()
        };
        write(&mut h, &daily, None);
        write(&mut h, &state, None);
        assert_eq!(
            h["ratelimit"],
            "\"rpm\";r=0;t=2, \"tpm\";r=5;t=0, \"daily\";r=3;t=10"
        );
    }
}
