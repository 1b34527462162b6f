//! The `jetq` command and `jetq-demo-worker` as separate processes, as a
//! user runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use jetq_tests::{demo_worker, workspace_bin, NatsServer};
use serde_json::Value;

fn jetq(server: &NatsServer, args: &[&str]) -> Output {
    Command::new(workspace_bin("jetq"))
        .arg("--nats")
        .arg(server.url())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run jetq: {e}"))
}

fn json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim().lines().count(),
        1,
        "one JSON object on one line: {text}"
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn publish_wait_and_get_against_the_demo_worker() {
    let server = NatsServer::start();
    let _worker = demo_worker(&server);
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.add",
            "--args",
            r#"{"a":2,"b":40}"#,
            "--metadata",
            r#"{"tenant":"acme"}"#,
            "--wait",
            "20",
        ],
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = json(&out);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["value"], 42);
    assert_eq!(record["metadata"]["tenant"], "acme");
    let id = record["id"].as_str().expect("id").to_owned();

    let out = jetq(&server, &["get", &id]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out), record);

    // Without --wait it prints the id only, and the id is the one given.
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.add",
            "--args",
            r#"{"a":1,"b":1}"#,
            "--id",
            "cli-given-id",
        ],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cli-given-id");
}

#[test]
fn a_failed_request_exits_non_zero_with_its_record() {
    let server = NatsServer::start();
    let _worker = demo_worker(&server);
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.add",
            "--args",
            r#"{"a":"x"}"#,
            "--wait",
            "20",
        ],
    );
    assert!(!out.status.success());
    let record = json(&out);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["kind"], "invalid_args");
    assert_eq!(record["attempts"], 1);
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let server = NatsServer::start();
    let cases: &[(&[&str], &str)] = &[
        (&["publish", "demo.add", "--id", "a.b>"], "id"),
        (&["publish", "demo.add", "--args", "{not json"], "--args"),
        (&["publish", "demo.add", "--metadata", "[1]"], "--metadata"),
        (&["publish", "demo.*"], "task name"),
        (&["get", "no-such-id"], "no record"),
        (&["get", "a.b"], "id"),
    ];
    for (args, needle) in cases {
        let out = jetq(&server, args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[tokio::test]
async fn sigterm_releases_the_running_task_and_nothing_is_lost() {
    use jetq::Status;
    let server = NatsServer::start();
    let broker = jetq_tests::connect(&server).await;
    let client = jetq::Client::new(broker.clone());
    let mut first = demo_worker(&server);
    let slow = client
        .task("demo.sleep")
        .args(&serde_json::json!({"ms": 1500}))
        .publish()
        .await
        .unwrap();
    jetq_tests::wait_for_record(&broker, slow.id(), |r| r.status == Status::Running).await;

    let pid = first.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = tokio::task::spawn_blocking(move || first.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "the worker exits 0 after SIGTERM: {exit:?}");

    // demo.sleep honours its cancellation token, so it was released at once.
    let rec = slow.record().await.unwrap();
    assert_eq!(rec.status, Status::Retrying);
    assert_eq!(
        rec.error.as_ref().map(|e| e.kind.as_str()),
        Some("interrupted")
    );
    // Published while no worker runs: stays pending, stored.
    let later = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 1, "b": 2}))
        .publish()
        .await
        .unwrap();

    let _second = demo_worker(&server);
    let rec = match slow.wait(jetq_tests::WAIT).await {
        Ok(r) => r,
        Err(e) => panic!("{e}; record now: {:?}", slow.record().await),
    };
    assert_eq!((rec.status, rec.attempts), (Status::Succeeded, 2));
    assert_eq!(later.result::<i64>(jetq_tests::WAIT).await.unwrap(), 3);
}

/// Start `jetq-demo-worker` with a name and an ack wait.
fn named_worker(server: &NatsServer, name: &str, ack_wait: &str) -> jetq_tests::ChildProcess {
    jetq_tests::demo_worker_with(
        server,
        &["--name", name, "--ack-wait", ack_wait, "--concurrency", "4"],
    )
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    json(out)
}

/// The delivery guarantees, as the issue's done-when list walks them, with
/// the real binaries.
#[tokio::test]
async fn delivery_guarantees_tour_with_the_cli_and_the_demo_worker() {
    let server = NatsServer::start();
    let mut first = named_worker(&server, "first", "1");

    // Retried with backoff until it succeeds on the third attempt.
    let record = ok_json(&jetq(
        &server,
        &[
            "publish",
            "demo.fail",
            "--args",
            r#"{"times":2}"#,
            "--max-retries",
            "5",
            "--wait",
            "30",
        ],
    ));
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["value"], 3);

    // Retries exhausted: failed, and in the dead letters.
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.fail",
            "--args",
            r#"{"times":9}"#,
            "--max-retries",
            "1",
            "--id",
            "fails-for-good",
            "--wait",
            "30",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let record = json(&out);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["attempts"], 2);
    let out = jetq(&server, &["dead", "list"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("fails-for-good "))
        .unwrap_or_else(|| panic!("not in the dead letters:\n{table}"));
    assert!(row.contains("demo.fail"), "{row}");
    assert!(row.contains("failing on purpose: attempt 2"), "{row}");
    let out = jetq(&server, &["dead", "list", "--json"]);
    let letter: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["id"] == "fails-for-good")
        .unwrap();
    assert_eq!(letter["task"], "demo.fail");
    assert_eq!(letter["error"]["kind"], "error");
    assert_eq!(letter["attempts"], 2);
    assert_eq!(letter["request"]["args"]["times"], 9);

    // Requeued as a fresh request: fails again the same way (times 9 > 2 attempts).
    let out = jetq(
        &server,
        &["dead", "requeue", "fails-for-good", "--wait", "30"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["attempts"], 2, "attempts count from zero again");

    // A panic fails the request; the worker lives on.
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.panic",
            "--max-retries",
            "1",
            "--wait",
            "30",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let record = json(&out);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["kind"], "panic");
    assert!(first.0.try_wait().unwrap().is_none(), "the worker died");

    // Arguments of the wrong type fail at once.
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.add",
            "--args",
            r#"{"a":"x"}"#,
            "--wait",
            "30",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let record = json(&out);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["attempts"], 1);
    assert_eq!(record["error"]["kind"], "invalid_args");

    // The same id published twice runs once.
    let args = [
        "publish",
        "demo.fail",
        "--args",
        r#"{"times":0}"#,
        "--id",
        "once-only",
        "--wait",
        "30",
    ];
    let a = ok_json(&jetq(&server, &args));
    let b = ok_json(&jetq(&server, &args));
    assert_eq!(a, b, "the second publish returns the same record");
    assert_eq!(b["attempts"], 1);

    // A running demo.sleep cancelled with `jetq cancel` ends cancelled.
    let broker = jetq_tests::connect(&server).await;
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.sleep",
            "--args",
            r#"{"ms":60000}"#,
            "--id",
            "to-cancel",
        ],
    );
    assert!(out.status.success());
    jetq_tests::wait_for_record(&broker, "to-cancel", |r| r.status == jetq::Status::Running).await;
    let record = ok_json(&jetq(&server, &["cancel", "to-cancel", "--wait", "30"]));
    assert_eq!(record["status"], "cancelled");
    assert_eq!(record["error"]["kind"], "cancelled");

    // A demo.sleep whose worker is SIGKILLed mid-task ends succeeded on another worker.
    let out = jetq(
        &server,
        &[
            "publish",
            "demo.sleep",
            "--args",
            r#"{"ms":1500}"#,
            "--id",
            "survivor",
        ],
    );
    assert!(out.status.success());
    jetq_tests::wait_for_record(&broker, "survivor", |r| r.status == jetq::Status::Running).await;
    first.0.kill().unwrap(); // SIGKILL
    first.0.wait().unwrap();
    let _second = named_worker(&server, "second", "1");
    let record = jetq_tests::wait_for_record(&broker, "survivor", |r| r.status.is_terminal()).await;
    assert_eq!(record.status, jetq::Status::Succeeded);
    assert_eq!(record.attempts, 2);
    assert_eq!(record.worker.as_deref(), Some("second"));
    drop(first);
}
