//! # jetq
//!
//! Durable background tasks and workflows whose only infrastructure is NATS
//! JetStream. This crate is the broker-agnostic core: the request and record
//! model, handlers and extractors, the worker and the client. The NATS
//! implementation lives in `jetq-nats`; an in-memory broker for unit tests
//! lives here in [`memory`].
//!
//! A task is an `async fn` whose parameters are extractors:
//!
//! ```
//! use jetq::{Args, Context, Meta, TaskError};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Resize { url: String, width: u32 }
//!
//! #[derive(Deserialize)]
//! struct Who { user: String }
//!
//! async fn resize(ctx: Context, Meta(who): Meta<Who>, Args(job): Args<Resize>) -> Result<String, TaskError> {
//!     ctx.set_metadata("resized_by", &who.user).await?;
//!     Ok(format!("{}@{}", job.url, job.width))
//! }
//! ```
//!
//! See [`Worker`] to serve tasks and [`Client`] to publish requests.

pub mod broker;
pub mod client;
pub mod context;
pub mod dead;
pub mod error;
pub mod extract;
pub mod handler;
pub mod memory;
pub mod middleware;
pub mod names;
mod notify;
pub mod record;
pub mod request;
pub mod retry;
mod rfc3339;
pub mod tag;
pub mod task_error;
pub mod worker;
pub mod workflow;

pub use client::{Client, RequestBuilder, SendBuilder, TaskHandle};
pub use context::Context;
pub use dead::DeadLetter;
pub use error::{Error, ErrorKind, Result};
pub use extract::{Args, Extension, FromContext, Meta, Requirements, Resource, State};
pub use handler::{BlockingHandler, Handler, IntoTaskResult};
pub use record::{ErrorInfo, Progress, Record, Status};
pub use request::Request;
pub use retry::RetryPolicy;
pub use task_error::{Retry, TaskError};
pub use worker::{shutdown_signal, RunningWorker, Task, Worker, WorkerBuilder};

/// Re-exported so users and brokers name the same versions.
pub use serde_json;
pub use time;
pub use tokio_util::sync::CancellationToken;
