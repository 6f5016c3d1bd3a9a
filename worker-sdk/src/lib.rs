//! Rust client and worker SDK for Gantry, a replicated job broker.
//!
//! - [`Client`] enqueues jobs and reads, waits for or cancels them. It talks
//!   to any node of the cluster, retries on `UNAVAILABLE` and follows the
//!   `gantry-leader` hints nodes give. Each try of a call has a deadline
//!   ([`ClientBuilder::request_timeout`], 5 s by default; a
//!   [`wait`](Client::wait) gets its own wait time on top), so a node that
//!   accepts connections but never answers (frozen, overloaded) costs one
//!   deadline: reads, cancels and enqueues with an idempotency key then go
//!   to another node. An enqueue without a key that got no answer may have
//!   been committed, so it is not sent twice: it fails with
//!   [`Error::OutcomeUnknown`]. Connections also send HTTP/2 keepalive
//!   pings and drop a node that stops answering them.
//! - [`Worker`] holds one session with the broker, runs an async handler for
//!   each assigned job, and takes care of heartbeats, reconnects, session
//!   resume, leader failover and graceful shutdown.
//!
//! A job may run more than once (after a lost lease), but only the current
//! lease holder's result counts. Each attempt carries a
//! [`fencing_token`](JobContext::fencing_token) to pass to downstream
//! systems, and a [`lease_lost`](JobContext::lease_lost) signal to stop on.
//!
//! # Producer
//!
//! ```no_run
//! use std::time::Duration;
//! use gantry_worker::{Client, proto::JobState};
//!
//! # async fn producer() -> Result<(), gantry_worker::Error> {
//! let client = Client::connect(["127.0.0.1:50051"]).await?;
//! let job = client
//!     .enqueue("emails", r#"{"to":"ada@example.com"}"#)
//!     .priority(10)
//!     .idempotency_key("welcome-ada")
//!     .send()
//!     .await?;
//! let done = client.wait(&job.job_id, Duration::from_secs(30)).await?;
//! if done.state() == JobState::Succeeded {
//!     println!("result: {:?}", done.result);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Worker
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use gantry_worker::{JobContext, JobError, Worker};
//!
//! async fn send_email(ctx: JobContext) -> Result<Bytes, JobError> {
//!     if ctx.payload().is_empty() {
//!         return Err(JobError::fatal("empty payload")); // no retry
//!     }
//!     tokio::select! {
//!         // Another worker owns the job now: stop, the result would be refused.
//!         () = ctx.lease_lost() => Err(JobError::failed("lease lost")),
//!         sent = deliver(ctx.payload(), ctx.fencing_token()) => match sent {
//!             Ok(()) => Ok(Bytes::from_static(b"sent")),
//!             // Ask for another attempt in a minute.
//!             Err(_) => Err(JobError::retry_after(Duration::from_secs(60))),
//!         },
//!     }
//! }
//! # async fn deliver(_: &Bytes, _: u64) -> Result<(), std::io::Error> { Ok(()) }
//!
//! # async fn worker() -> Result<(), gantry_worker::Error> {
//! let worker = Worker::builder(["127.0.0.1:50051"])
//!     .queue("emails")
//!     .concurrency(16)
//!     .build()?;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! worker.run(send_email, shutdown).await
//! # }
//! ```

// `tonic::Status` is large and the API promises `Error::Status(tonic::Status)`;
// boxing it would cost every caller a dereference to save a few bytes on a
// cold error path.
#![allow(clippy::result_large_err)]

mod backoff;
mod client;
mod coalesce;
mod context;
mod convert;
mod endpoint;
mod error;
mod link;
mod retry;
mod session;
mod worker;

/// `Duration` and `Timestamp` as used by [`proto`] messages.
pub use gantry_proto::prost_types;
/// The generated `gantry.v1` types and raw gRPC clients.
pub use gantry_proto::v1 as proto;

pub use client::{Client, ClientBuilder, DEFAULT_REQUEST_TIMEOUT, EnqueueBuilder, Enqueued};
pub use context::JobContext;
pub use endpoint::{BrokerChannel, Credentials, Tls};
pub use error::{Error, JobError, LeaseLost};
pub use worker::{Worker, WorkerBuilder, WorkerHandle, WorkerStats};
