//! # jetq-nats
//!
//! The NATS JetStream implementation of jetq's [`Broker`](jetq::broker::Broker)
//! traits. Connect a [`NatsBroker`] and hand it to jetq's client and worker.
//!
//! ```no_run
//! use jetq::broker::{Broker, OutgoingRequest};
//! use jetq_nats::{NatsBroker, NatsConfig};
//!
//! # async fn run() -> jetq::Result<()> {
//! // Defaults: prefix `jetq`, one replica, file storage.
//! let broker = NatsBroker::connect("nats://127.0.0.1:4222").await?;
//!
//! // Or with options.
//! let broker = NatsBroker::connect_with(
//!     NatsConfig::new("nats://n1:4222,nats://n2:4222")
//!         .user_and_password("app", "secret")
//!         .replicas(3),
//! )
//! .await?;
//!
//! broker.ensure_queue("default").await?;
//! let ack = broker
//!     .publish(OutgoingRequest::new("req-1", "default", "images.resize", "{}".into()))
//!     .await?;
//! println!("stored at sequence {}", ack.sequence);
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout on NATS
//!
//! Every name derives from the prefix `p` (default `jetq`; `P` is it in upper case):
//!
//! | thing | name |
//! |---|---|
//! | task stream | `{P}_TASKS`: work-queue retention, subjects `{p}.tasks.>` and `{p}.delayed.>`, message schedules allowed; a request for `task` on `queue` is published on `{p}.tasks.{queue}.{task}` with `Nats-Msg-Id` = request id |
//! | delayed request | a one-shot message schedule on `{p}.delayed.{id}` (`Nats-Schedule: @at <time>`, `Nats-Schedule-Target` = the task subject); the server publishes it to the task subject when due |
//! | consumer per queue | durable pull consumer `{p}-{queue}`, filter `{p}.tasks.{queue}.>`, explicit ack |
//! | records | KV bucket `{P}_RESULTS` (stream `KV_{P}_RESULTS`), key = request id, history 1 |
//! | record changes | every committed record change is republished on `{p}.records.{id}` with its revision in `Nats-Sequence`; [`watch_record`](jetq::broker::Broker::watch_record) subscribes there, so a watch costs no server-side consumer |
//! | dead letters | stream `{P}_DEAD`, subject `{p}.dead.{id}`: the original request, the reason in `Jetq-*` headers |
//! | cancellation | core NATS subject `{p}.cancel.{id}`; workers subscribe to `{p}.cancel.*` |
//!
//! Provisioning is idempotent and safe when several processes start at once.
//! Users with restricted permissions need publish rights on `{p}.tasks.>`,
//! `{p}.delayed.>`, `{p}.dead.>`, `{p}.cancel.>`, `$KV.{P}_RESULTS.>`,
//! `$JS.API.>` and `$JS.ACK.>`, and subscribe rights on `_INBOX.>`,
//! `{p}.records.>` and `{p}.cancel.>`.
//!
//! ## Errors
//!
//! Every failure is a [`jetq::Error`]; the async-nats error, if any, is its
//! `source()`. Timeouts are [`ErrorKind::Timeout`](jetq::ErrorKind::Timeout),
//! refused credentials and unreachable servers
//! [`ErrorKind::Broker`](jetq::ErrorKind::Broker), bad options
//! [`ErrorKind::Config`](jetq::ErrorKind::Config).

mod acks;
mod broker;
mod config;
mod consumer;
mod error;
mod reader;
mod write;

pub use async_nats;
pub use broker::NatsBroker;
pub use config::{NatsConfig, Storage, DEFAULT_PREFIX};
pub use consumer::{NatsConsumer, NatsDelivery};
