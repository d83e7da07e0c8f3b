//! The usage ledger, ToS and audits, through the real server with real keys.

mod audits;
mod outage;
mod process;
mod rows;
mod tamper;
mod tos;
mod transparency;
