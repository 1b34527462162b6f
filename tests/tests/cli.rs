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
