//! Pulling deliveries from a queue's durable consumer.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use async_nats::{Client, StatusCode, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use jetq::broker::{BoxFuture, BoxStream, Consumer, Delivery, DeliveryInfo};
use jetq::{Error, ErrorKind, Result};
use tokio::time::Instant;

use crate::error::wrap;

/// A worker's handle on one queue's durable pull consumer (`{prefix}-{queue}`).
pub struct NatsConsumer {
    pub(crate) consumer: PullConsumer,
    pub(crate) client: Client,
    pub(crate) name: String,
    pub(crate) worker: String,
    /// `{prefix}.tasks.{queue}.`: what precedes the task name in a subject.
    pub(crate) subject_prefix: Arc<str>,
    /// Whether the consumer's info is as fresh as its creation (then the
    /// first read of the ack wait needs no request).
    pub(crate) fresh: bool,
    /// One subscription for every pull (`<inbox>.*`), made at the first:
    /// subscribing and unsubscribing per pull costs the server more than
    /// the pull itself. Each pull gets its own reply subject, `<inbox>.<n>`,
    /// so a status meant for an earlier pull (its expiry) does not end a
    /// later one.
    pub(crate) pulls: Option<(String, Arc<tokio::sync::Mutex<Subscriber>>)>,
    /// Pulls sent so far.
    pub(crate) pulled: u64,
}

impl fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("name", &self.name)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// Idle heartbeat to ask the server for: none for short pulls, else a third
/// of `expires`, between 0.5 s and 5 s (the server refuses a heartbeat longer
/// than half the expiry).
fn heartbeat_for(expires: Duration) -> Option<Duration> {
    if expires < Duration::from_secs(1) {
        None
    } else {
        Some((expires / 3).clamp(Duration::from_millis(500), Duration::from_secs(5)))
    }
}

impl Consumer for NatsConsumer {
    fn ack_wait(&mut self) -> BoxFuture<'_, Result<Option<Duration>>> {
        Box::pin(async move {
            if std::mem::take(&mut self.fresh) {
                return Ok(Some(self.consumer.cached_info().config.ack_wait));
            }
            let info = self.consumer.info().await.map_err(|e| {
                wrap(
                    ErrorKind::Broker,
                    format!("cannot read the settings of consumer {}", self.name),
                    e,
                )
            })?;
            Ok(Some(info.config.ack_wait))
        })
    }

    fn pull(
        &mut self,
        max: usize,
        expires: Duration,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<Box<dyn Delivery>>>>> {
        Box::pin(async move {
            if max == 0 {
                let empty: BoxStream<'static, Result<Box<dyn Delivery>>> =
                    Box::pin(futures_util::stream::empty());
                return Ok(empty);
            }
            if self.pulls.is_none() {
                let inbox = self.client.new_inbox();
                let sub = self
                    .client
                    .subscribe(format!("{inbox}.*"))
                    .await
                    .map_err(|e| {
                        wrap(
                            ErrorKind::Broker,
                            format!("cannot subscribe to pull from consumer {}", self.name),
                            e,
                        )
                    })?;
                self.pulls = Some((inbox, Arc::new(tokio::sync::Mutex::new(sub))));
            }
            let Some((inbox, sub)) = &self.pulls else {
                return Err(Error::new(ErrorKind::Broker, "no pull subscription"));
            };
            self.pulled += 1;
            let reply = format!("{inbox}.{}", self.pulled);
            // The previous pull's stream is gone by now (pulls are one at a time).
            let sub = Arc::clone(sub).lock_owned().await;
            let heartbeat = heartbeat_for(expires);
            let batch = BatchConfig {
                batch: max,
                expires: (!expires.is_zero()).then_some(expires),
                no_wait: expires.is_zero(),
                idle_heartbeat: heartbeat.unwrap_or_default(),
                ..Default::default()
            };
            self.consumer
                .request_batch(batch, reply.clone().into())
                .await
                .map_err(|e| {
                    wrap(
                        ErrorKind::Broker,
                        format!("cannot send a pull request to consumer {}", self.name),
                        e,
                    )
                })?;
            let now = Instant::now();
            let state = PullState {
                subject_prefix: Arc::clone(&self.subject_prefix),
                sub,
                reply,
                client: self.client.clone(),
                consumer: self.name.clone(),
                remaining: max,
                // The server ends the pull with a 408 at `expires`; this is the safety net.
                deadline: now + expires + Duration::from_secs(2),
                heartbeat,
                last_seen: now,
                done: false,
            };
            let stream: BoxStream<'static, Result<Box<dyn Delivery>>> =
                Box::pin(futures_util::stream::unfold(state, PullState::step));
            Ok(stream)
        })
    }
}

struct PullState {
    subject_prefix: Arc<str>,
    sub: tokio::sync::OwnedMutexGuard<Subscriber>,
    /// This pull's reply subject: statuses for others are ignored.
    reply: String,
    client: Client,
    consumer: String,
    remaining: usize,
    deadline: Instant,
    heartbeat: Option<Duration>,
    last_seen: Instant,
    done: bool,
}

type Step = Option<(Result<Box<dyn Delivery>>, PullState)>;

impl PullState {
    fn fail(mut self, err: Error) -> Step {
        self.done = true;
        Some((Err(err), self))
    }

    async fn step(mut self) -> Step {
        if self.done || self.remaining == 0 {
            return None;
        }
        loop {
            let wait_until = match self.heartbeat {
                Some(hb) => self.deadline.min(self.last_seen + hb * 3),
                None => self.deadline,
            };
            let message = match tokio::time::timeout_at(wait_until, self.sub.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    let err = Error::new(
                        ErrorKind::Broker,
                        format!(
                            "the pull from consumer {} ended because the NATS connection was closed",
                            self.consumer
                        ),
                    );
                    return self.fail(err);
                }
                Err(_) if Instant::now() >= self.deadline => return None,
                Err(_) => {
                    let err = Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "no heartbeat from the server while pulling from consumer {}; the connection may be down, pull again",
                            self.consumer
                        ),
                    );
                    return self.fail(err);
                }
            };
            self.last_seen = Instant::now();
            if message.status.is_some() && message.subject.as_str() != self.reply {
                // About an earlier pull (it expired after we stopped reading it).
                continue;
            }
            match message.status {
                None | Some(StatusCode::OK) => {
                    if message.reply.is_none() {
                        tracing::debug!(subject = %message.subject, "ignoring a pull message without reply subject");
                        continue;
                    }
                    let Some(info) = message.reply.as_deref().and_then(delivery_info) else {
                        let err = Error::new(
                            ErrorKind::Broker,
                            format!(
                                "a message from consumer {} has no JetStream metadata (its reply subject is not a JetStream acknowledgement subject)",
                                self.consumer
                            ),
                        );
                        return self.fail(err);
                    };
                    self.remaining -= 1;
                    let task_at = message
                        .subject
                        .as_str()
                        .starts_with(&*self.subject_prefix)
                        .then_some(self.subject_prefix.len());
                    let delivery = NatsDelivery {
                        message,
                        info,
                        client: self.client.clone(),
                        task_at,
                    };
                    return Some((Ok(Box::new(delivery)), self));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                // Request expired (408) or nothing to deliver for a no-wait pull (404).
                Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => return None,
                Some(StatusCode::NO_RESPONDERS) => {
                    let err = Error::new(
                        ErrorKind::Broker,
                        format!(
                            "consumer {} does not answer: it was deleted or JetStream is unavailable; call consume() again to recreate it",
                            self.consumer
                        ),
                    );
                    return self.fail(err);
                }
                Some(status) => {
                    let description = message.description.unwrap_or_default();
                    if status == StatusCode::REQUEST_TERMINATED
                        && description.to_ascii_lowercase().contains("batch completed")
                    {
                        return None;
                    }
                    let err = Error::new(
                        ErrorKind::Broker,
                        format!(
                            "pull from consumer {} ended by the server: {status} {description}; pull again",
                            self.consumer
                        ),
                    );
                    return self.fail(err);
                }
            }
        }
    }
}

/// The stream sequence and delivery count of a message, from its reply
/// subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
/// seq>.<time>.<pending>`, or with the domain and account hash first (and
/// more tokens after) as servers since 2.9 may send (ADR-15). Read here
/// rather than through async-nats' JetStream message, whose handle on the
/// JetStream context costs every delivery a copy of the context's prefix.
fn delivery_info(reply: &str) -> Option<DeliveryInfo> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let mut tokens = [""; 9];
    let mut count = 0;
    for token in rest.split('.') {
        if let Some(slot) = tokens.get_mut(count) {
            *slot = token;
        }
        count += 1;
    }
    let (delivered, sequence) = match count {
        7 => (tokens[2], tokens[3]),
        9.. => (tokens[4], tokens[5]),
        _ => return None,
    };
    Some(DeliveryInfo::new(
        sequence.parse().ok()?,
        delivered.parse().ok()?,
    ))
}

/// One delivery of a request from a [`NatsConsumer`].
pub struct NatsDelivery {
    message: async_nats::Message,
    info: DeliveryInfo,
    client: Client,
    /// Where the task name starts in the subject, if it has the queue's prefix.
    task_at: Option<usize>,
}

impl fmt::Debug for NatsDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsDelivery")
            .field("subject", &self.message.subject)
            .field("info", &self.info)
            .field("payload_len", &self.message.payload.len())
            .finish()
    }
}

impl NatsDelivery {
    /// The subject the request was published on (`{prefix}.tasks.{queue}.{task}`).
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    fn reply(&self) -> Result<async_nats::Subject> {
        self.message.reply.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Broker,
                "the delivery has no reply subject, so it cannot be acknowledged",
            )
        })
    }

    /// Send an acknowledgement and wait for the server to confirm it.
    async fn confirmed(&self, payload: Bytes, what: &str) -> Result<()> {
        let reply = self.reply()?;
        match self.client.request(reply, payload).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let kind = if e.kind() == async_nats::RequestErrorKind::TimedOut {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Broker
                };
                Err(wrap(
                    kind,
                    format!(
                        "the server did not confirm the {what} of message {}; it may be delivered again",
                        self.info.sequence
                    ),
                    e,
                ))
            }
        }
    }

    async fn send(&self, kind: AckKind, what: &str) -> Result<()> {
        let reply = self.reply()?;
        self.client
            .publish(reply, Bytes::from(kind))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Broker,
                    format!("cannot send the {what} of message {}", self.info.sequence),
                )
                .with_source(e)
            })
    }
}

impl Delivery for NatsDelivery {
    fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    fn info(&self) -> DeliveryInfo {
        self.info
    }

    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.confirmed(Bytes::from_static(b"+ACK"), "ack"))
    }

    fn ack_unconfirmed(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.send(AckKind::Ack, "ack"))
    }

    fn nak(&self, delay: Option<Duration>) -> BoxFuture<'_, Result<()>> {
        // Confirmed, like ack: a worker that naks and then exits (shutdown)
        // must not lose the nak in its write buffer, or the request would
        // wait out the whole ack wait instead of being redelivered now.
        Box::pin(self.confirmed(Bytes::from(AckKind::Nak(delay)), "nak"))
    }

    fn in_progress(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.send(AckKind::Progress, "in-progress notice"))
    }

    fn routed_task(&self) -> Option<&str> {
        // A subject outside the queue's (it cannot be, given the consumer's
        // filter) names no task; an empty string then refuses any envelope.
        Some(
            self.task_at
                .and_then(|at| self.message.subject.as_str().get(at..))
                .unwrap_or(""),
        )
    }

    fn fired_by_schedule(&self) -> bool {
        self.message
            .headers
            .as_ref()
            .is_some_and(|h| h.get("Nats-Scheduler").is_some())
    }

    fn dedup_key(&self) -> Option<&str> {
        self.message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str())
    }

    fn term(&self, reason: &str) -> BoxFuture<'_, Result<()>> {
        // `+TERM <reason>` carries the reason into the server's advisory.
        let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        Box::pin(async move {
            let payload = if reason.trim().is_empty() {
                Bytes::from_static(b"+TERM")
            } else {
                Bytes::from(format!("+TERM {}", reason.trim()))
            };
            match self.confirmed(payload, "termination").await {
                Ok(()) => Ok(()),
                Err(err) => {
                    tracing::debug!(error = %err, "+TERM with reason not confirmed; sending a plain +TERM");
                    self.send(AckKind::Term, "termination").await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::delivery_info;

    #[test]
    fn delivery_info_reads_both_forms_of_the_reply_subject() {
        let old = delivery_info("$JS.ACK.JETQ.jetq-default.3.42.17.1700000000000000000.5")
            .expect("the 7-token form");
        assert_eq!((old.sequence, old.delivered), (42, 3));
        let new = delivery_info(
            "$JS.ACK.hub.ACCHASH.JETQ.jetq-default.2.7.6.1700000000000000000.0.r4nd0m",
        )
        .expect("the form with domain and account hash");
        assert_eq!((new.sequence, new.delivered), (7, 2));
        let without_random = delivery_info("$JS.ACK._.ACCHASH.JETQ.c.1.9.9.1700000000000000000.0")
            .expect("the new form without its random token");
        assert_eq!((without_random.sequence, without_random.delivered), (9, 1));
        for bad in [
            "_INBOX.abc",
            "$JS.ACK.JETQ.c.x.1.1.1.1",
            "$JS.ACK.JETQ.c.1.1",
            "$JS.ACK.JETQ.c.1.1.1.1.1.1",
        ] {
            assert!(delivery_info(bad).is_none(), "{bad}");
        }
    }
}
