//! The usage ledger, ToS and audits, through the real server with real keys.

mod audits;
mod outage;
pub mod process;
mod rows;
mod tamper;
mod tos;
mod transparency;
