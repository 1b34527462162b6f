//! Building a worker: task registrations and the builder.

use super::*;

/// A task registration: name, handler, queues and policy.
pub struct Task {
    pub(super) name: String,
    pub(super) queues: Vec<String>,
    pub(super) handler: ErasedHandler,
    pub(super) requirements: Requirements,
    pub(super) retry: RetryPolicy,
    pub(super) timeout: Option<Duration>,
    pub(super) middleware: Vec<Arc<dyn Middleware>>,
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("middleware", &self.middleware.len())
            .finish()
    }
}

impl Task {
    /// A task served by an async handler.
    pub fn new<H, P>(name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<P>,
        P: 'static,
    {
        let mut requirements = Requirements::default();
        H::requirements(&mut requirements);
        let erased: ErasedHandler = Arc::new(move |ctx| handler.call(ctx));
        Self::from_parts(name.into(), erased, requirements)
    }

    /// A task served by a blocking handler, run off the async threads.
    ///
    /// For work that does not await (heavy computation, blocking I/O): an
    /// async handler that blocks its thread also holds up the attempts that
    /// started with it, which share one task of the worker's (see
    /// [`Worker`](crate::Worker)).
    pub fn blocking<H, P>(name: impl Into<String>, handler: H) -> Self
    where
        H: BlockingHandler<P>,
        P: 'static,
    {
        let mut requirements = Requirements::default();
        H::requirements(&mut requirements);
        let erased: ErasedHandler = Arc::new(move |ctx| BlockingHandler::call(&handler, ctx));
        Self::from_parts(name.into(), erased, requirements)
    }

    pub(crate) fn from_parts(
        name: String,
        handler: ErasedHandler,
        requirements: Requirements,
    ) -> Self {
        Task {
            name,
            queues: Vec::new(),
            handler,
            requirements,
            retry: RetryPolicy::default(),
            timeout: None,
            middleware: Vec::new(),
        }
    }

    /// Serve the task on `queue` (may be called several times; default: the
    /// worker's default queue).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// Retries allowed when the request does not say.
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.retry.max_retries = max_retries;
        self
    }

    /// The whole retry policy.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Fail an attempt (kind `timeout`, retryable) that runs longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Add a middleware around this task's attempts, inside the worker's
    /// own (see [`middleware`](crate::middleware)); the first added is the
    /// outermost of the task's.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }
}

pub(super) struct TaskEntry {
    pub(super) handler: ErasedHandler,
    pub(super) retry: RetryPolicy,
    pub(super) timeout: Option<Duration>,
    /// The worker's middleware, then the task's: outermost first.
    pub(super) chain: Arc<[Arc<dyn Middleware>]>,
}

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    pub(super) broker: Arc<dyn Broker>,
    pub(super) name: Option<String>,
    pub(super) default_queue: String,
    pub(super) tasks: Vec<Task>,
    pub(super) shared: Shared,
    pub(super) concurrency: usize,
    pub(super) ack_wait: Duration,
    pub(super) shutdown_timeout: Duration,
    pub(super) running_after: Duration,
    pub(super) suspend_after: Duration,
    pub(super) middleware: Vec<Arc<dyn Middleware>>,
    pub(super) client: Option<Client>,
    /// Registrations refused before `build` (an invalid workflow): `build`
    /// returns the first.
    pub(super) refused: Vec<Error>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("name", &self.name)
            .field("default_queue", &self.default_queue)
            .field("tasks", &self.tasks)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl WorkerBuilder {
    /// Name the worker (default: `<host>-<pid>`); it appears in records.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The queue of tasks registered without one (default `default`).
    pub fn default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = queue.into();
        self
    }

    /// Register an async task on the default queue.
    pub fn task<H, P>(self, name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<P>,
        P: 'static,
    {
        self.register(Task::new(name, handler))
    }

    /// Register a blocking task on the default queue.
    pub fn blocking_task<H, P>(self, name: impl Into<String>, handler: H) -> Self
    where
        H: BlockingHandler<P>,
        P: 'static,
    {
        self.register(Task::blocking(name, handler))
    }

    /// Register a chained-steps [`Workflow`](crate::workflow::Workflow) as a
    /// task named by the workflow's name. A workflow that is not valid (no
    /// steps, two steps of one name) makes [`build`](Self::build) fail.
    pub fn workflow(mut self, workflow: crate::workflow::Workflow) -> Self {
        match Task::try_from(workflow) {
            Ok(task) => self.register(task),
            Err(e) => {
                self.refused.push(e);
                self
            }
        }
    }

    /// Register a task with its options.
    pub fn register(mut self, task: Task) -> Self {
        self.tasks.push(task);
        self
    }

    /// Give the worker shared state, extracted with `State<T>`.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, state: T) -> Self {
        self.shared
            .states
            .insert(TypeId::of::<T>(), Box::new(state));
        self
    }

    /// Give the worker a resource, built by `init` on first use and shared by
    /// every task it runs; extracted with `Resource<T>`.
    pub fn resource<T, F, Fut, E>(mut self, init: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<TaskError> + 'static,
    {
        let init = Box::new(
            move || -> BoxFuture<'static, std::result::Result<T, TaskError>> {
                let fut = init();
                Box::pin(async move { fut.await.map_err(Into::into) })
            },
        );
        let cell: Arc<dyn Any + Send + Sync> = Arc::new(ResourceCell::new(init));
        self.shared.resources.insert(TypeId::of::<T>(), cell);
        self
    }

    /// How many tasks run at once (default 16). Around them the worker
    /// overlaps its own broker round trips: while tasks are quick (under
    /// 10 ms on average) it takes up to eight times as many deliveries and
    /// reads their records ahead, and it writes up to eight times as many
    /// outcomes at once; a task still starts only when one of these slots
    /// is free.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How long a delivery may go unacknowledged before the broker gives it
    /// to another worker (default 30 s). Running tasks send keep-alives every
    /// third of it, so it bounds crash recovery, not task length.
    ///
    /// On NATS all workers of a queue share one consumer: this setting
    /// applies when the first worker creates it. A worker started later with
    /// another value says so at start and follows the queue's value (its
    /// keep-alives track the consumer's ack wait, read back every few
    /// seconds); change it on the consumer itself (`nats consumer edit`).
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait.max(Duration::from_millis(300));
        self
    }

    /// How long an attempt runs before its record says `running` (default
    /// 500 ms). A quicker attempt writes its record once, with its outcome:
    /// one write per attempt instead of two. Progress or metadata reported
    /// by the task, and a failure, write it at once.
    pub fn running_after(mut self, after: Duration) -> Self {
        self.running_after = after;
        self
    }

    /// How long a workflow may wait (a `sleep`, a `recv`, a `join`) inside
    /// its attempt, holding its slot, before it is suspended instead
    /// (default [`SUSPEND_AFTER`](crate::workflow::SUSPEND_AFTER), 2 s).
    /// `Duration::ZERO` suspends at every wait; a long one keeps short
    /// waits in the attempt, as a timer instead of two record writes and a
    /// scheduled message.
    pub fn suspend_after(mut self, after: Duration) -> Self {
        self.suspend_after = after;
        self
    }

    /// Add a middleware around every attempt of every task of this worker
    /// (see [`middleware`](crate::middleware)). The first added is the
    /// outermost; a task's own middleware run inside the worker's.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// The client tasks publish child requests with
    /// ([`Context::client`]), with its publish middleware (default: a plain
    /// client on the worker's broker).
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// How long running tasks may finish after shutdown begins (default 30 s);
    /// then they are stopped and released for immediate redelivery.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Check the registrations and build the worker: names must be valid,
    /// no task registered twice on a queue, every state and resource a
    /// handler asks for given.
    pub fn build(self) -> Result<Worker> {
        names::validate_queue(&self.default_queue)?;
        if let Some(e) = self.refused.into_iter().next() {
            return Err(e);
        }
        if self.tasks.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the worker has no tasks; register one with `.task(name, handler)`",
            ));
        }
        let mut registry: HashMap<String, HashMap<String, Arc<TaskEntry>>> = HashMap::new();
        for task in self.tasks {
            names::validate_task(&task.name)?;
            for (id, ty) in &task.requirements.states {
                if !self.shared.states.contains_key(id) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "task `{}` needs state {ty}; give it with `.state(...)`",
                            task.name
                        ),
                    ));
                }
            }
            for (id, ty) in &task.requirements.resources {
                if !self.shared.resources.contains_key(id) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "task `{}` needs resource {ty}; give it with `.resource(...)`",
                            task.name
                        ),
                    ));
                }
            }
            let queues = if task.queues.is_empty() {
                vec![self.default_queue.clone()]
            } else {
                task.queues.clone()
            };
            let chain: Vec<Arc<dyn Middleware>> = self
                .middleware
                .iter()
                .chain(&task.middleware)
                .cloned()
                .collect();
            let entry = Arc::new(TaskEntry {
                handler: task.handler,
                retry: task.retry,
                timeout: task.timeout,
                chain: chain.into(),
            });
            for queue in queues {
                names::validate_queue(&queue)?;
                let tasks = registry.entry(queue.clone()).or_default();
                if tasks
                    .insert(task.name.clone(), Arc::clone(&entry))
                    .is_some()
                {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "task `{}` is registered twice on queue `{queue}`",
                            task.name
                        ),
                    ));
                }
            }
        }
        let name = self.name.unwrap_or_else(default_worker_name);
        let client = self
            .client
            .unwrap_or_else(|| Client::from_arc(Arc::clone(&self.broker)));
        Ok(Worker {
            env: Arc::new(Env {
                client,
                broker: self.broker,
                name: Arc::from(name),
                registry,
                shared: Arc::new(self.shared),
                ack_wait: self.ack_wait,
                running_after: self.running_after,
                suspend_after: self.suspend_after,
                concluding: Arc::new(Semaphore::new(pipeline(self.concurrency))),
                slots: Arc::new(Semaphore::new(self.concurrency)),
                task_micros: AtomicU64::new(u64::MAX),
                concurrency: self.concurrency,
                running: StdMutex::new(HashMap::new()),
                next_registration: AtomicU64::new(0),
                cancelled: StdMutex::new(RecentIds::default()),
                live: StdMutex::new(HashSet::new()),
            }),
            concurrency: self.concurrency,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Build and run in the background; see [`Worker::spawn`].
    pub fn spawn(self) -> Result<RunningWorker> {
        Ok(self.build()?.spawn())
    }

    /// Build and run until SIGINT or SIGTERM; see [`Worker::run`].
    pub async fn run(self) -> Result<()> {
        self.build()?.run().await
    }

    /// Build and run until `signal` completes; see [`Worker::run_until`].
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<()> {
        self.build()?.run_until(signal).await
    }
}

pub(super) fn default_worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}
