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

/// Run a workspace binary, killing it if it runs longer than [`jetq_tests::WAIT`]
/// (a value that should have been refused was taken and the program runs).
fn run_bounded(bin: &str, args: &[&str]) -> Output {
    let child = Command::new(workspace_bin(bin))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(jetq_tests::WAIT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("cannot wait for {bin}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{bin} {args:?} still runs after {:?}", jetq_tests::WAIT)
        }
    }
}

#[test]
fn out_of_range_numbers_are_refused_with_one_line_naming_the_flag() {
    // Nothing listens there: every case must be refused before connecting.
    let nowhere = "nats://127.0.0.1:1";
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "jetq",
            &["publish", "demo.add", "--delay", "1e12"],
            "--delay",
        ),
        (
            "jetq",
            &["publish", "demo.add", "--delay", "NaN"],
            "--delay",
        ),
        ("jetq", &["publish", "demo.add", "--delay", "-1"], "--delay"),
        ("jetq", &["publish", "demo.add", "--wait", "inf"], "--wait"),
        ("jetq", &["publish", "demo.add", "--wait", "1e20"], "--wait"),
        (
            "jetq",
            &["publish", "demo.add", "--max-retries", "4294967295"],
            "--max-retries",
        ),
        (
            "jetq",
            &["publish", "demo.add", "--max-retries", "10001"],
            "--max-retries",
        ),
        ("jetq", &["cancel", "x", "--wait", "1e20"], "--wait"),
        ("jetq", &["cancel", "x", "--wait", "-0.5"], "--wait"),
        ("jetq", &["dead", "requeue", "x", "--wait", "NaN"], "--wait"),
        ("jetq-demo-worker", &["--ack-wait", "1e20"], "--ack-wait"),
        ("jetq-demo-worker", &["--ack-wait", "0.1"], "--ack-wait"),
        ("jetq-demo-worker", &["--ack-wait", "-inf"], "--ack-wait"),
        (
            "jetq-demo-worker",
            &["--shutdown-timeout", "1e20"],
            "--shutdown-timeout",
        ),
        (
            "jetq-demo-worker",
            &["--shutdown-timeout", "NaN"],
            "--shutdown-timeout",
        ),
        (
            "jetq-demo-worker",
            &["--connect-wait", "1e9"],
            "--connect-wait",
        ),
    ];
    for (bin, args, flag) in cases {
        let mut all = vec!["--nats", nowhere];
        all.extend_from_slice(args);
        let out = run_bounded(bin, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{bin} {args:?}: one line: {err}"
        );
        assert!(err.contains(flag), "{bin} {args:?} names {flag}: {err}");
        assert!(
            err.contains("use "),
            "{bin} {args:?} says what is allowed: {err}"
        );
        assert!(out.stdout.is_empty(), "{bin} {args:?}: nothing on stdout");
    }
    // The bounds themselves are accepted: refused later for the missing
    // server, not for the value.
    for (bin, args) in [
        (
            "jetq",
            &[
                "publish",
                "demo.add",
                "--delay",
                "315360000",
                "--max-retries",
                "10000",
            ][..],
        ),
        (
            "jetq-demo-worker",
            &[
                "--ack-wait",
                "0.3",
                "--shutdown-timeout",
                "86400",
                "--connect-wait",
                "0",
            ][..],
        ),
    ] {
        let mut all = vec!["--nats", nowhere];
        all.extend_from_slice(args);
        let out = run_bounded(bin, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} {args:?}");
        assert!(err.contains("cannot connect"), "{bin} {args:?}: {err}");
    }
}

/// Whether `bytes` hold a character a terminal acts on: ESC, another C0 or
/// C1 control (line breaks aside), or a bidirectional control.
fn has_terminal_control(bytes: &[u8]) -> bool {
    String::from_utf8_lossy(bytes).chars().any(|c| {
        (c.is_control() && c != '\n')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    })
}

#[tokio::test]
async fn dead_list_shows_a_forged_dead_letter_without_terminal_escapes() {
    use async_nats::header::HeaderMap;
    let server = NatsServer::start();
    let broker = jetq_tests::connect(&server).await;
    // An honest letter first: it creates the dead-letter stream.
    jetq::broker::Broker::put_dead_letter(
        &broker,
        jetq::DeadLetter::new(
            "honest",
            "default",
            "demo.add",
            jetq::ErrorInfo::new("error", "boom"),
            bytes::Bytes::from_static(b"{}"),
        ),
    )
    .await
    .unwrap();
    // A forged one, published with plain async-nats and jetq's headers.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut headers = HeaderMap::new();
    headers.insert("Jetq-Queue", "default");
    headers.insert("Jetq-Task", "demo\u{1b}[2J.clear");
    headers.insert("Jetq-Error-Kind", "error\u{1b}[5m");
    headers.insert(
        "Jetq-Error",
        "\u{1b}]0;pwned\u{7} \u{9b}31mred \u{202e}desrever",
    );
    headers.insert("Jetq-Attempts", "1");
    headers.insert("Jetq-Worker", "\u{1b}[31mw");
    headers.insert("Jetq-Sequence", "7");
    for subject in ["jetq.dead.forged", "jetq.dead.forged\u{1b}[31mid"] {
        js.publish_with_headers(subject, headers.clone(), "{\"task\":\"\u{1b}[2J\"}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let out = jetq(&server, &["dead", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !has_terminal_control(&out.stdout),
        "raw control characters:\n{table:?}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("forged "))
        .unwrap_or_else(|| panic!("the forged letter is listed:\n{table}"));
    assert!(
        row.contains("demo\\e[2J.clear"),
        "escaped, still readable: {row}"
    );
    assert!(row.contains("\\e]0;pwned\\x07"), "{row}");
    assert!(table.contains("forged\\e[31mid"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("honest ")), "{table}");

    let out = jetq(&server, &["dead", "list", "--json"]);
    assert!(out.status.success());
    assert!(
        !has_terminal_control(&out.stdout),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let forged: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["id"] == "forged")
        .unwrap();
    // JSON escapes them, and keeps the text exactly.
    assert_eq!(forged["task"], "demo\u{1b}[2J.clear");
    assert_eq!(forged["worker"], "\u{1b}[31mw");
    assert_eq!(
        forged["error"]["message"],
        "\u{1b}]0;pwned\u{7} \u{9b}31mred \u{202e}desrever"
    );
}

#[tokio::test]
async fn get_shows_a_forged_record_without_terminal_escapes() {
    use jetq::broker::Broker;
    let server = NatsServer::start();
    let broker = jetq_tests::connect(&server).await;
    let forged = serde_json::json!({
        "v": 1, "id": "forged", "task": "demo\u{1b}[2J.add", "queue": "default",
        "status": "failed", "value": null,
        "error": {"kind": "error", "message": "\u{1b}]0;pwned\u{7} \u{9b}31mred \u{202e}x"},
        "metadata": {"k\u{1b}": "\u{85}"}, "progress": null, "attempts": 1, "max_retries": 0,
        "enqueued_at": "2026-01-01T00:00:00Z", "started_at": null, "finished_at": null,
        "next_attempt_at": null, "worker": "\u{1b}[31mw"
    });
    broker
        .create_record("forged", serde_json::to_vec(&forged).unwrap().into())
        .await
        .unwrap();
    let out = jetq(&server, &["get", "forged"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !has_terminal_control(&out.stdout),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let record = json(&out);
    assert_eq!(record["worker"], forged["worker"], "the same text, escaped");
    assert_eq!(record["error"], forged["error"]);

    // A record that does not decode: its error line quotes the wire.
    let bad = br#"{"v":1,"id":"bad","status":"\u001b[2Jnope\u009b31m"}"#;
    broker
        .create_record("bad", bytes::Bytes::from_static(bad))
        .await
        .unwrap();
    for args in [&["get", "bad"][..], &["cancel", "bad"][..]] {
        let out = jetq(&server, args);
        assert!(
            !has_terminal_control(&out.stdout) && !has_terminal_control(&out.stderr),
            "{args:?}: {:?} {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The names of every stream on the server (the bucket is one too).
async fn stream_names(server: &NatsServer) -> Vec<String> {
    use futures_util::TryStreamExt;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    js.stream_names().try_collect().await.unwrap()
}

#[tokio::test]
async fn read_only_commands_create_nothing_on_the_server() {
    let server = NatsServer::start();
    let out = jetq(&server, &["get", "nothing-here"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no record"), "{err}");
    let out = jetq(&server, &["dead", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim().lines().count(),
        1,
        "the header only"
    );
    let out = jetq(&server, &["dead", "list", "--json"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let out = jetq(&server, &["dead", "requeue", "nothing-here"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter"));
    assert_eq!(
        stream_names(&server).await,
        Vec::<String>::new(),
        "nothing created"
    );
    // Cancelling is a write: an id with no record may be queued, so it gets
    // a `cancelled` record (with no task) that a worker honours.
    let cancelled = ok_json(&jetq(&server, &["cancel", "nothing-here"]));
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["task"], "");

    // A write still creates what it needs, and a read then finds it.
    let out = jetq(&server, &["publish", "demo.add", "--id", "now-there"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ok_json(&jetq(&server, &["get", "now-there"]))["status"],
        "pending"
    );
}

#[test]
fn without_jetstream_reads_say_that_jetstream_is_not_enabled() {
    let server = NatsServer::start_without_jetstream();
    for args in [
        &["get", "x"][..],
        &["dead", "list"][..],
        &["dead", "requeue", "x"][..],
    ] {
        let out = jetq(&server, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("JetStream is not enabled"), "{args:?}: {err}");
    }
}

/// Start `jetq-demo-worker` with its log (stdout) sent, line by line, to the
/// returned channel; stderr is piped too.
fn logged_worker(
    server: &NatsServer,
    args: &[&str],
) -> (jetq_tests::ChildProcess, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(workspace_bin("jetq-demo-worker"))
        .args(["--nats", &server.url()])
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start jetq-demo-worker: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Nobody listens any more; keep draining so the worker never blocks.
                continue;
            }
        }
    });
    (jetq_tests::ChildProcess(child), rx)
}

#[test]
fn a_worker_started_while_the_server_is_down_waits_for_it() {
    let mut server = NatsServer::start();
    server.stop();
    let (_worker, log) = logged_worker(&server, &["--connect-wait", "60"]);
    // It says it is waiting, and how long it will.
    let line = loop {
        let line = log
            .recv_timeout(jetq_tests::WAIT)
            .unwrap_or_else(|e| panic!("no 'not reachable' line from the worker: {e}"));
        if line.contains("not reachable") {
            break line;
        }
    };
    assert!(line.contains(&server.url()), "{line}");
    assert!(
        line.contains("retrying in") && line.contains("giving up in"),
        "{line}"
    );
    server.restart();
    let record = ok_json(&jetq(
        &server,
        &[
            "publish",
            "demo.add",
            "--args",
            r#"{"a":2,"b":3}"#,
            "--wait",
            "30",
        ],
    ));
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["value"], 5);
}

#[test]
fn a_worker_gives_up_on_an_absent_server_after_its_connect_wait() {
    let mut server = NatsServer::start();
    server.stop();
    let started = std::time::Instant::now();
    let (worker, log) = logged_worker(&server, &["--connect-wait", "1"]);
    let out = worker_output(worker);
    let took = started.elapsed();
    assert!(!out.status.success(), "{:?}", out.status);
    assert!(
        took < std::time::Duration::from_secs(10),
        "gave up after {took:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("cannot connect") && err.contains(&server.url()),
        "{err}"
    );
    let tries: Vec<String> = log
        .try_iter()
        .filter(|l| l.contains("not reachable"))
        .collect();
    assert!(!tries.is_empty(), "it tried again before giving up");
}

/// Wait (at most [`jetq_tests::WAIT`]) for a worker started by
/// [`logged_worker`] to exit; its status and stderr.
fn worker_output(mut worker: jetq_tests::ChildProcess) -> Output {
    use std::io::Read;
    let mut stderr = worker.0.stderr.take().unwrap();
    let pid = worker.0.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        let _ = tx.send((worker.0.wait(), text));
        drop(worker);
    });
    match rx.recv_timeout(jetq_tests::WAIT) {
        Ok((status, stderr)) => Output {
            status: status.unwrap(),
            stdout: Vec::new(),
            stderr,
        },
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("the worker still runs after {:?}", jetq_tests::WAIT)
        }
    }
}

/// The workflow commands, as the issue's checkout walks them.
#[test]
fn workflow_start_send_event_get_and_steps_run_a_checkout() {
    let server = NatsServer::start();
    let _worker = demo_worker(&server);
    let out = jetq(
        &server,
        &[
            "workflow",
            "start",
            "demo.checkout",
            "--input",
            r#"{"order":"o9"}"#,
            "--id",
            "co-cli",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "co-cli");
    let reserved = json(&jetq(
        &server,
        &["event", "get", "co-cli", "status", "--timeout", "20"],
    ));
    assert_eq!(reserved, "reserved");
    // Not set: exit 1 once the timeout passes.
    let out = jetq(
        &server,
        &["event", "get", "co-cli", "nothing", "--timeout", "0.2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    // Sending to a run that does not exist: one line, exit 2.
    let out = jetq(&server, &["send", "co-none", "--message", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workflow `co-none`"));
    let out = jetq(
        &server,
        &[
            "send",
            "co-cli",
            "--message",
            r#"{"amount":42}"#,
            "--topic",
            "payment",
            "--key",
            "pay-1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seq: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // A second start of the same id is the same run: wait for its end.
    let record = ok_json(&jetq(
        &server,
        &[
            "workflow",
            "start",
            "demo.checkout",
            "--id",
            "co-cli",
            "--wait",
            "30",
        ],
    ));
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(record["value"], serde_json::json!({"paid": 42}));
    let shipped = json(&jetq(&server, &["event", "get", "co-cli", "status"]));
    assert_eq!(shipped, "shipped");
    // The step log, as a table and as JSON.
    let out = jetq(&server, &["workflow", "steps", "co-cli"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        names,
        [
            "set_event:status",
            "deadline:recv:payment",
            "recv:payment",
            "charge",
            "sleep",
            "set_event:status"
        ],
        "{table}"
    );
    let out = jetq(&server, &["workflow", "steps", "co-cli", "--json"]);
    let steps: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps[2]["value"]["seq"], seq);
    assert_eq!(steps[2]["value"]["message"]["amount"], 42);
    assert_eq!(steps[3]["value"], 42);
    let out = jetq(&server, &["workflow", "steps", "co-none"]);
    assert_eq!(out.status.code(), Some(2));
}
