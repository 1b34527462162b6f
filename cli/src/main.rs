//! `jetq`: publish requests and read records from the command line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use jetq::{Client, Record, Status};
use serde_json::{Map, Value};

/// Durable background tasks on NATS JetStream: publish requests, read records.
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
        /// Retries allowed after the first attempt (default: the task's policy).
        #[arg(long)]
        max_retries: Option<u32>,
        /// Queue.
        #[arg(long, default_value = jetq::request::DEFAULT_QUEUE)]
        queue: String,
        /// Wait up to this many seconds for the final record and print it;
        /// the exit code is 0 only if it succeeded.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
    },
    /// Print the record of a request as JSON.
    Get {
        /// Request id.
        id: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("jetq: {msg}");
            ExitCode::from(2)
        }
    }
}

fn parse_json(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("--{what} is not valid JSON ({e}): {text}"))
}

fn print_record(record: &Record) -> Result<(), String> {
    let text =
        serde_json::to_string(record).map_err(|e| format!("cannot encode the record: {e}"))?;
    println!("{text}");
    Ok(())
}

async fn connect(url: &str) -> Result<Client, String> {
    let broker = jetq_nats::NatsBroker::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Client::new(broker))
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
            wait,
        } => {
            let args = parse_json("args", &args)?;
            let metadata: Map<String, Value> = match metadata {
                None => Map::new(),
                Some(text) => match parse_json("metadata", &text)? {
                    Value::Object(map) => map,
                    _ => return Err(format!("--metadata must be a JSON object: {text}")),
                },
            };
            let timeout = match wait {
                Some(s) if !(s.is_finite() && s >= 0.0) => {
                    return Err(format!("--wait must be a number of seconds, not {s}"))
                }
                Some(s) => Some(Duration::from_secs_f64(s)),
                None => None,
            };
            // Check names before connecting, so a bad id is refused even with no server.
            if let Some(id) = &id {
                jetq::names::validate_id(id).map_err(|e| e.to_string())?;
            }
            jetq::names::validate_task(&task).map_err(|e| e.to_string())?;
            jetq::names::validate_queue(&queue).map_err(|e| e.to_string())?;
            let client = connect(&cli.nats).await?;
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
            let handle = request.publish().await.map_err(|e| e.to_string())?;
            match timeout {
                None => {
                    println!("{}", handle.id());
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
        Command::Get { id } => {
            jetq::names::validate_id(&id).map_err(|e| e.to_string())?;
            let client = connect(&cli.nats).await?;
            let record = client.record(&id).await.map_err(|e| e.to_string())?;
            print_record(&record)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
