//! # jetq
//!
//! Durable background tasks and workflows whose only infrastructure is NATS
//! JetStream. This crate is the broker-agnostic core: the request and record
//! model, handlers and extractors, the worker and the client. The NATS
//! implementation lives in `jetq-nats`; an in-memory broker for unit tests
//! lives here in [`memory`].

pub mod broker;
pub mod error;
pub mod names;
pub mod record;
pub mod request;
pub mod task_error;

pub use error::{Error, ErrorKind, Result};
pub use record::{ErrorInfo, Progress, Record, Status};
pub use request::Request;
pub use task_error::{Retry, TaskError};
