//! Integration tests of the usage ledger, ToS and admin audits against real Postgres.
//! One binary (`cargo test --test ledger`); every test gets a fresh database.

mod audits;
mod helpers;
mod outage;
mod process;
mod rows;
mod tamper;
mod tos;
