//! The client: publish requests, read and wait for records.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::broker::{Broker, OutgoingRequest};
use crate::error::{Error, ErrorKind, Result};
use crate::names;
use crate::record::{Record, Status};
use crate::request::Request;

/// Publishes requests and reads records. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.broker)
            .finish()
    }
}

impl Client {
    /// A client on `broker`.
    pub fn new(broker: impl Broker) -> Self {
        Client {
            broker: Arc::new(broker),
        }
    }

    /// A client on a shared broker.
    pub fn from_arc(broker: Arc<dyn Broker>) -> Self {
        Client { broker }
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Start a request for `task`.
    pub fn task(&self, task: impl Into<String>) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            request: Request::new(task),
            error: None,
        }
    }

    /// Publish a prepared request; see [`RequestBuilder::publish`].
    pub async fn publish_request(&self, request: Request) -> Result<TaskHandle> {
        request.validate()?;
        let payload = Bytes::from(request.to_json()?);
        let handle = TaskHandle {
            client: self.clone(),
            id: request.id.clone(),
        };
        // The pending record first, atomically: it is the idempotency check
        // that outlives the broker's dedup window.
        let pending = Bytes::from(Record::pending(&request).to_json()?);
        match self.broker.create_record(&request.id, pending).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                if let Some(entry) = self.broker.get_record(&request.id).await? {
                    let existing = Record::from_json(&entry.value)?;
                    if existing.status != Status::Pending {
                        // Already running or done: the same request, not a new one.
                        return Ok(handle);
                    }
                }
                // Still pending: an earlier publish may have failed after the
                // record was written. Publish again; the broker's dedup (and
                // the worker's ownership check) keep it to one run.
            }
            Err(e) => return Err(e),
        }
        let mut outgoing = OutgoingRequest::new(
            request.id.clone(),
            request.queue.clone(),
            request.task.clone(),
            payload,
        );
        outgoing.headers = request
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.broker.publish(outgoing).await?;
        Ok(handle)
    }

    /// A handle on an existing request.
    pub fn handle(&self, id: impl Into<String>) -> TaskHandle {
        TaskHandle {
            client: self.clone(),
            id: id.into(),
        }
    }

    /// The record of request `id`; [`ErrorKind::NotFound`] if there is none.
    pub async fn record(&self, id: &str) -> Result<Record> {
        names::validate_id(id)?;
        match self.broker.get_record(id).await? {
            Some(entry) => Record::from_json(&entry.value),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no record for id `{id}`"),
            )),
        }
    }

    /// The metadata of request `id`, including what the task set.
    pub async fn metadata(&self, id: &str) -> Result<Map<String, Value>> {
        Ok(self.record(id).await?.metadata)
    }

    /// Wait until request `id` has a terminal record (watching it, not
    /// polling) and return it, whatever its status.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Record> {
        names::validate_id(id)?;
        let mut last: Option<Status> = None;
        let watch = async {
            let mut stream = self.broker.watch_record(id).await?;
            while let Some(entry) = stream.next().await {
                let record = Record::from_json(&entry?.value)?;
                last = Some(record.status);
                if record.status.is_terminal() {
                    return Ok(record);
                }
            }
            Err(Error::new(
                ErrorKind::Broker,
                format!("the watch of record `{id}` ended"),
            ))
        };
        match tokio::time::timeout(timeout, watch).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                match last {
                    Some(s) => {
                        format!("request `{id}` did not finish within {timeout:?} (status: {s})")
                    }
                    None => {
                        format!("request `{id}` did not finish within {timeout:?} (no record yet)")
                    }
                },
            )),
        }
    }
}

/// Builds one request; [`publish`](Self::publish) sends it.
#[derive(Debug)]
#[must_use = "a request is sent only by `.publish().await`"]
pub struct RequestBuilder {
    client: Client,
    request: Request,
    error: Option<Error>,
}

impl RequestBuilder {
    /// The task's arguments.
    pub fn args<T: Serialize + ?Sized>(mut self, args: &T) -> Self {
        match serde_json::to_value(args) {
            Ok(v) => self.request.args = v,
            Err(e) => self.error = Some(Error::serialization("encoding the arguments", e)),
        }
        self
    }

    /// The task's arguments as JSON.
    pub fn args_json(mut self, args: Value) -> Self {
        self.request.args = args;
        self
    }

    /// Add one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => {
                self.request.metadata.insert(key.into(), v);
            }
            Err(e) => self.error = Some(Error::serialization("encoding metadata", e)),
        }
        self
    }

    /// Merge a metadata object.
    pub fn metadata_map(mut self, map: Map<String, Value>) -> Self {
        self.request.metadata.extend(map);
        self
    }

    /// Use `id` as the request id: an idempotency key. Publishing the same id
    /// again returns a handle to the same request and runs it once.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.request.id = id.into();
        self
    }

    /// The queue (default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.request.queue = queue.into();
        self
    }

    /// Retries allowed after the first attempt (default: the task's policy).
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.request.max_retries = Some(max_retries);
        self
    }

    /// A header propagated to the task (trace context, auth).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.insert(name.into(), value.into());
        self
    }

    /// The request as it stands.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Publish. Returns once the broker has stored the request durably.
    /// Names are checked first: an invalid id, queue or task name is refused
    /// with [`ErrorKind::InvalidName`] and nothing is sent.
    pub async fn publish(self) -> Result<TaskHandle> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.client.publish_request(self.request).await
    }
}

/// A published request: its id, and ways to read its record.
#[derive(Debug, Clone)]
pub struct TaskHandle {
    client: Client,
    id: String,
}

impl TaskHandle {
    /// The request id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current record.
    pub async fn record(&self) -> Result<Record> {
        self.client.record(&self.id).await
    }

    /// The current status.
    pub async fn status(&self) -> Result<Status> {
        Ok(self.record().await?.status)
    }

    /// The current metadata, including what the task set.
    pub async fn metadata(&self) -> Result<Map<String, Value>> {
        self.client.metadata(&self.id).await
    }

    /// Wait for the terminal record, whatever its status.
    pub async fn wait(&self, timeout: Duration) -> Result<Record> {
        self.client.wait(&self.id, timeout).await
    }

    /// Wait for the task's value. A `failed` request gives
    /// [`ErrorKind::TaskFailed`], a `cancelled` one [`ErrorKind::Cancelled`],
    /// no result in time [`ErrorKind::Timeout`].
    pub async fn result<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        let record = self.wait(timeout).await?;
        match record.status {
            Status::Succeeded => record.value_as(),
            Status::Cancelled => Err(Error::new(
                ErrorKind::Cancelled,
                format!("request `{}` was cancelled", self.id),
            )),
            _ => {
                let why = record
                    .error
                    .map(|e| format!("{}: {}", e.kind, e.message))
                    .unwrap_or_else(|| "no reason recorded".to_owned());
                Err(Error::new(
                    ErrorKind::TaskFailed,
                    format!("request `{}` failed: {why}", self.id),
                ))
            }
        }
    }
}
