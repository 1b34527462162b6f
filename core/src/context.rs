//! The task's view of its request: ids, attempt counts, metadata, progress,
//! cancellation, and the worker's shared state and resources.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::broker::BoxFuture;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::record::{Progress, Record};
use crate::request::Request;

/// Writes changes of a running task's record (metadata, progress).
pub(crate) trait RecordSink: Send + Sync {
    fn update(&self, change: Box<dyn Fn(&mut Record) + Send + Sync>) -> BoxFuture<'_, Result<()>>;

    /// Whether a client cancelled the request (the attempt's token fired
    /// for that reason).
    fn cancelled_by_client(&self) -> bool;
}

/// What a worker shares with every task: typed state and lazily built resources.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    pub(crate) resources: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("states", &self.states.len())
            .field("resources", &self.resources.len())
            .finish()
    }
}

pub(crate) struct ContextInner {
    pub(crate) request: Arc<Request>,
    pub(crate) attempt: u32,
    pub(crate) max_retries: u32,
    pub(crate) worker: Arc<str>,
    pub(crate) cancel: CancellationToken,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: Arc<dyn RecordSink>,
    /// The task's own time limit, if it has one.
    pub(crate) timeout: Option<Duration>,
    /// The client the task publishes children with (without a parent).
    pub(crate) client: Client,
    /// A workflow wait longer than this suspends the run.
    pub(crate) suspend_after: Duration,
    /// Values middleware gave this attempt, by type (shared with the
    /// contexts derived from it): made when the first is given, as most
    /// attempts have none.
    pub(crate) extensions: std::sync::OnceLock<Arc<Extensions>>,
}

/// An attempt's extensions, by type.
pub(crate) type Extensions = Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>;

/// The context of one attempt of a task, given to extractors and, as an
/// extractor itself, to the handler. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id())
            .field("task", &self.task())
            .field("queue", &self.queue())
            .field("attempt", &self.attempt())
            .field("max_retries", &self.max_retries())
            .finish()
    }
}

impl Context {
    /// The request id.
    pub fn id(&self) -> &str {
        &self.inner.request.id
    }

    /// The task name.
    pub fn task(&self) -> &str {
        &self.inner.request.task
    }

    /// The queue the request came from.
    pub fn queue(&self) -> &str {
        &self.inner.request.queue
    }

    /// This attempt's number, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Retries before this attempt (`attempt - 1`).
    pub fn retries(&self) -> u32 {
        self.inner.attempt.saturating_sub(1)
    }

    /// Retries allowed after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.inner.max_retries
    }

    /// When the producer published the request.
    pub fn enqueued_at(&self) -> OffsetDateTime {
        self.inner.request.enqueued_at
    }

    /// The name of the worker running this attempt.
    pub fn worker(&self) -> &str {
        &self.inner.worker
    }

    /// The request's metadata as published (read-only; see [`set_metadata`](Self::set_metadata)).
    pub fn metadata(&self) -> &Map<String, Value> {
        &self.inner.request.metadata
    }

    /// The arguments as JSON text, as published (decode them with
    /// [`Args`](crate::Args), or [`Request::args_as`] on [`request`](Self::request)).
    pub fn args(&self) -> &serde_json::value::RawValue {
        &self.inner.request.args
    }

    /// A propagated header (trace context, auth), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.request.headers.get(name).map(String::as_str)
    }

    /// The whole request.
    pub fn request(&self) -> &Request {
        &self.inner.request
    }

    /// Merge `key = value` into the record's metadata and store it, so that
    /// clients can read it while the task still runs.
    pub async fn set_metadata(&self, key: impl Into<String>, value: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(value)
            .map_err(|e| Error::serialization("encoding metadata", e))?;
        let mut map = Map::new();
        map.insert(key.into(), value);
        self.merge_metadata(map).await
    }

    /// Merge several keys into the record's metadata and store it.
    pub async fn merge_metadata(&self, entries: Map<String, Value>) -> Result<()> {
        self.inner
            .sink
            .update(Box::new(move |record: &mut Record| {
                for (k, v) in &entries {
                    record.metadata.insert(k.clone(), v.clone());
                }
            }))
            .await
    }

    /// Report progress (`current` of `total` units) and store it in the record.
    pub async fn set_progress(&self, current: u64, total: Option<u64>) -> Result<()> {
        self.store_progress(Progress {
            current,
            total,
            message: None,
        })
        .await
    }

    /// Report progress with a message.
    pub async fn store_progress(&self, progress: Progress) -> Result<()> {
        self.inner
            .sink
            .update(Box::new(move |record: &mut Record| {
                record.progress = Some(progress.clone());
            }))
            .await
    }

    /// The attempt's cancellation token. It fires when a client cancels the
    /// request ([`Client::cancel`](crate::Client::cancel); the record then
    /// ends `cancelled` whatever the task returns), when the worker shuts
    /// down (the attempt is then released for another worker rather than
    /// counted as failed), and when the attempt lost its request to another
    /// one (its worker was presumed dead). A task that sees it should stop soon.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// Whether a client cancelled the request ([`Client::cancel`](crate::Client::cancel)),
    /// as opposed to the worker shutting down or the attempt losing its
    /// request. Such an attempt ends `cancelled` whatever it returns.
    pub fn is_cancelled_by_client(&self) -> bool {
        self.inner.sink.cancelled_by_client()
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Completes when cancellation is requested.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// The task's own time limit ([`Task::timeout`](crate::Task::timeout)),
    /// if it has one.
    pub fn timeout(&self) -> Option<Duration> {
        self.inner.timeout
    }

    /// A client to publish child requests with: they go through the
    /// worker's publish middleware with this attempt as their parent
    /// ([`Publish::parent`](crate::middleware::Publish::parent)), and their
    /// envelope names this request's id in `parent`.
    pub fn client(&self) -> Client {
        self.inner.client.child_of(self.clone())
    }

    /// Give this attempt a value of type `T` (replacing one of the same
    /// type, which is returned): the handler reads it with the
    /// [`Extension`](crate::Extension) extractor, later middleware with
    /// [`extension`](Self::extension). Lives as long as the attempt.
    pub fn insert_extension<T: Clone + Send + Sync + 'static>(&self, value: T) -> Option<T> {
        let mut map = self
            .inner
            .extensions
            .get_or_init(Arc::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.insert(TypeId::of::<T>(), Box::new(value))
            .and_then(|old| old.downcast::<T>().ok())
            .map(|old| *old)
    }

    /// The value of type `T` a middleware gave this attempt, if any.
    pub fn extension<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        let map = self
            .inner
            .extensions
            .get()?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(&TypeId::of::<T>())
            .and_then(|b| b.downcast_ref::<T>())
            .cloned()
    }

    /// A context of the same attempt whose request arguments are `args`: the
    /// same cancellation tokens, record, client, shared state and
    /// extensions. A chained workflow runs each step with one, so that
    /// `Args<T>` extracts the step's input.
    pub(crate) fn with_args(&self, args: Box<serde_json::value::RawValue>) -> Context {
        let inner = &self.inner;
        let mut request = Request::clone(&inner.request);
        request.args = args;
        let request = Arc::new(request);
        Context {
            inner: Arc::new(ContextInner {
                request,
                attempt: inner.attempt,
                max_retries: inner.max_retries,
                worker: inner.worker.clone(),
                cancel: inner.cancel.clone(),
                shared: Arc::clone(&inner.shared),
                sink: Arc::clone(&inner.sink),
                timeout: inner.timeout,
                client: inner.client.clone(),
                suspend_after: inner.suspend_after,
                // Made now if there are none yet, so that the two contexts
                // share what is given to either later.
                extensions: std::sync::OnceLock::from(Arc::clone(
                    inner.extensions.get_or_init(Arc::default),
                )),
            }),
        }
    }

    /// Shared state of type `T`, if the worker was given one.
    pub fn state<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.inner
            .shared
            .states
            .get(&TypeId::of::<T>())
            .and_then(|b| b.downcast_ref::<T>())
            .cloned()
    }
}
