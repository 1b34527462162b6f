//! Handlers: async (or blocking) functions whose parameters are extractors.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde::Serialize;
use serde_json::Value;

use crate::broker::BoxFuture;
use crate::context::Context;
use crate::extract::{FromContext, Requirements};
use crate::task_error::{kinds, TaskError};

/// What a handler returns: `Result<T, E>` with a serializable `T` and an error
/// convertible into [`TaskError`] (any `std::error::Error` is, as retryable).
#[diagnostic::on_unimplemented(
    message = "a jetq task must return `Result<T, E>` where `T: Serialize` and `E: Into<TaskError>`, not `{Self}`"
)]
pub trait IntoTaskResult: Send + 'static {
    /// Convert into the JSON value or the error of the attempt.
    fn into_task_result(self) -> Result<Value, TaskError>;
}

impl<T, E> IntoTaskResult for Result<T, E>
where
    T: Serialize + Send + 'static,
    E: Into<TaskError> + Send + 'static,
{
    fn into_task_result(self) -> Result<Value, TaskError> {
        match self {
            Ok(v) => serde_json::to_value(v).map_err(|e| {
                TaskError::permanent(format!("the task's value cannot be encoded as JSON: {e}"))
            }),
            Err(e) => Err(e.into()),
        }
    }
}

/// An async function usable as a task: `async fn(E1, E2, ..) -> Result<T, E>`
/// where every `Ei` is an extractor ([`FromContext`]).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a jetq task handler",
    note = "a handler is an `async fn` of up to 12 extractor parameters (`Args<T>`, `Meta<T>`, `State<T>`, `Resource<T>`, `Context`, ...) returning `Result<T: Serialize, E: Into<TaskError>>`"
)]
pub trait Handler<Params>: Clone + Send + Sync + 'static {
    /// Run one attempt.
    fn call(&self, ctx: Context) -> BoxFuture<'static, Result<Value, TaskError>>;
    /// What the extractors need from the worker.
    fn requirements(req: &mut Requirements);
}

/// A blocking function usable as a task: `fn(E1, E2, ..) -> Result<T, E>`; it
/// runs on tokio's blocking threads, off the async runtime.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a jetq blocking task handler",
    note = "a blocking handler is a `fn` of up to 12 extractor parameters returning `Result<T: Serialize, E: Into<TaskError>>`"
)]
pub trait BlockingHandler<Params>: Clone + Send + Sync + 'static {
    /// Run one attempt.
    fn call(&self, ctx: Context) -> BoxFuture<'static, Result<Value, TaskError>>;
    /// What the extractors need from the worker.
    fn requirements(req: &mut Requirements);
}

macro_rules! impl_handlers {
    ($($ty:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, $($ty,)*> Handler<($($ty,)*)> for F
        where
            F: Fn($($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoTaskResult,
            $($ty: FromContext,)*
        {
            fn call(&self, ctx: Context) -> BoxFuture<'static, Result<Value, TaskError>> {
                let f = self.clone();
                Box::pin(async move {
                    $(let $ty = $ty::from_context(&ctx).await?;)*
                    f($($ty,)*).await.into_task_result()
                })
            }

            fn requirements(req: &mut Requirements) {
                $($ty::requirements(req);)*
            }
        }

        #[allow(non_snake_case, unused_variables)]
        impl<F, R, $($ty,)*> BlockingHandler<($($ty,)*)> for F
        where
            F: Fn($($ty,)*) -> R + Clone + Send + Sync + 'static,
            R: IntoTaskResult,
            $($ty: FromContext,)*
        {
            fn call(&self, ctx: Context) -> BoxFuture<'static, Result<Value, TaskError>> {
                let f = self.clone();
                Box::pin(async move {
                    $(let $ty = $ty::from_context(&ctx).await?;)*
                    match tokio::task::spawn_blocking(move || f($($ty,)*).into_task_result()).await {
                        Ok(result) => result,
                        Err(e) if e.is_panic() => Err(panic_error(e.into_panic())),
                        Err(e) => Err(TaskError::new(format!("blocking task did not finish: {e}"))),
                    }
                })
            }

            fn requirements(req: &mut Requirements) {
                $($ty::requirements(req);)*
            }
        }
    };
}

impl_handlers!();
impl_handlers!(T1);
impl_handlers!(T1, T2);
impl_handlers!(T1, T2, T3);
impl_handlers!(T1, T2, T3, T4);
impl_handlers!(T1, T2, T3, T4, T5);
impl_handlers!(T1, T2, T3, T4, T5, T6);
impl_handlers!(T1, T2, T3, T4, T5, T6, T7);
impl_handlers!(T1, T2, T3, T4, T5, T6, T7, T8);
impl_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9);
impl_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10);
impl_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11);
impl_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12);

/// The error of a panicked attempt, with the panic's message.
pub(crate) fn panic_error(payload: Box<dyn Any + Send>) -> TaskError {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    TaskError::new(format!("the task panicked: {msg}")).with_kind(kinds::PANIC)
}

/// A handler with its type erased, as the worker stores it.
pub(crate) type ErasedHandler =
    Arc<dyn Fn(Context) -> BoxFuture<'static, Result<Value, TaskError>> + Send + Sync>;

/// Run an erased handler, turning a panic into a failed attempt.
pub(crate) async fn call_catching(
    handler: &ErasedHandler,
    ctx: Context,
) -> Result<Value, TaskError> {
    match AssertUnwindSafe(handler(ctx)).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(panic_error(payload)),
    }
}
