//! One integration binary: real Postgres, the real default model, real servers on
//! 127.0.0.1:0.

mod admin;
mod app;
mod auth;
mod batch;
mod concurrency;
mod console;
mod console_browser;
mod console_pages;
mod helpers;
mod hostile;
mod judgments;
mod ledger;
mod limits;
mod openapi;
mod rollups;
mod sdk;
mod teacher;
mod teacher_errors;
mod webdriver;
