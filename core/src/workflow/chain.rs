//! Chained steps (Ergate's style): a workflow declared as an ordered list of
//! named steps, each a handler like a task's. The public items are
//! re-exported from [`crate::workflow`]; [`Workflow`] documents the model.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::WorkflowContext;
use crate::broker::BoxFuture;
use crate::context::Context;
use crate::error::{Error, ErrorKind};
use crate::extract::{FromContext, Requirements};
use crate::handler::ErasedHandler;
use crate::middleware::Middleware;
use crate::record::Progress;
use crate::retry::RetryPolicy;
use crate::task_error::{kinds, TaskError};
use crate::worker::Task;

/// How many steps one run may take unless its workflow says otherwise
/// ([`Workflow::max_steps`]).
pub const DEFAULT_MAX_STEPS: u32 = 10_000;

/// The error kind of a chained run that took more steps than its workflow
/// allows (a goto that goes round for ever): permanent.
pub const TOO_MANY_STEPS: &str = "too_many_steps";

/// The error kind of a chained run whose step went to a step its workflow
/// does not have: permanent.
pub const UNKNOWN_STEP: &str = "unknown_step";

/// What a step of a chained [`Workflow`] decides comes next, with the value
/// it hands on. A step returns it as `Result<Next<T>, E>`; a step returning
/// a plain `Result<T, E>` always continues.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Next<T> {
    /// Run the next step with this value as its input; after the last
    /// step, end the run with it.
    Continue(T),
    /// Run the step named `step` with `value` as its input. It may be an
    /// earlier step (a loop), this one, or a later one.
    Goto {
        /// The name of the step to run.
        step: String,
        /// Its input.
        value: T,
    },
    /// End the run now, with this value as the run's value.
    End(T),
    /// Fail the run now with this message: a permanent error of kind
    /// [`aborted`](crate::task_error::kinds::ABORTED), so the request
    /// fails without retries and is dead-lettered.
    Abort(String),
}

impl<T> Next<T> {
    /// Run the step named `step` next, with `value` as its input.
    pub fn goto(step: impl Into<String>, value: T) -> Self {
        Next::Goto {
            step: step.into(),
            value,
        }
    }

    /// End the run now with `value`.
    pub fn end(value: T) -> Self {
        Next::End(value)
    }

    /// Fail the run now (kind `aborted`, permanent) with `message`.
    pub fn abort(message: impl Into<String>) -> Self {
        Next::Abort(message.into())
    }
}

/// What a step returns: `Result<T, E>` (continue with `T`) or
/// `Result<Next<T>, E>`, with `T: Serialize` and `E: Into<TaskError>`.
///
/// Both are possible because [`Next`] is not itself `Serialize`: a step's
/// return type says which it is. (That is also why a step is a
/// [`StepHandler`] rather than a [`Handler`](crate::Handler): a handler
/// encodes its value to JSON, after which a `Next` could not be told from a
/// value.)
#[diagnostic::on_unimplemented(
    message = "a jetq chained step must return `Result<T, E>` or `Result<Next<T>, E>` where `T: Serialize` and `E: Into<TaskError>`, not `{Self}`"
)]
pub trait IntoNext: Send + 'static {
    /// Convert into the step's decision, its value encoded as JSON.
    fn into_next(self) -> Result<Next<Value>, TaskError>;
}

/// The JSON of a step's value.
fn encode<T: Serialize>(value: T) -> Result<Value, TaskError> {
    serde_json::to_value(value).map_err(|e| {
        TaskError::permanent(format!("the step's value cannot be encoded as JSON: {e}"))
    })
}

impl<T, E> IntoNext for Result<T, E>
where
    T: Serialize + Send + 'static,
    E: Into<TaskError> + Send + 'static,
{
    fn into_next(self) -> Result<Next<Value>, TaskError> {
        let value = self.map_err(Into::into)?;
        encode(value).map(Next::Continue)
    }
}

impl<T, E> IntoNext for Result<Next<T>, E>
where
    T: Serialize + Send + 'static,
    E: Into<TaskError> + Send + 'static,
{
    fn into_next(self) -> Result<Next<Value>, TaskError> {
        Ok(match self.map_err(Into::into)? {
            Next::Continue(value) => Next::Continue(encode(value)?),
            Next::Goto { step, value } => Next::Goto {
                step,
                value: encode(value)?,
            },
            Next::End(value) => Next::End(encode(value)?),
            Next::Abort(message) => Next::Abort(message),
        })
    }
}

/// An async function usable as a step of a chained [`Workflow`]: `async
/// fn(E1, E2, ..) -> R` where every `Ei` is an extractor ([`FromContext`]:
/// `Args<T>` is the step's input) and `R` is `Result<T, E>` or
/// `Result<Next<T>, E>` ([`IntoNext`]). The same functions as a task's
/// [`Handler`](crate::Handler), with the richer return type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a jetq chained step",
    note = "a step is an `async fn` of up to 12 extractor parameters (`Args<T>`, `Meta<T>`, `State<T>`, `Resource<T>`, `Context`, ...) returning `Result<T: Serialize, E: Into<TaskError>>` or `Result<Next<T>, E>`"
)]
pub trait StepHandler<Params>: Clone + Send + Sync + 'static {
    /// Run the step with the context whose arguments are its input.
    fn call(&self, ctx: Context) -> BoxFuture<'static, Result<Next<Value>, TaskError>>;
    /// What the extractors need from the worker.
    fn requirements(req: &mut Requirements);
}

macro_rules! impl_step_handlers {
    ($($ty:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, $($ty,)*> StepHandler<($($ty,)*)> for F
        where
            F: Fn($($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoNext,
            $($ty: FromContext,)*
        {
            fn call(&self, ctx: Context) -> BoxFuture<'static, Result<Next<Value>, TaskError>> {
                let f = self.clone();
                Box::pin(async move {
                    $(let $ty = $ty::from_context(&ctx).await?;)*
                    f($($ty,)*).await.into_next()
                })
            }

            fn requirements(req: &mut Requirements) {
                $($ty::requirements(req);)*
            }
        }
    };
}

impl_step_handlers!();
impl_step_handlers!(T1);
impl_step_handlers!(T1, T2);
impl_step_handlers!(T1, T2, T3);
impl_step_handlers!(T1, T2, T3, T4);
impl_step_handlers!(T1, T2, T3, T4, T5);
impl_step_handlers!(T1, T2, T3, T4, T5, T6);
impl_step_handlers!(T1, T2, T3, T4, T5, T6, T7);
impl_step_handlers!(T1, T2, T3, T4, T5, T6, T7, T8);
impl_step_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9);
impl_step_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10);
impl_step_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11);
impl_step_handlers!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12);

/// A step with its handler's type erased.
type ErasedStep =
    Arc<dyn Fn(Context) -> BoxFuture<'static, Result<Next<Value>, TaskError>> + Send + Sync>;

/// A step of a chain: its name and handler.
struct StepEntry {
    name: String,
    run: ErasedStep,
}

/// A task option, applied to the [`Task`] the workflow becomes.
type TaskOption = Box<dyn FnOnce(Task) -> Task + Send + Sync>;

/// A chained-steps workflow (Ergate's style):
/// `Workflow::new("name").step("step_1", f1).step("step_2", f2)`,
/// registered on a worker with
/// [`WorkerBuilder::workflow`](crate::WorkerBuilder::workflow) (or turned
/// into a [`Task`] with `Task::try_from`, to register with
/// [`WorkerBuilder::register`](crate::WorkerBuilder::register)).
///
/// ```
/// use std::time::Duration;
///
/// use jetq::memory::MemoryBroker;
/// use jetq::workflow::{Next, Workflow};
/// use jetq::{Args, Client, Meta, TaskError, Worker};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Who {
///     user: String,
/// }
///
/// /// The first step gets the request's arguments.
/// async fn add_one(Args(n): Args<u32>) -> Result<u32, TaskError> {
///     Ok(n + 1)
/// }
///
/// /// Every later step gets the value the step before it returned.
/// async fn double(Args(n): Args<u32>) -> Result<Next<u32>, TaskError> {
///     if n > 1_000 {
///         return Ok(Next::abort(format!("{n} is too large")));
///     }
///     if n < 10 {
///         // Round again, from `add_one`, with this value as its input.
///         return Ok(Next::goto("add_one", n * 2));
///     }
///     Ok(Next::Continue(n * 2))
/// }
///
/// /// The last step's value is the run's value.
/// async fn describe(Meta(who): Meta<Who>, Args(n): Args<u32>) -> Result<String, TaskError> {
///     Ok(format!("{} got {n}", who.user))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> jetq::Result<()> {
/// let workflow = Workflow::new("demo.chain")
///     .step("add_one", add_one)
///     .step("double", double)
///     .step("describe", describe);
/// let broker = MemoryBroker::new();
/// let worker = Worker::builder(broker.clone()).workflow(workflow).spawn()?;
///
/// // A run is a request for the task named by the workflow.
/// let handle = Client::new(broker)
///     .task("demo.chain")
///     .args(&3)
///     .metadata("user", "ada")
///     .publish()
///     .await?;
/// // add_one: 3 + 1; double: goto add_one with 8; add_one: 9; double: goto
/// // add_one with 18; add_one: 19; double: 38, on to describe.
/// assert_eq!(handle.result::<String>(Duration::from_secs(5)).await?, "ada got 38");
/// let record = handle.record().await?;
/// assert_eq!(record.progress.map(|p| (p.current, p.total)), Some((3, Some(3))));
/// worker.shutdown().await?;
/// # Ok(())
/// # }
/// ```
///
/// **The model.** A run is a request for the task named by the workflow's
/// name. Its first step gets the request's arguments as its input (what
/// `Args<T>` extracts); each later step gets the value the step before it
/// returned; the value of the step that ends the run is the run's value.
/// Every other extractor works as in a task: `Meta<T>` is the request's
/// metadata (the user context), `State<T>` and `Resource<T>` the worker's
/// dependencies, [`Context`] the attempt.
///
/// **What a step returns.** `Result<T, E>` (with `T: Serialize`) continues
/// with `T`: the next step runs with it, or, after the last step, the run
/// ends with it. `Result<Next<T>, E>` decides what comes next: see [`Next`].
/// An error fails the step as a task's error fails its attempt: a retryable
/// one makes the request retry, a permanent one fails it.
///
/// **Durability.** The chain runs on [`WorkflowContext::step`]: each step it
/// runs is one checkpoint at the next position of the run (`<id>.step.<n>`),
/// named by the step's name, holding the step's value and what comes next.
/// An attempt after a crash, a release or a retryable failure runs the
/// chain again from the first step, and every checkpointed step returns its
/// checkpoint without running, so a finished step never runs again. A step
/// function must not itself take a [`WorkflowContext`] and run steps: the
/// chain's positions are its own (a step that does fails the run).
///
/// **Progress.** Before each step (replayed ones too) the record's progress
/// is set to `{current, total, message}`: `current` is the number of steps
/// before this one in the chain (on a straight run, the steps done), `total`
/// the number of steps, `message` the step's name. When the run ends,
/// `current` is one past its last step.
///
/// **The bound.** A goto may go back, so a run may go round: it may take at
/// most [`max_steps`](Workflow::max_steps) steps ([`DEFAULT_MAX_STEPS`]),
/// counting replayed ones, after which it fails at once with kind
/// [`TOO_MANY_STEPS`].
pub struct Workflow {
    name: String,
    steps: Vec<StepEntry>,
    requirements: Requirements,
    max_steps: u32,
    options: Vec<TaskOption>,
}

impl fmt::Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("name", &self.name)
            .field(
                "steps",
                &self
                    .steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("max_steps", &self.max_steps)
            .field("options", &self.options.len())
            .finish()
    }
}

impl Workflow {
    /// A workflow with no steps yet, served as the task `name`: a run is a
    /// request for that task.
    pub fn new(name: impl Into<String>) -> Self {
        Workflow {
            name: name.into(),
            steps: Vec::new(),
            requirements: Requirements::default(),
            max_steps: DEFAULT_MAX_STEPS,
            options: Vec::new(),
        }
    }

    /// The workflow's name: the task its runs are requests for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Add a step named `name` after the others. Step names are unique
    /// within a workflow (a goto names its target): a workflow with two
    /// steps of one name is refused when the worker is built.
    pub fn step<S, P>(mut self, name: impl Into<String>, step: S) -> Self
    where
        S: StepHandler<P>,
        P: 'static,
    {
        S::requirements(&mut self.requirements);
        let run: ErasedStep = Arc::new(move |ctx| step.call(ctx));
        self.steps.push(StepEntry {
            name: name.into(),
            run,
        });
        self
    }

    /// The most steps one run may take, replayed ones included (default
    /// [`DEFAULT_MAX_STEPS`]; at least 1). A run that would take more fails
    /// at once with kind [`TOO_MANY_STEPS`].
    pub fn max_steps(mut self, max_steps: u32) -> Self {
        self.max_steps = max_steps.max(1);
        self
    }

    /// Serve the workflow on `queue`; see [`Task::queue`].
    pub fn queue(self, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        self.option(move |task| task.queue(queue))
    }

    /// Retries allowed when the request does not say; see
    /// [`Task::max_retries`]. A retry runs the chain again, replaying its
    /// finished steps.
    pub fn max_retries(self, max_retries: u32) -> Self {
        self.option(move |task| task.max_retries(max_retries))
    }

    /// The whole retry policy; see [`Task::retry_policy`].
    pub fn retry_policy(self, policy: RetryPolicy) -> Self {
        self.option(move |task| task.retry_policy(policy))
    }

    /// The time limit of each attempt of a run, all its steps together; see
    /// [`Task::timeout`].
    pub fn timeout(self, timeout: Duration) -> Self {
        self.option(move |task| task.timeout(timeout))
    }

    /// A middleware around each attempt of a run (not around each step);
    /// see [`Task::middleware`].
    pub fn middleware(self, middleware: impl Middleware) -> Self {
        self.option(move |task| task.middleware(middleware))
    }

    fn option(mut self, option: impl FnOnce(Task) -> Task + Send + Sync + 'static) -> Self {
        self.options.push(Box::new(option));
        self
    }
}

/// The task that runs the workflow's chain. Fails (kind
/// [`Config`](ErrorKind::Config)) if the workflow has no steps, or a step
/// with an empty name, or two steps of one name.
impl TryFrom<Workflow> for Task {
    type Error = Error;

    fn try_from(workflow: Workflow) -> Result<Task, Error> {
        let Workflow {
            name,
            steps,
            requirements,
            max_steps,
            options,
        } = workflow;
        if steps.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("workflow `{name}` has no steps; add one with `.step(name, handler)`"),
            ));
        }
        let mut index = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            if step.name.is_empty() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("step {} of workflow `{name}` has an empty name", i + 1),
                ));
            }
            if index.insert(step.name.clone(), i).is_some() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "workflow `{name}` has two steps named `{}`; step names must be unique",
                        step.name
                    ),
                ));
            }
        }
        let chain = Arc::new(Chain {
            workflow: name.clone(),
            steps,
            index,
            max_steps,
        });
        let handler: ErasedHandler = Arc::new(move |ctx| Box::pin(Arc::clone(&chain).run(ctx)));
        let mut task = Task::from_parts(name, handler, requirements);
        for option in options {
            task = option(task);
        }
        Ok(task)
    }
}

/// What is checkpointed for each step the chain runs (in the step
/// checkpoint's `value`): the step's value and what comes next.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    value: Value,
    #[serde(default)]
    then: Then,
}

/// What comes after a checkpointed step. An abort is checkpointed as the
/// step's (permanent) error instead.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Then {
    #[default]
    Continue,
    End,
    Goto(String),
}

/// A validated workflow, as its task runs it.
struct Chain {
    workflow: String,
    steps: Vec<StepEntry>,
    /// Step positions in `steps` by name.
    index: HashMap<String, usize>,
    max_steps: u32,
}

impl Chain {
    /// One attempt of a run: every step from the first, through
    /// [`WorkflowContext::step`].
    async fn run(self: Arc<Self>, ctx: Context) -> Result<Value, TaskError> {
        let wf = WorkflowContext::from_context(&ctx).await?;
        let total = self.steps.len() as u64;
        let mut at = 0usize;
        let mut input = ctx.args().to_owned();
        for _ in 0..self.max_steps {
            let Some(step) = self.steps.get(at) else {
                return Err(TaskError::permanent(format!(
                    "workflow `{}` has no step {at}",
                    self.workflow
                )));
            };
            report(&ctx, at as u64, total, &step.name).await?;
            let before = wf.positions.0.next.load(Ordering::SeqCst);
            let checkpoint: Checkpoint = wf
                .step(&step.name, self.execute(step, ctx.with_args(input)))
                .await?;
            if wf.positions.0.next.load(Ordering::SeqCst) != before.wrapping_add(1) {
                return Err(TaskError::permanent(format!(
                    "step `{}` of workflow `{}` ran workflow steps of its own (with a `WorkflowContext`); a chained step cannot, the chain's steps are its positions",
                    step.name, self.workflow
                )));
            }
            let next = match checkpoint.then {
                Then::Continue if at + 1 < self.steps.len() => at + 1,
                Then::Continue | Then::End => {
                    report(&ctx, at as u64 + 1, total, &step.name).await?;
                    return Ok(checkpoint.value);
                }
                Then::Goto(target) => match self.index.get(&target) {
                    Some(&i) => i,
                    // Checkpointed by other code: a goto is checked before
                    // it is checkpointed.
                    None => {
                        return Err(TaskError::permanent(format!(
                            "step `{}` of workflow `{}` was checkpointed going to step `{}`, which the workflow no longer has; the workflow's code changed while it ran",
                            step.name,
                            self.workflow,
                            crate::names::escape(&target)
                        ))
                        .with_kind(super::NONDETERMINISTIC))
                    }
                },
            };
            at = next;
            input = serde_json::value::to_raw_value(&checkpoint.value).map_err(|e| {
                TaskError::permanent(format!(
                    "the value of step `{}` of workflow `{}` cannot be encoded as the next step's input: {e}",
                    step.name, self.workflow
                ))
            })?;
        }
        Err(TaskError::permanent(format!(
            "workflow `{}` took {} steps without ending (the most a run may take; see `Workflow::max_steps`)",
            self.workflow, self.max_steps
        ))
        .with_kind(TOO_MANY_STEPS))
    }

    /// Run `step` with the context of its input; what to checkpoint.
    async fn execute(&self, step: &StepEntry, ctx: Context) -> Result<Checkpoint, TaskError> {
        let next = (step.run)(ctx).await.map_err(|e| {
            // jetq's own extractor errors name the task: say which step.
            if [
                kinds::INVALID_ARGS,
                kinds::INVALID_METADATA,
                kinds::EXTRACTOR,
            ]
            .contains(&e.kind())
            {
                TaskError::new(format!("step `{}`: {}", step.name, e.message()))
                    .with_kind(e.kind())
                    .with_retry(e.retry())
            } else {
                e
            }
        })?;
        match next {
            Next::Continue(value) => Ok(Checkpoint {
                value,
                then: Then::Continue,
            }),
            Next::End(value) => Ok(Checkpoint {
                value,
                then: Then::End,
            }),
            Next::Goto {
                step: target,
                value,
            } => {
                if self.index.contains_key(&target) {
                    Ok(Checkpoint {
                        value,
                        then: Then::Goto(target),
                    })
                } else {
                    let known: Vec<String> =
                        self.steps.iter().map(|s| format!("`{}`", s.name)).collect();
                    Err(TaskError::permanent(format!(
                        "step `{}` of workflow `{}` goes to step `{}`, which it does not have (its steps: {})",
                        step.name,
                        self.workflow,
                        crate::names::escape(&target),
                        known.join(", ")
                    ))
                    .with_kind(UNKNOWN_STEP))
                }
            }
            Next::Abort(message) => Err(TaskError::permanent(message).with_kind(kinds::ABORTED)),
        }
    }
}

/// Set the record's progress to step `current` of `total`, named `name`.
async fn report(ctx: &Context, current: u64, total: u64, name: &str) -> Result<(), TaskError> {
    ctx.store_progress(Progress {
        current,
        total: Some(total),
        message: Some(name.to_owned()),
    })
    .await
    .map_err(|e| match e.kind() {
        ErrorKind::PayloadTooLarge => TaskError::permanent(format!(
            "the progress of step `{name}` does not fit in the record: {e}"
        ))
        .with_kind(kinds::TOO_LARGE),
        _ => TaskError::new(format!("cannot report the progress of step `{name}`: {e}")),
    })
}
