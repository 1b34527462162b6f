//! Extractors: the parameters of a task handler.
//!
//! A handler is an `async fn` whose parameters each implement
//! [`FromContext`]. jetq ships [`Args`], [`Meta`], [`State`], [`Resource`] and
//! [`Context`] itself; implement [`FromContext`] for your own types to inject
//! anything computed per task (the current time, a pooled connection, a
//! client built from state).

use std::any::{type_name, TypeId};
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::broker::BoxFuture;
use crate::context::Context;
use crate::task_error::{kinds, TaskError};

/// What an extractor needs from the worker; checked when the worker is built,
/// so a missing state is a start-up error, not a failure of the first task.
#[derive(Debug, Default)]
pub struct Requirements {
    pub(crate) states: Vec<(TypeId, &'static str)>,
    pub(crate) resources: Vec<(TypeId, &'static str)>,
}

impl Requirements {
    /// Require shared state of type `T` (given with `WorkerBuilder::state`).
    pub fn state<T: 'static>(&mut self) {
        self.states.push((TypeId::of::<T>(), type_name::<T>()));
    }

    /// Require a worker resource of type `T` (given with `WorkerBuilder::resource`).
    pub fn resource<T: 'static>(&mut self) {
        self.resources.push((TypeId::of::<T>(), type_name::<T>()));
    }
}

/// A type that can be a parameter of a task handler.
///
/// ```
/// use jetq::{Context, FromContext, TaskError};
/// use time::OffsetDateTime;
///
/// /// Ergate's `Depends(create_current_time)`: computed for each task.
/// struct CurrentTime(OffsetDateTime);
///
/// impl FromContext for CurrentTime {
///     async fn from_context(_ctx: &Context) -> Result<Self, TaskError> {
///         Ok(CurrentTime(OffsetDateTime::now_utc()))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a parameter of a jetq task",
    note = "task parameters are extractors: `Args<T>`, `Meta<T>`, `State<T>`, `Resource<T>`, `Context`, or your own type implementing `jetq::FromContext`"
)]
pub trait FromContext: Sized + Send + 'static {
    /// Build the value for one attempt. An error fails the attempt with it.
    fn from_context(ctx: &Context) -> impl Future<Output = Result<Self, TaskError>> + Send;

    /// Declare what this extractor needs from the worker (states, resources).
    fn requirements(_req: &mut Requirements) {}
}

impl FromContext for Context {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        Ok(ctx.clone())
    }
}

/// The request's arguments, deserialized. Arguments of the wrong shape fail the
/// request at once (kind `invalid_args`), without retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Args<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromContext for Args<T> {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        serde_json::from_str(ctx.args().get())
            .map(Args)
            .map_err(|e| {
                TaskError::permanent(format!(
                    "arguments of task `{}` do not match {}: {e}",
                    ctx.task(),
                    type_name::<T>()
                ))
                .with_kind(kinds::INVALID_ARGS)
            })
    }
}

/// The request's metadata, deserialized into your own type (Ergate's
/// `Annotated[dict, Context()]`). Metadata of the wrong shape fails the
/// request at once (kind `invalid_metadata`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromContext for Meta<T> {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        let map = Value::Object(ctx.metadata().clone());
        T::deserialize(map).map(Meta).map_err(|e| {
            TaskError::permanent(format!(
                "metadata of task `{}` does not match {}: {e}",
                ctx.task(),
                type_name::<T>()
            ))
            .with_kind(kinds::INVALID_METADATA)
        })
    }
}

/// A value a middleware gave this attempt with
/// [`Context::insert_extension`] (axum's `Extension`). If no middleware
/// inserted one, the attempt fails at once (kind `extractor`, permanent): a
/// task that needs it is registered without the middleware that provides it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extension<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromContext for Extension<T> {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        ctx.extension::<T>().map(Extension).ok_or_else(|| {
            TaskError::permanent(format!(
                "task `{}` needs the extension {}, which no middleware of its worker inserted",
                ctx.task(),
                type_name::<T>()
            ))
            .with_kind(kinds::EXTRACTOR)
        })
    }
}

impl<T> Deref for Extension<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Shared state given to the worker with `WorkerBuilder::state`. A handler
/// that asks for a state the worker was not given is refused when the worker
/// is built.
#[derive(Debug, Clone, Copy, Default)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromContext for State<T> {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        ctx.state::<T>().map(State).ok_or_else(|| {
            TaskError::permanent(format!(
                "no state of type {} was given to the worker",
                type_name::<T>()
            ))
            .with_kind(kinds::EXTRACTOR)
        })
    }

    fn requirements(req: &mut Requirements) {
        req.state::<T>();
    }
}

type Init<T> = Box<dyn Fn() -> BoxFuture<'static, Result<T, TaskError>> + Send + Sync>;

/// A per-worker resource cell: built on first use, shared by every task.
pub(crate) struct ResourceCell<T> {
    cell: OnceCell<Arc<T>>,
    init: Init<T>,
}

impl<T: Send + Sync + 'static> ResourceCell<T> {
    pub(crate) fn new(init: Init<T>) -> Self {
        ResourceCell {
            cell: OnceCell::new(),
            init,
        }
    }

    async fn get(&self) -> Result<Arc<T>, TaskError> {
        self.cell
            .get_or_try_init(|| async { (self.init)().await.map(Arc::new) })
            .await
            .cloned()
    }
}

/// A resource created lazily once per worker and reused by every task it
/// runs (FluxQueue's worker storage): an HTTP client, a database pool.
/// If building it fails, the attempt fails (retryably) and the next task
/// tries again.
#[derive(Debug)]
pub struct Resource<T>(pub Arc<T>);

impl<T> Clone for Resource<T> {
    fn clone(&self) -> Self {
        Resource(Arc::clone(&self.0))
    }
}

impl<T> Deref for Resource<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Send + Sync + 'static> FromContext for Resource<T> {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        let cell = ctx
            .inner
            .shared
            .resources
            .get(&TypeId::of::<T>())
            .and_then(|any| any.clone().downcast::<ResourceCell<T>>().ok())
            .ok_or_else(|| {
                TaskError::permanent(format!(
                    "no resource of type {} was given to the worker",
                    type_name::<T>()
                ))
                .with_kind(kinds::EXTRACTOR)
            })?;
        cell.get().await.map(Resource).map_err(|e| {
            TaskError::new(format!(
                "building resource {}: {}",
                type_name::<T>(),
                e.message()
            ))
            .with_kind(kinds::EXTRACTOR)
            .with_retry(e.retry())
        })
    }

    fn requirements(req: &mut Requirements) {
        req.resource::<T>();
    }
}

impl<T> fmt::Debug for ResourceCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceCell")
            .field("type", &type_name::<T>())
            .field("initialized", &self.cell.initialized())
            .finish()
    }
}
