//! Chained-steps workflows on the in-memory broker: each step gets the value
//! before it, controls (goto, end, abort), progress, injected dependencies,
//! replay of finished steps, the step bound and refused definitions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jetq::broker::Broker;
use jetq::memory::MemoryBroker;
use jetq::workflow::{Next, StepRecord, Workflow, WorkflowContext, DEFAULT_MAX_STEPS};
use jetq::{
    Args, Client, Context, ErrorKind, Meta, Progress, Record, Resource, RetryPolicy, State, Status,
    TaskError, Worker,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

const WAIT: Duration = Duration::from_secs(10);

fn fast() -> RetryPolicy {
    RetryPolicy::new(3)
        .base(Duration::from_millis(5))
        .max(Duration::from_millis(10))
}

/// How many times each step ran, by step.
#[derive(Clone, Default)]
struct Runs(Arc<[AtomicU32; 4]>);

impl Runs {
    fn hit(&self, step: usize) -> u32 {
        self.0[step].fetch_add(1, Ordering::SeqCst) + 1
    }

    fn of(&self, step: usize) -> u32 {
        self.0[step].load(Ordering::SeqCst)
    }
}

fn progress(current: u64, total: u64, step: &str) -> Option<Progress> {
    Some(Progress {
        current,
        total: Some(total),
        message: Some(step.to_owned()),
    })
}

/// The step checkpoints of run `id`, in order: name and value.
async fn checkpoints(broker: &MemoryBroker, id: &str) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for position in 0.. {
        let Some(bytes) = broker.get_step(id, position).await.unwrap() else {
            break;
        };
        let step: StepRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(step.position, position);
        out.push((
            step.name,
            step.value
                .or_else(|| step.error.map(|e| json!({"error": e.kind})))
                .unwrap(),
        ));
    }
    out
}

async fn add_one(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<u32, TaskError> {
    runs.hit(0);
    Ok(n + 1)
}

async fn double(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<Next<u32>, TaskError> {
    runs.hit(1);
    Ok(Next::Continue(n * 2))
}

async fn describe(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<String, TaskError> {
    runs.hit(2);
    Ok(format!("got {n}"))
}

fn pipeline() -> Workflow {
    Workflow::new("pipeline")
        .step("add_one", add_one)
        .step("double", double)
        .step("describe", describe)
        .retry_policy(fast())
}

#[tokio::test]
async fn each_step_gets_the_value_before_it_and_the_last_value_is_the_runs() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .workflow(pipeline())
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("pipeline")
        .id("chain-1")
        .args(&20)
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<String>(WAIT).await.unwrap(), "got 42");
    let rec = handle.record().await.unwrap();
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.progress, progress(3, 3, "describe"));
    assert_eq!((runs.of(0), runs.of(1), runs.of(2)), (1, 1, 1));
    // One checkpoint per step, named by the step, with the decision.
    assert_eq!(
        checkpoints(&broker, "chain-1").await,
        [
            (
                "add_one".to_owned(),
                json!({"value": 21, "then": "continue"})
            ),
            (
                "double".to_owned(),
                json!({"value": 42, "then": "continue"})
            ),
            (
                "describe".to_owned(),
                json!({"value": "got 42", "then": "continue"})
            ),
        ]
    );
    w.shutdown().await.unwrap();
}

/// Adds one to its input until it reaches 5 (a goto back), then skips
/// `never` (a goto forward).
async fn check(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<Next<u32>, TaskError> {
    runs.hit(1);
    Ok(if n < 5 {
        Next::goto("add_one", n)
    } else {
        Next::goto("describe", n * 10)
    })
}

async fn never(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<u32, TaskError> {
    runs.hit(3);
    Ok(n)
}

#[tokio::test]
async fn a_goto_runs_the_named_step_next_back_or_forward() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .workflow(
            Workflow::new("loop")
                .step("add_one", add_one)
                .step("check", check)
                .step("never", never)
                .step("describe", describe),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("loop")
        .id("chain-goto")
        .args(&0)
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<String>(WAIT).await.unwrap(), "got 50");
    assert_eq!(
        (runs.of(0), runs.of(1), runs.of(2), runs.of(3)),
        (5, 5, 1, 0)
    );
    let steps = checkpoints(&broker, "chain-goto").await;
    assert_eq!(steps.len(), 11, "{steps:?}");
    assert_eq!(
        steps[1],
        (
            "check".to_owned(),
            json!({"value": 1, "then": {"goto": "add_one"}})
        )
    );
    assert_eq!(
        steps[9],
        (
            "check".to_owned(),
            json!({"value": 50, "then": {"goto": "describe"}})
        )
    );
    assert_eq!(
        handle.record().await.unwrap().progress,
        progress(4, 4, "describe")
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn end_stops_the_run_with_its_value() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    async fn first(
        State(runs): State<Runs>,
        Args(n): Args<u32>,
    ) -> Result<Next<String>, TaskError> {
        runs.hit(0);
        Ok(Next::end(format!("ended early at {n}")))
    }
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .workflow(
            Workflow::new("short")
                .step("first", first)
                .step("second", describe)
                .step("third", describe),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("short").args(&7).publish().await.unwrap();
    assert_eq!(
        handle.result::<String>(WAIT).await.unwrap(),
        "ended early at 7"
    );
    assert_eq!((runs.of(0), runs.of(2)), (1, 0), "later steps never ran");
    assert_eq!(
        handle.record().await.unwrap().progress,
        progress(1, 3, "first")
    );
    assert_eq!(
        checkpoints(&broker, handle.id()).await,
        [(
            "first".to_owned(),
            json!({"value": "ended early at 7", "then": "end"})
        )]
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn abort_fails_the_run_permanently_and_dead_letters_it() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    async fn reserve(
        State(runs): State<Runs>,
        Args(order): Args<String>,
    ) -> Result<Next<u32>, TaskError> {
        runs.hit(1);
        Ok(Next::abort(format!("no stock for {order}")))
    }
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .workflow(
            Workflow::new("order")
                .step("reserve", reserve)
                .step("describe", describe)
                .max_retries(3),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("order")
        .id("chain-abort")
        .args(&"o-1")
        .publish()
        .await
        .unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "aborted");
    assert_eq!(error.kind, jetq::task_error::kinds::ABORTED);
    assert_eq!(error.message, "no stock for o-1");
    assert_eq!(rec.attempts, 1, "an abort is permanent: no retries");
    assert_eq!((runs.of(1), runs.of(2)), (1, 0));
    let letter = client.dead_letter("chain-abort").await.unwrap().unwrap();
    assert_eq!(letter.error.kind, "aborted");
    assert_eq!(letter.task, "order");
    // The abort is the step's checkpointed outcome.
    assert_eq!(
        checkpoints(&broker, "chain-abort").await,
        [("reserve".to_owned(), json!({"error": "aborted"}))]
    );
    w.shutdown().await.unwrap();
}

/// Lets the test look at a run while its second step runs.
#[derive(Clone)]
struct Gate {
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Semaphore>,
}

#[tokio::test]
async fn the_record_shows_steps_done_of_total_and_the_running_steps_name() {
    let broker = MemoryBroker::new();
    let (entered, mut inside) = mpsc::unbounded_channel();
    let gate = Gate {
        entered,
        release: Arc::new(Semaphore::new(0)),
    };
    async fn wait_at_gate(State(gate): State<Gate>, Args(n): Args<u32>) -> Result<u32, TaskError> {
        gate.entered.send(()).unwrap();
        gate.release.acquire().await.unwrap().forget();
        Ok(n + 1)
    }
    async fn plus_one(Args(n): Args<u32>) -> Result<u32, TaskError> {
        Ok(n + 1)
    }
    let w = Worker::builder(broker.clone())
        .state(gate.clone())
        .workflow(
            Workflow::new("gated")
                .step("step_1", plus_one)
                .step("step_2", wait_at_gate)
                .step("step_3", plus_one),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("gated").args(&1).publish().await.unwrap();
    inside.recv().await.unwrap();
    let running = handle.record().await.unwrap();
    assert_eq!(running.status, Status::Running);
    assert_eq!(running.progress, progress(1, 3, "step_2"));
    gate.release.add_permits(1);
    assert_eq!(handle.result::<u32>(WAIT).await.unwrap(), 4);
    assert_eq!(
        handle.record().await.unwrap().progress,
        progress(3, 3, "step_3")
    );
    w.shutdown().await.unwrap();
}

/// A clock the worker is given: the steps' injected current time.
#[derive(Clone)]
struct Clock(fn() -> u64);

#[derive(Deserialize)]
struct Who {
    user: String,
}

#[derive(Serialize, Deserialize)]
struct Stamped {
    n: u32,
    at: u64,
}

struct Pool {
    name: &'static str,
}

#[tokio::test]
async fn steps_get_state_resources_metadata_and_the_context_like_tasks() {
    let broker = MemoryBroker::new();
    async fn stamp(State(clock): State<Clock>, Args(n): Args<u32>) -> Result<Stamped, TaskError> {
        Ok(Stamped {
            n: n + 1,
            at: (clock.0)(),
        })
    }
    async fn sign(
        ctx: Context,
        Meta(who): Meta<Who>,
        pool: Resource<Pool>,
        Args(stamped): Args<Stamped>,
    ) -> Result<String, TaskError> {
        // The context is the run's, its arguments the step's input.
        assert_eq!(ctx.task(), "stamped");
        assert_eq!(
            ctx.request().args_as::<serde_json::Value>().unwrap()["n"],
            22
        );
        Ok(format!(
            "{} by {} at {} via {} (run {})",
            stamped.n,
            who.user,
            stamped.at,
            pool.name,
            ctx.id()
        ))
    }
    let workflow = || {
        Workflow::new("stamped")
            .step("stamp", stamp)
            .step("sign", sign)
    };
    // What the steps need is checked when the worker is built.
    let err = Worker::builder(broker.clone())
        .workflow(workflow())
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("Clock"), "{err}");
    let w = Worker::builder(broker.clone())
        .state(Clock(|| 1_700_000_000))
        .resource(|| async { Ok::<_, TaskError>(Pool { name: "pool-a" }) })
        .workflow(workflow())
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("stamped")
        .id("chain-di")
        .args(&21)
        .metadata("user", "prryplatypus")
        .publish()
        .await
        .unwrap();
    assert_eq!(
        handle.result::<String>(WAIT).await.unwrap(),
        "22 by prryplatypus at 1700000000 via pool-a (run chain-di)"
    );
    // A step input of the wrong shape names the step.
    let bad = Workflow::new("bad-input")
        .step("stamp", stamp)
        .step("expects_text", |Args(s): Args<String>| async move {
            Ok::<_, TaskError>(s)
        });
    w.shutdown().await.unwrap();
    let w = Worker::builder(broker.clone())
        .state(Clock(|| 1))
        .workflow(bad)
        .spawn()
        .unwrap();
    let rec = client
        .task("bad-input")
        .args(&1)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "invalid_args");
    assert!(
        error.message.starts_with("step `expects_text`: "),
        "{}",
        error.message
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retried_run_replays_finished_steps_without_running_them() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    async fn flaky(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<String, TaskError> {
        if runs.hit(2) == 1 {
            return Err(TaskError::new("the service is down"));
        }
        Ok(format!("got {n}"))
    }
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .workflow(
            Workflow::new("flaky")
                .step("add_one", add_one)
                .step("double", double)
                .step("flaky", flaky)
                .retry_policy(fast()),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("flaky")
        .id("chain-replay")
        .args(&20)
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<String>(WAIT).await.unwrap(), "got 42");
    let rec = handle.record().await.unwrap();
    assert_eq!(rec.attempts, 2);
    assert_eq!(
        (runs.of(0), runs.of(1), runs.of(2)),
        (1, 1, 2),
        "finished steps replayed, the failed one ran again"
    );
    assert_eq!(rec.progress, progress(3, 3, "flaky"));
    let mut attempts = Vec::new();
    for position in 0..3 {
        let bytes = broker
            .get_step("chain-replay", position)
            .await
            .unwrap()
            .unwrap();
        attempts.push(
            serde_json::from_slice::<StepRecord>(&bytes)
                .unwrap()
                .attempt,
        );
    }
    assert_eq!(attempts, [1, 1, 2]);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_run_that_goes_round_for_ever_stops_at_the_step_bound() {
    assert_eq!(DEFAULT_MAX_STEPS, 10_000);
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    async fn again(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<Next<u32>, TaskError> {
        runs.hit(0);
        Ok(Next::goto("again", n + 1))
    }
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .workflow(
            Workflow::new("spin")
                .step("again", again)
                .max_steps(5)
                .max_retries(3),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("spin")
        .id("chain-spin")
        .args(&0)
        .publish()
        .await
        .unwrap();
    let rec: Record = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "too_many_steps");
    assert!(error.message.contains("5 steps"), "{}", error.message);
    assert_eq!(rec.attempts, 1, "permanent");
    assert_eq!(runs.of(0), 5);
    assert_eq!(checkpoints(&broker, "chain-spin").await.len(), 5);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_definitions_are_refused_at_build_and_an_unknown_goto_fails_the_run() {
    let broker = MemoryBroker::new();
    let err = Worker::builder(broker.clone())
        .workflow(
            Workflow::new("twice")
                .step("add_one", add_one)
                .step("add_one", add_one),
        )
        .state(Runs::default())
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string().contains("two steps named `add_one`"),
        "{err}"
    );
    let err = Worker::builder(broker.clone())
        .workflow(Workflow::new("empty"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("no steps"), "{err}");

    async fn lost(Args(n): Args<u32>) -> Result<Next<u32>, TaskError> {
        Ok(Next::goto("nowhere", n))
    }
    let w = Worker::builder(broker.clone())
        .workflow(Workflow::new("lost").step("lost", lost).max_retries(3))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let rec = client
        .task("lost")
        .args(&1)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "unknown_step");
    assert!(error.message.contains("`nowhere`"), "{}", error.message);
    assert_eq!(rec.attempts, 1);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_step_that_runs_steps_of_its_own_fails_the_run() {
    let broker = MemoryBroker::new();
    async fn nested(wf: WorkflowContext, Args(n): Args<u32>) -> Result<u32, TaskError> {
        wf.step("inner", async move { Ok::<_, TaskError>(n) }).await
    }
    let w = Worker::builder(broker.clone())
        .workflow(Workflow::new("nested").step("outer", nested))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let rec = client
        .task("nested")
        .args(&1)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert!(error.message.contains("`outer`"), "{}", error.message);
    assert_eq!(rec.attempts, 1);
    w.shutdown().await.unwrap();
}
