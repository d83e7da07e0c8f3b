//! Integration tests against a real Postgres: one binary, one fresh database per test.

mod admin;
mod auth;
mod helpers;
mod limits;
