//! `jetq`: publish, cancel and requeue requests, read records and dead
//! letters from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use jetq::{Client, Record, Status};
use jetq_cli::args::{self, MAX_WAIT};
use jetq_cli::display::{cell, escape, json_safe};
use jetq_middleware::auth::{AuthContext, AuthKey, SignAuth, TokenAuth};
use serde_json::{Map, Value};

/// Durable background tasks on NATS JetStream: publish, cancel and requeue
/// requests, read records and dead letters.
///
/// Exit codes: 0 success; 1 the request did not succeed (or could not be
/// cancelled); 2 an error (one line on stderr).
#[derive(Debug, Parser)]
#[command(name = "jetq", version, about)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish a request; prints its id, or with --wait its final record as JSON.
    Publish {
        /// Task name, e.g. `demo.add`.
        task: String,
        /// Arguments as JSON.
        #[arg(long, default_value = "null")]
        args: String,
        /// Request id (an idempotency key); default: a new UUID.
        #[arg(long)]
        id: Option<String>,
        /// Metadata as a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// Retries allowed after the first attempt, at most 10000 (default:
        /// the task's policy).
        #[arg(long, allow_hyphen_values = true, value_parser = args::max_retries())]
        max_retries: Option<u32>,
        /// Queue.
        #[arg(long, default_value = jetq::request::DEFAULT_QUEUE)]
        queue: String,
        /// Run no sooner than this many seconds from now, at most about ten
        /// years (durable: the server holds the request until then).
        #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, value_parser = args::seconds(Duration::ZERO, jetq::request::MAX_DELAY))]
        delay: Option<Duration>,
        /// Wait up to this many seconds (at most 365 days) for the final
        /// record and print it; the exit code is 0 only if it succeeded.
        #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, value_parser = args::seconds(Duration::ZERO, MAX_WAIT))]
        wait: Option<Duration>,
        /// Signing the request (boxed: the other commands are small).
        #[command(flatten)]
        auth: Box<AuthFlags>,
    },
    /// Print the record of a request as JSON.
    Get {
        /// Request id.
        id: String,
    },
    /// Cancel a request: one not started never runs; a running one has its
    /// cancellation token fired. Prints the record as JSON; exit code 1 if
    /// it had already finished.
    Cancel {
        /// Request id.
        id: String,
        /// Wait up to this many seconds (at most 365 days) for the final
        /// record and print it; the exit code is 0 only if it ended `cancelled`.
        #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, value_parser = args::seconds(Duration::ZERO, MAX_WAIT))]
        wait: Option<Duration>,
    },
    /// Dead letters: requests that failed for good.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Durable workflows: start one, read its step log.
    Workflow {
        #[command(subcommand)]
        command: WorkflowCommand,
    },
    /// Send a message to a workflow, for a `recv` of it (a run waiting for
    /// it is woken at once); prints the message's sequence in the mailbox.
    Send {
        /// Workflow id.
        id: String,
        /// The message as JSON.
        #[arg(long)]
        message: String,
        /// Topic (default: none).
        #[arg(long)]
        topic: Option<String>,
        /// Idempotency key: the same key sends once.
        #[arg(long)]
        key: Option<String>,
    },
    /// Workflow events.
    Event {
        #[command(subcommand)]
        command: EventCommand,
    },
}

#[derive(Debug, Subcommand)]
enum WorkflowCommand {
    /// Start a workflow; prints its id, or with --wait its final record as
    /// JSON. With --id it starts once: a second start returns the same run.
    Start {
        /// Workflow name, e.g. `demo.checkout`.
        name: String,
        /// Input as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// Workflow id; default: a new UUID.
        #[arg(long)]
        id: Option<String>,
        /// Metadata as a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// Queue.
        #[arg(long, default_value = jetq::request::DEFAULT_QUEUE)]
        queue: String,
        /// Wait up to this many seconds (at most 365 days) for the final
        /// record and print it; the exit code is 0 only if it succeeded.
        #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, value_parser = args::seconds(Duration::ZERO, MAX_WAIT))]
        wait: Option<Duration>,
    },
    /// Print the step log of a workflow: position, name, outcome, time.
    Steps {
        /// Workflow id.
        id: String,
        /// One JSON object per line (the checkpoints as stored) instead of a
        /// table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EventCommand {
    /// Print the value of an event as JSON; exit code 1 if it is not set
    /// within the timeout.
    Get {
        /// Workflow id.
        id: String,
        /// Event key.
        key: String,
        /// Wait up to this many seconds (at most 365 days) for it to be set.
        #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, default_value = "0", value_parser = args::seconds(Duration::ZERO, MAX_WAIT))]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
    /// List dead letters, oldest first: id, task, reason, time.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line (with queue, attempts, worker and the
        /// original request) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish a dead-lettered request again as a fresh request with the same
    /// id (attempts start from zero) and remove its dead letter; prints the id.
    Requeue {
        /// Request id.
        id: String,
        /// Wait up to this many seconds (at most 365 days) for the final
        /// record and print it; the exit code is 0 only if it succeeded.
        #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, value_parser = args::seconds(Duration::ZERO, MAX_WAIT))]
        wait: Option<Duration>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = args::parse("jetq");
    match run(cli).await {
        Ok(code) => code,
        Err(msg) => {
            // Errors can quote the wire (a record that does not decode).
            eprintln!("jetq: {}", escape(&msg));
            ExitCode::from(2)
        }
    }
}

/// `println!` that fails (instead of panicking) when stdout is closed, as
/// when the output is piped into `head`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| format!("cannot write to stdout: {e}"))
    }};
}

fn parse_json(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("--{what} is not valid JSON ({e}): {text}"))
}

fn print_record(record: &Record) -> Result<(), String> {
    let text =
        serde_json::to_string(record).map_err(|e| format!("cannot encode the record: {e}"))?;
    out!("{}", json_safe(&text))?;
    Ok(())
}

/// Print the id, or wait for the final record and print it.
async fn finish(handle: jetq::TaskHandle, wait: Option<Duration>) -> Result<ExitCode, String> {
    match wait {
        None => {
            out!("{}", handle.id())?;
            Ok(ExitCode::SUCCESS)
        }
        Some(timeout) => {
            let record = handle.wait(timeout).await.map_err(|e| e.to_string())?;
            print_record(&record)?;
            Ok(if record.status == Status::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn time_text(t: jetq::time::OffsetDateTime) -> String {
    t.format(&jetq::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// One dead letter as `jetq dead list --json` prints it.
#[derive(serde::Serialize)]
struct DeadLetterJson<'a> {
    id: &'a str,
    queue: &'a str,
    task: &'a str,
    error: &'a jetq::ErrorInfo,
    attempts: u32,
    died_at: String,
    worker: &'a str,
    sequence: u64,
    /// The original request: JSON if it is JSON, else its text.
    request: Value,
}

fn dead_letter_json(letter: &jetq::DeadLetter) -> Result<String, String> {
    let request = serde_json::from_slice::<Value>(&letter.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&letter.payload).into_owned()));
    serde_json::to_string(&DeadLetterJson {
        id: &letter.id,
        queue: &letter.queue,
        task: &letter.task,
        error: &letter.error,
        attempts: letter.attempts,
        died_at: time_text(letter.died_at),
        worker: &letter.worker,
        sequence: letter.sequence,
        request,
    })
    .map(|text| json_safe(&text).into_owned())
    .map_err(|e| format!("cannot encode a dead letter: {e}"))
}

async fn connect(url: &str) -> Result<Client, String> {
    let broker = jetq_nats::NatsBroker::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    // A person publishing from the command line wants `jetq get` to find the
    // request at once: one record write more per publish.
    Ok(Client::new(broker).pending_records(true))
}

/// The auth flags of `jetq publish`.
#[derive(Debug, clap::Args)]
struct AuthFlags {
    /// Sign the request for this user: a token bound to the request in its
    /// `authorization` header (needs --auth-key-file).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// The user's roles, comma-separated (with --user).
    #[arg(long, value_name = "ROLES", value_delimiter = ',')]
    roles: Option<Vec<String>>,
    /// The key that signs the token: a file holding a shared secret or an
    /// Ed25519 private key (PKCS#8 PEM) (with --user).
    #[arg(long = "auth-key-file", value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Seconds the token lives, counted from when the request is due
    /// (default 3600; 1 to 31536000) (with --user).
    #[arg(long = "auth-ttl", value_name = "SECONDS", allow_hyphen_values = true, value_parser = args::seconds(Duration::from_secs(1), MAX_WAIT))]
    ttl: Option<Duration>,
}

/// The publish middleware that signs the request, when `--user` is given;
/// checked before connecting, so that a missing flag or a bad key file is
/// refused even with no server.
fn signer(flags: AuthFlags) -> Result<Option<SignAuth>, String> {
    let AuthFlags {
        user,
        roles,
        key_file,
        ttl,
    } = flags;
    let (user, key_file) = match (user, key_file) {
        (Some(user), Some(key_file)) => (user, key_file),
        (Some(_), None) => {
            return Err(
                "--user needs --auth-key-file PATH, the key that signs the request".to_owned(),
            )
        }
        (None, Some(_)) => {
            return Err("--auth-key-file needs --user USER, who the request runs for".to_owned())
        }
        (None, None) => {
            if roles.is_some() {
                return Err("--roles needs --user and --auth-key-file".to_owned());
            }
            if ttl.is_some() {
                return Err("--auth-ttl needs --user and --auth-key-file".to_owned());
            }
            return Ok(None);
        }
    };
    if user.trim().is_empty() {
        return Err("--user must not be empty".to_owned());
    }
    let key = AuthKey::from_file(&key_file).map_err(|e| e.to_string())?;
    if !key.can_sign() {
        return Err(format!(
            "auth key file {} holds an Ed25519 public key, which can only verify; \
             sign with the private key (PKCS#8 PEM) or the shared secret",
            key_file.display()
        ));
    }
    let roles: Vec<String> = roles
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect();
    let context = AuthContext::new(user).with_roles(roles);
    let mut sign = SignAuth::new(TokenAuth::new(key), context).map_err(|e| e.to_string())?;
    if let Some(ttl) = ttl {
        sign = sign.with_ttl(ttl);
    }
    Ok(Some(sign))
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Publish {
            task,
            args,
            id,
            metadata,
            max_retries,
            queue,
            delay,
            wait,
            auth,
        } => {
            let args = parse_json("args", &args)?;
            let metadata = parse_metadata(metadata)?;
            // Check names before connecting, so a bad id is refused even with no server.
            if let Some(id) = &id {
                jetq::names::validate_id(id).map_err(|e| e.to_string())?;
            }
            jetq::names::validate_task(&task).map_err(|e| e.to_string())?;
            jetq::names::validate_queue(&queue).map_err(|e| e.to_string())?;
            let signer = signer(*auth)?;
            let mut client = connect(&cli.nats).await?;
            if let Some(sign) = signer {
                client = client.middleware(sign);
            }
            let mut request = client
                .task(task)
                .args_json(args)
                .metadata_map(metadata)
                .queue(queue);
            if let Some(id) = id {
                request = request.id(id);
            }
            if let Some(n) = max_retries {
                request = request.max_retries(n);
            }
            if let Some(delay) = delay {
                request = request.delay(delay);
            }
            let handle = request.publish().await.map_err(|e| e.to_string())?;
            finish(handle, wait).await
        }
        Command::Get { id } => {
            jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
            let client = connect(&cli.nats).await?;
            let record = client.record(&id).await.map_err(|e| e.to_string())?;
            print_record(&record)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id, wait } => {
            jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
            let client = connect(&cli.nats).await?;
            let mut record = client.cancel(&id).await.map_err(|e| e.to_string())?;
            if let Some(timeout) = wait {
                if !record.status.is_terminal() {
                    record = client.wait(&id, timeout).await.map_err(|e| e.to_string())?;
                }
            }
            print_record(&record)?;
            let cancelled = record.status == Status::Cancelled
                || (!record.status.is_terminal() && record.cancel_requested_at.is_some());
            Ok(if cancelled {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Dead { command } => match command {
            DeadCommand::List { limit, json } => {
                let client = connect(&cli.nats).await?;
                let letters = client
                    .dead_letters(limit)
                    .await
                    .map_err(|e| e.to_string())?;
                if json {
                    for letter in &letters {
                        out!("{}", dead_letter_json(letter)?)?;
                    }
                } else {
                    // Every cell comes from the wire: escaped, so a forged
                    // dead letter cannot put terminal escapes on the screen.
                    let rows: Vec<[String; 4]> = letters
                        .iter()
                        .map(|l| {
                            [
                                cell(&l.id, 200),
                                cell(&l.task, 200),
                                time_text(l.died_at),
                                cell(&format!("{}: {}", l.error.kind, l.error.message), 120),
                            ]
                        })
                        .collect();
                    let (width, task_width) =
                        (column_width(&rows, 0, 2), column_width(&rows, 1, 4));
                    out!(
                        "{:width$}  {:task_width$}  {:30}  REASON",
                        "ID",
                        "TASK",
                        "TIME"
                    )?;
                    for [id, task, time, reason] in &rows {
                        out!("{id:width$}  {task:task_width$}  {time:30}  {reason}")?;
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            DeadCommand::Requeue { id, wait } => {
                jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
                let client = connect(&cli.nats).await?;
                let handle = client.requeue(&id).await.map_err(|e| e.to_string())?;
                finish(handle, wait).await
            }
        },
        Command::Workflow { command } => match command {
            WorkflowCommand::Start {
                name,
                input,
                id,
                metadata,
                queue,
                wait,
            } => {
                let input = parse_json("input", &input)?;
                let metadata = parse_metadata(metadata)?;
                if let Some(id) = &id {
                    jetq::names::validate_id(id).map_err(|e| e.to_string())?;
                }
                jetq::names::validate_task(&name).map_err(|e| e.to_string())?;
                jetq::names::validate_queue(&queue).map_err(|e| e.to_string())?;
                let client = connect(&cli.nats).await?;
                let mut request = client
                    .workflow(name)
                    .args_json(input)
                    .metadata_map(metadata)
                    .queue(queue);
                if let Some(id) = id {
                    request = request.id(id);
                }
                let handle = request.publish().await.map_err(|e| e.to_string())?;
                finish(handle, wait).await
            }
            WorkflowCommand::Steps { id, json } => {
                jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
                let client = connect(&cli.nats).await?;
                // The run must exist: a typo is an error, not an empty log.
                client.record(&id).await.map_err(|e| e.to_string())?;
                let steps = client.steps(&id).await.map_err(|e| e.to_string())?;
                if json {
                    for step in &steps {
                        let text = serde_json::to_string(step)
                            .map_err(|e| format!("cannot encode a step: {e}"))?;
                        out!("{}", json_safe(&text))?;
                    }
                } else {
                    let rows: Vec<[String; 4]> = steps
                        .iter()
                        .map(|s| {
                            let outcome = match (&s.error, &s.value) {
                                (Some(e), _) => format!("error {}: {}", e.kind, e.message),
                                (None, v) => format!(
                                    "value {}",
                                    serde_json::to_string(v.as_ref().unwrap_or(&Value::Null))
                                        .unwrap_or_default()
                                ),
                            };
                            [
                                s.position.to_string(),
                                cell(&s.name, 200),
                                cell(&outcome, 120),
                                time_text(s.at),
                            ]
                        })
                        .collect();
                    let (name_width, outcome_width) =
                        (column_width(&rows, 1, 4), column_width(&rows, 2, 7));
                    out!(
                        "{:>3}  {:name_width$}  {:outcome_width$}  TIME",
                        "POS",
                        "NAME",
                        "OUTCOME"
                    )?;
                    for [pos, name, outcome, time] in &rows {
                        out!("{pos:>3}  {name:name_width$}  {outcome:outcome_width$}  {time}")?;
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Send {
            id,
            message,
            topic,
            key,
        } => {
            let message = parse_json("message", &message)?;
            jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
            jetq::names::topic_token(topic.as_deref()).map_err(|e| e.to_string())?;
            if let Some(key) = &key {
                jetq::names::validate_key("idempotency key", key).map_err(|e| e.to_string())?;
            }
            let client = connect(&cli.nats).await?;
            let mut send = client.send(&id, &message);
            if let Some(topic) = topic {
                send = send.topic(topic);
            }
            if let Some(key) = key {
                send = send.key(key);
            }
            let seq = send.await.map_err(|e| e.to_string())?;
            out!("{seq}")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Event { command } => match command {
            EventCommand::Get { id, key, timeout } => {
                jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
                jetq::names::validate_key("event key", &key).map_err(|e| e.to_string())?;
                let client = connect(&cli.nats).await?;
                let value: Option<Value> = client
                    .get_event(&id, &key, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                match value {
                    Some(value) => {
                        let text = serde_json::to_string(&value)
                            .map_err(|e| format!("cannot encode the event: {e}"))?;
                        out!("{}", json_safe(&text))?;
                        Ok(ExitCode::SUCCESS)
                    }
                    None => {
                        eprintln!("jetq: event `{key}` of `{id}` is not set");
                        Ok(ExitCode::from(1))
                    }
                }
            }
        },
    }
}

/// The width of column `i` of a table: its widest cell, at least `min`
/// (the header's width).
fn column_width<const N: usize>(rows: &[[String; N]], i: usize, min: usize) -> usize {
    rows.iter()
        .map(|r| r[i].chars().count())
        .max()
        .unwrap_or(min)
        .max(min)
}

fn parse_metadata(metadata: Option<String>) -> Result<Map<String, Value>, String> {
    match metadata {
        None => Ok(Map::new()),
        Some(text) => match parse_json("metadata", &text)? {
            Value::Object(map) => Ok(map),
            _ => Err(format!("--metadata must be a JSON object: {text}")),
        },
    }
}
