//! Middleware: code that runs around every attempt on a worker, and around
//! every publish on a client.
//!
//! **Worker side.** A [`Middleware`] wraps an attempt: it gets the attempt's
//! [`Context`] and [`Next`], the rest of the chain, and returns the
//! attempt's [`Outcome`]. It can run code before and after `next`, skip
//! `next` and answer itself (refusing the attempt with a [`TaskError`] of
//! its own kind), turn one outcome into another, read the request and its
//! headers, and give the handler typed values through the context's
//! extensions ([`Context::insert_extension`], read with the
//! [`Extension`](crate::Extension) extractor). Register one for a whole
//! worker with [`WorkerBuilder::middleware`](crate::WorkerBuilder::middleware)
//! or for one task with [`Task::middleware`](crate::Task::middleware). The
//! first registered is the outermost: a worker's middleware run before a
//! task's, in the order they were added; the task's timeout and handler are
//! innermost, so every middleware sees a timeout or a panic as an error
//! outcome.
//!
//! No middleware settles a message: the outcome it returns goes down the one
//! path every attempt takes (record, retry with backoff, dead letter,
//! acknowledgement).
//!
//! ```
//! use jetq::middleware::{from_fn, Next, Outcome};
//! use jetq::{Context, TaskError};
//!
//! // Refuse requests without a tenant, and time every attempt.
//! let tenant_required = from_fn(|ctx: Context, next: Next| async move {
//!     if ctx.metadata().get("tenant").is_none() {
//!         return Err(TaskError::permanent("no tenant in the metadata").with_kind("forbidden"));
//!     }
//!     let started = std::time::Instant::now();
//!     let outcome: Outcome = next.run(ctx).await;
//!     tracing::debug!(took = ?started.elapsed(), ok = outcome.is_ok(), "attempt done");
//!     outcome
//! });
//! # let _ = tenant_required;
//! ```
//!
//! **Producer side.** A [`PublishMiddleware`] wraps each publish of the
//! client it is registered on with
//! [`Client::middleware`](crate::Client::middleware): it can add headers or
//! metadata to the request, refuse it, or time it. A task that publishes
//! through [`Context::client`] goes through the worker's publish chain with
//! the attempt as [`Publish::parent`], so trace and auth context can follow
//! the request into its children.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;

use crate::broker::BoxFuture;
use crate::client::{Client, TaskHandle};
use crate::context::Context;
use crate::error::Result;
use crate::handler::{call_catching, panic_error, ErasedHandler};
use crate::request::Request;
use crate::task_error::{kinds, TaskError};

/// What an attempt ends with: the task's value, or its error.
pub type Outcome = std::result::Result<Value, TaskError>;

/// Code around every attempt of a task. Object-safe: a worker keeps its
/// middleware as `Arc<dyn Middleware>`. For a closure, see [`from_fn`].
pub trait Middleware: Send + Sync + 'static {
    /// Handle one attempt: call `next.run(ctx)` to go on (at most once), or
    /// return an outcome without it.
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome>;
}

impl<M: Middleware + ?Sized> Middleware for Arc<M> {
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome> {
        (**self).call(ctx, next)
    }
}

/// The rest of the chain: the middleware after this one, then the task's
/// timeout and handler.
pub struct Next {
    chain: Arc<[Arc<dyn Middleware>]>,
    index: usize,
    handler: ErasedHandler,
    timeout: Option<Duration>,
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next")
            .field(
                "middleware_left",
                &self.chain.len().saturating_sub(self.index),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Next {
    /// Run the rest of the chain and the task.
    pub async fn run(self, ctx: Context) -> Outcome {
        match self.chain.get(self.index) {
            Some(middleware) => {
                let middleware = Arc::clone(middleware);
                let next = Next {
                    chain: Arc::clone(&self.chain),
                    index: self.index + 1,
                    handler: self.handler,
                    timeout: self.timeout,
                };
                middleware.call(ctx, next).await
            }
            None => run_handler(&self.handler, self.timeout, ctx).await,
        }
    }
}

/// The task itself: its handler under its timeout, a panic caught.
async fn run_handler(handler: &ErasedHandler, timeout: Option<Duration>, ctx: Context) -> Outcome {
    match timeout {
        Some(limit) => match tokio::time::timeout(limit, call_catching(handler, ctx)).await {
            Ok(r) => r,
            Err(_) => Err(TaskError::new(format!(
                "the attempt ran longer than its {limit:?} limit"
            ))
            .with_kind(kinds::TIMEOUT)),
        },
        None => call_catching(handler, ctx).await,
    }
}

/// Run one attempt through `chain` and the task. A panic in a middleware
/// fails the attempt like a panic in the handler.
pub(crate) async fn run_attempt(
    chain: &Arc<[Arc<dyn Middleware>]>,
    handler: &ErasedHandler,
    timeout: Option<Duration>,
    ctx: Context,
) -> Outcome {
    if chain.is_empty() {
        return run_handler(handler, timeout, ctx).await;
    }
    // Boxed: the attempt's future holds this one, and stays below 1 KiB.
    Box::pin(run_chain(chain, handler, timeout, ctx)).await
}

/// [`run_attempt`] through a chain that is not empty.
async fn run_chain(
    chain: &Arc<[Arc<dyn Middleware>]>,
    handler: &ErasedHandler,
    timeout: Option<Duration>,
    ctx: Context,
) -> Outcome {
    let next = Next {
        chain: Arc::clone(chain),
        index: 0,
        handler: Arc::clone(handler),
        timeout,
    };
    match AssertUnwindSafe(next.run(ctx)).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(payload) => Err(panic_error(payload)),
    }
}

/// A middleware made of an async function of the attempt's context and the
/// rest of the chain (the shape of axum's `middleware::from_fn`).
pub fn from_fn<F, Fut>(f: F) -> FromFn<F>
where
    F: Fn(Context, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    FromFn { f }
}

/// The middleware of [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

impl<F, Fut> Middleware for FromFn<F>
where
    F: Fn(Context, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome> {
        Box::pin((self.f)(ctx, next))
    }
}

/// One publish as the producer's chain sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Publish {
    /// The request, as it will be published: a middleware may change its
    /// headers, metadata and other fields (the id, task and queue are checked
    /// again after the chain). Boxed: every layer of the chain keeps its
    /// `Publish` in its future.
    pub request: Box<Request>,
    /// The attempt publishing it, when a task publishes through
    /// [`Context::client`]: the request is its child.
    pub parent: Option<Context>,
    /// Whether the worker sends the ended record to this client's inbox
    /// ([`RequestBuilder::notify`](crate::client::RequestBuilder::notify)).
    pub notify: bool,
    /// Whether a `pending` record is written before the publish
    /// ([`RequestBuilder::pending_record`](crate::client::RequestBuilder::pending_record)).
    pub pending_record: bool,
}

/// Code around every publish of a client. Object-safe. For a closure, see
/// [`publish_from_fn`].
pub trait PublishMiddleware: Send + Sync + 'static {
    /// Handle one publish: call `next.run(publish)` to go on, or return an
    /// error to refuse it (nothing is sent).
    fn publish<'a>(
        &'a self,
        publish: Publish,
        next: PublishNext,
    ) -> BoxFuture<'a, Result<TaskHandle>>;
}

impl<M: PublishMiddleware + ?Sized> PublishMiddleware for Arc<M> {
    fn publish<'a>(
        &'a self,
        publish: Publish,
        next: PublishNext,
    ) -> BoxFuture<'a, Result<TaskHandle>> {
        (**self).publish(publish, next)
    }
}

/// The rest of a client's publish chain, then the publish itself.
pub struct PublishNext {
    client: Client,
    index: usize,
}

impl fmt::Debug for PublishNext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishNext")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PublishNext {
    pub(crate) fn new(client: Client) -> Self {
        PublishNext { client, index: 0 }
    }

    /// Run the rest of the chain and publish.
    pub async fn run(self, publish: Publish) -> Result<TaskHandle> {
        match self.client.publish_chain().get(self.index) {
            Some(middleware) => {
                let middleware = Arc::clone(middleware);
                let next = PublishNext {
                    client: self.client,
                    index: self.index + 1,
                };
                middleware.publish(publish, next).await
            }
            None => {
                self.client
                    .publish_unchained(publish.request, publish.notify, publish.pending_record)
                    .await
            }
        }
    }
}

/// A publish middleware made of an async function of the publish and the
/// rest of the chain.
pub fn publish_from_fn<F, Fut>(f: F) -> PublishFromFn<F>
where
    F: Fn(Publish, PublishNext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TaskHandle>> + Send + 'static,
{
    PublishFromFn { f }
}

/// The middleware of [`publish_from_fn`].
#[derive(Clone)]
pub struct PublishFromFn<F> {
    f: F,
}

impl<F> fmt::Debug for PublishFromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishFromFn").finish_non_exhaustive()
    }
}

impl<F, Fut> PublishMiddleware for PublishFromFn<F>
where
    F: Fn(Publish, PublishNext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TaskHandle>> + Send + 'static,
{
    fn publish<'a>(
        &'a self,
        publish: Publish,
        next: PublishNext,
    ) -> BoxFuture<'a, Result<TaskHandle>> {
        Box::pin((self.f)(publish, next))
    }
}
