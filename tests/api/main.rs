//! One integration binary: real Postgres, the real default model, a real server on
//! 127.0.0.1:0.

mod helpers;
mod judgments;
mod openapi;
mod teacher;
mod teacher_errors;
