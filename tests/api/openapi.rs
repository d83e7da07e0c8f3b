//! The committed OpenAPI document is the one the code generates.

#[test]
fn committed_openapi_matches_the_generated_one() {
    let generated = teachd::http::openapi().to_pretty_json().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi/openapi.json is stale: regenerate it with `cargo run --bin teachd -- openapi > openapi/openapi.json`"
    );
}
