//! Server-sent event streams for the generation endpoints (chat and completions): one producer
//! task per stream, a bounded channel to the client (a slow reader slows the producer down
//! instead of growing a buffer), the terminating `data: [DONE]`, and errors after the stream
//! started as one error event whose outcome the ledger row records.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_stream::StreamExt as _;

use crate::error::ApiError;
use crate::usage::Meter;

/// Events buffered between a producer and a slow client. Small: one generated token is one
/// event, and the engine is never far ahead of what the client has read.
pub const BUFFER: usize = 16;

/// The producer's end of a stream.
pub struct Sink {
    tx: tokio::sync::mpsc::Sender<Event>,
}

impl Sink {
    /// Sends one JSON chunk; waits while the client is slow. False once the client is gone: the
    /// producer should stop (what it produced so far is already recorded on the meter).
    pub async fn send<T: Serialize>(&self, chunk: &T) -> bool {
        let data = match serde_json::to_string(chunk) {
            Ok(data) => data,
            Err(err) => {
                tracing::error!(error = %err, "cannot serialise a stream chunk");
                return false;
            }
        };
        self.tx.send(Event::default().data(data)).await.is_ok()
    }

    /// Sends one chunk serialised beforehand (see [`Sink::send`]).
    pub async fn send_json(&self, data: String) -> bool {
        self.tx.send(Event::default().data(data)).await.is_ok()
    }

    /// A cheap clone for closures that send from inside a generation loop.
    pub fn clone_sender(&self) -> Sink {
        Sink {
            tx: self.tx.clone(),
        }
    }
}

/// A `text/event-stream` response whose events `produce` sends. When `produce` returns `Ok`,
/// the stream ends with `data: [DONE]` and the meter's outcome is completed; on `Err`, with the
/// error as an event and the error's status and code as the outcome. The meter closes when
/// the producer is done, so the ledger row sees everything it recorded.
pub fn stream<F, Fut>(meter: Meter, produce: F) -> Response
where
    F: FnOnce(Sink) -> Fut,
    Fut: Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    let done = tx.clone();
    let work = produce(Sink { tx });
    tokio::spawn(crate::error::in_request_scope(async move {
        // A client that is gone stops the producer: its generation (even one still waiting
        // for the engine) is dropped, which stops it; what it produced is on the meter, and
        // the stream's row records the hang-up.
        let outcome = tokio::select! {
            outcome = work => outcome,
            _ = done.closed() => {
                drop(meter);
                return;
            }
        };
        match outcome {
            Ok(()) => {
                meter.complete();
                let _ = done.send(Event::default().data("[DONE]")).await;
            }
            Err(err) => {
                meter.fail(&err);
                let _ = done.send(err.sse_event()).await;
            }
        }
        drop(meter);
    }));
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
