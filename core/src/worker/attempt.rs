//! One delivery's life: checks, claim, the task, and its outcome.

use super::*;

/// A request held back until this long before its due time is put back.
pub(super) const EARLY_TOLERANCE: Duration = Duration::from_millis(500);

/// A delivery's places in the worker: among those taken (`reading`), and its
/// task slot if it was reserved when it was pulled (not reading ahead).
pub(super) struct Taken {
    pub(super) reading: tokio::sync::OwnedSemaphorePermit,
    pub(super) slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// One delivery's life: check it, claim its record, run the task, write the
/// outcome and settle the message. It moves through three allowances, each
/// as large as the worker's concurrency: `reading` (pulled, its record
/// read), a task slot ([`Env::slots`], while the task runs) and
/// [`Env::concluding`] (its outcome written and the message settled), so
/// that one delivery's record is read and another's outcome written while a
/// third runs.
pub(super) async fn process(
    env: Arc<Env>,
    queue: String,
    delivery: Box<dyn Delivery>,
    taken: Taken,
    ack_wait: Arc<SharedAckWait>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) {
    let info = delivery.info();
    // Shared: the attempt's future keeps a pointer, not the request, and its
    // record writer and its task's context share it.
    let request = match Request::from_json(delivery.payload()) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            let reason = format!("invalid request envelope: {e}");
            return Box::pin(poison(
                &env,
                &queue,
                &*delivery,
                kinds::INVALID_REQUEST,
                reason,
            ))
            .await;
        }
    };
    // A message must not speak for another request, task or queue: refuse
    // it without touching any record.
    if let Err(reason) = check_routing(&request, &queue, &*delivery) {
        return Box::pin(poison(
            &env,
            &queue,
            &*delivery,
            kinds::INVALID_REQUEST,
            reason,
        ))
        .await;
    }
    let span = info_span!("jetq.task", task = %request.task, id = %request.id, queue = %queue, seq = info.sequence);
    // Boxed: this future is spawned (or boxed) whole, and with the attempt's
    // inline it would be an allocation above 1 KiB, which glibc's allocator
    // serves slowly; two below it cost less.
    Box::pin(async move {
        let entry = env
            .registry
            .get(&queue)
            .and_then(|tasks| tasks.get(&request.task))
            .cloned();
        let max_retries = request
            .max_retries
            .or(entry.as_ref().map(|e| e.retry.max_retries))
            .unwrap_or(crate::request::DEFAULT_MAX_RETRIES)
            .min(MAX_RETRIES_LIMIT);
        // The backstop: whatever keeps this message coming back, it ends here.
        let budget = delivery_budget(max_retries);
        if info.delivered > budget {
            return Box::pin(abandon(&env, &queue, &*delivery, &request, budget)).await;
        }
        // A message this worker already has an attempt for (checked after
        // the backstop, which ends even such a message): the server
        // delivered it again because its ack wait passed without a keep-alive
        // (they could not reach it during a reconnection, or the runtime was
        // blocked). That attempt settles the message; this delivery leaves it
        // alone (and keeps it from being delivered again meanwhile), rather
        // than take over a record whose attempt is alive.
        let Some(_live) = env.take_live(info.sequence) else {
            debug!(
                seq = info.sequence,
                "delivered again while its attempt runs here; leaving it to that attempt"
            );
            let _ = delivery.in_progress().await;
            return;
        };
        let now = OffsetDateTime::now_utc();
        // A due time no broker can hold: fail it (below, once claimed).
        let refuse = request.check_due(now).err().map(|e| {
            TaskError::permanent(format!("not_before: {}", e.message()))
                .with_kind(kinds::INVALID_REQUEST)
        });
        if let (Some(due), None) = (request.not_before, &refuse) {
            if let Ok(early) = Duration::try_from(due - now) {
                // Delivered before it is due (a producer that bypassed the
                // schedule, or clocks apart): put it back until then, no
                // attempt counted; unless it was cancelled meanwhile.
                if early > EARLY_TOLERANCE {
                    if Box::pin(ended_before_due(&env, &request.id)).await {
                        debug!("cancelled or finished before it was due; dropping it");
                        if let Err(e) = delivery.ack().await {
                            warn!(error = %e, "cannot acknowledge a dropped delivery");
                        }
                    } else {
                        debug!("not due for {early:?}; putting it back");
                        if let Err(e) = delivery.nak(Some(early)).await {
                            warn!(error = %e, "cannot put back a request that is not due");
                        }
                    }
                    return;
                }
            }
        }
        let claimed = if runs_unread(&env, &request, &*delivery) {
            Ok(unread_claim(&env, &request, &*delivery, max_retries))
        } else {
            own(Box::pin(claim(&env, &request, &*delivery, max_retries))).await
        };
        let claim = match claimed {
            Ok(c) => c,
            Err(e) => {
                let delay = release_delay(info.delivered);
                warn!(error = %e, "cannot claim the record; releasing the request for {delay:?}");
                let _ = delivery.nak(Some(delay)).await;
                return;
            }
        };
        let (writer, attempt) = match claim {
            Claim::Skip(why) => {
                debug!("dropping delivery: {why}");
                if let Err(e) = delivery.ack().await {
                    warn!(error = %e, "cannot acknowledge a dropped delivery");
                }
                return;
            }
            Claim::Leave(why) => {
                debug!("leaving the delivery alone: {why}");
                return;
            }
            Claim::NotOwner(reason) => {
                return Box::pin(poison(&env, &queue, &*delivery, kinds::ID_CONFLICT, reason)).await;
            }
            Claim::Bury(record) => {
                Box::pin(bury(&env, &*delivery, &record)).await;
                return;
            }
            Claim::Terminate => {
                if let Err(e) = delivery.term("jetq: failed (dead-lettered)").await {
                    warn!(error = %e, "cannot terminate a dead-lettered request");
                }
                return;
            }
            Claim::Fail(writer, err) => {
                own(Box::pin(finish_failed(&env, &writer, &*delivery, &err))).await;
                return;
            }
            Claim::GiveUp(writer, attempt) => {
                let last = writer.current().await.error;
                let last = match last {
                    Some(e) => format!("; the last error reported: {}: {}", e.kind, e.message),
                    None => String::new(),
                };
                let err = TaskError::permanent(format!(
                    "gave up after {} attempts: the last one did not report back within the ack wait (its worker stopped, died or lost its connection to NATS){last}",
                    attempt.saturating_sub(1)
                ))
                .with_kind(kinds::ABANDONED);
                own(Box::pin(finish_failed(&env, &writer, &*delivery, &err))).await;
                return;
            }
            Claim::Run(writer, attempt) => (writer, attempt),
        };
        if let Some(err) = refuse {
            own(Box::pin(finish_failed(&env, &writer, &*delivery, &err))).await;
            return;
        }
        let Some(entry) = entry else {
            let registered: Vec<&String> = env
                .registry
                .get(&queue)
                .map(|t| t.keys().collect::<BTreeSet<_>>().into_iter().collect())
                .unwrap_or_default();
            let err = TaskError::permanent(format!(
                "task `{}` is not registered on queue `{queue}` (registered: {})",
                request.task,
                registered
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .with_kind(kinds::UNKNOWN_TASK);
            own(Box::pin(finish_failed(&env, &writer, &*delivery, &err))).await;
            return;
        };

        // `cancel` is the task's token: it fires on shutdown (the worker
        // fires every registered attempt's token after `stop`), on a
        // client's cancellation and when the attempt lost its record;
        // the writer's `cancelled_by_client` tells the first two apart.
        let cancel = CancellationToken::new();
        let _registration = env.register(&writer, &cancel);
        if stop.is_cancelled() {
            // Registered after the shutdown fired the running ones.
            cancel.cancel();
        }
        // A place to run: at once, unless the worker read ahead while every
        // slot was busy; the delivery is kept alive meanwhile.
        let Taken { reading, slot } = taken;
        if stop.is_cancelled() && Box::pin(released_at_stop(&env, &writer, &*delivery, &request)).await {
            return;
        }
        let slot = match slot.or_else(|| Arc::clone(&env.slots).try_acquire_owned().ok()) {
            Some(slot) => slot,
            // Boxed: only a delivery that waits pays for the wait's future.
            None => match Box::pin(wait_for_slot(&env, &*delivery, &ack_wait)).await {
                Some(slot) => slot,
                None => return,
            },
        };
        drop(reading);
        if stop.is_cancelled() && Box::pin(released_at_stop(&env, &writer, &*delivery, &request)).await {
            return;
        }
        if writer.is_cancelled_by_client() {
            // Cancelled while it waited for a slot: it does not start.
            let now = OffsetDateTime::now_utc();
            let change = |r: &mut Record| r.mark_cancelled(now);
            own(Box::pin(conclude(&env, &writer, &*delivery, &change, Settle::Ack))).await;
            return;
        }
        let ignore_result = request.ignore_result;
        let ctx = Context {
            inner: Arc::new(ContextInner {
                request: Arc::clone(&request),
                attempt,
                max_retries,
                worker: env.name.clone(),
                cancel: cancel.clone(),
                shared: Arc::clone(&env.shared),
                sink: Arc::clone(&writer) as Arc<dyn RecordSink>,
                timeout: entry.timeout,
                client: env.client.clone(),
                suspend_after: env.suspend_after,
                extensions: std::sync::OnceLock::new(),
            }),
        };
        debug!(attempt, "running");
        let kept = ctx.clone();
        // Boxed: the task's future and its watchers, inline, would make
        // the attempt's future (held for the delivery's whole life) an
        // allocation above 1 KiB, which glibc's allocator serves slowly.
        let outcome = Box::pin(run_watched(
            &env,
            &entry,
            ctx,
            &*delivery,
            &writer,
            Watchers {
                ack_wait: &ack_wait,
                cancel: &cancel,
                hard_stop: &hard_stop,
            },
        ))
        .await;
        // The task is done with its slot; the outcome's writes hold a place
        // of their own.
        let _concluding = own(Arc::clone(&env.concluding).acquire_owned()).await;
        drop(slot);
        if writer.is_cancelled_by_client() {
            info!(attempt, "attempt ended after a cancellation");
            let now = OffsetDateTime::now_utc();
            let change = |r: &mut Record| r.mark_cancelled(now);
            own(Box::pin(conclude(&env, &writer, &*delivery, &change, Settle::Ack))).await;
            return;
        }
        match outcome {
            // A workflow waits without holding the worker.
            Some(Err(ref e)) if e.suspension().is_some() => {
                if let Some(suspension) = e.suspension() {
                    own(Box::pin(suspend(&env, &writer, &*delivery, kept.request(), suspension))).await;
                }
            }
            // Nobody reads its result and nothing of this attempt is stored:
            // the acknowledgement is all there is to write.
            Some(Ok(_)) if ignore_result && writer.untouched().await => {
                if let Err(e) = own(delivery.ack_unconfirmed()).await {
                    warn!(error = %e, "acknowledgement failed; the request may run again");
                }
            }
            Some(Ok(value)) => {
                let now = OffsetDateTime::now_utc();
                let change = |r: &mut Record| {
                    r.status = Status::Succeeded;
                    r.value = Some(value.clone());
                    r.error = None;
                    r.finished_at = Some(now);
                    r.next_attempt_at = None;
                };
                own(Box::pin(conclude(&env, &writer, &*delivery, &change, Settle::Ack))).await;
            }
            // Shutting down: a task that stopped early (or could not finish in
            // time) goes back for immediate redelivery instead of counting as a
            // failure. A permanent error still fails it: another worker could not do better.
            Some(Err(ref e)) if cancel.is_cancelled() && e.is_retryable() => {
                own(Box::pin(release(&env, &writer, &*delivery))).await
            }
            None => own(Box::pin(release(&env, &writer, &*delivery))).await,
            Some(Err(err)) => {
                let retry_no = attempt; // retries done after this attempt
                if err.is_retryable() && retry_no <= max_retries {
                    let delay = match err.retry() {
                        Retry::After(d) => d,
                        _ => entry.retry.delay(retry_no),
                    }
                    .min(MAX_DELAY);
                    let now = OffsetDateTime::now_utc();
                    let due = time::Duration::try_from(delay)
                        .ok()
                        .and_then(|d| now.checked_add(d))
                        .unwrap_or(now);
                    let info = err.info();
                    info!(attempt, error = %err, "attempt failed; retrying in {delay:?}");
                    let change = |r: &mut Record| {
                        r.status = Status::Retrying;
                        r.error = Some(info.clone());
                        r.next_attempt_at = Some(due);
                    };
                    own(Box::pin(conclude(&env, &writer, &*delivery, &change, Settle::Nak(delay)))).await;
                } else {
                    own(Box::pin(finish_failed(&env, &writer, &*delivery, &err))).await;
                }
            }
        }
    }
    .instrument(span))
    .await
}

/// What stops or watches a running task: the queue's ack wait (its
/// keep-alives), the attempt's cancellation tokens and the worker's hard
/// stop.
struct Watchers<'a> {
    ack_wait: &'a SharedAckWait,
    cancel: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
}

/// Run the task, keeping its delivery alive and watching its record: its
/// outcome, or `None` when the worker's hard stop ended it first.
async fn run_watched(
    env: &Env,
    entry: &TaskEntry,
    ctx: Context,
    delivery: &dyn Delivery,
    writer: &RecordWriter,
    watchers: Watchers<'_>,
) -> Option<Outcome> {
    let Watchers {
        ack_wait,
        cancel,
        hard_stop,
    } = watchers;
    let id = writer.id();
    let run = run_attempt(&entry.chain, &entry.handler, entry.timeout, ctx);
    // Keep the delivery alive, and look at the record now and then: a
    // cancellation whose signal this worker missed, or another attempt
    // that took the request over, stops this one.
    let keepalive = async {
        loop {
            // A third of the queue's ack wait as the broker applies it now
            // (another worker of the queue may have changed it).
            tokio::time::sleep(ack_wait.get() / 3).await;
            if let Err(e) = delivery.in_progress().await {
                debug!(error = %e, "keep-alive failed");
            }
            if cancel.is_cancelled() {
                continue;
            }
            match Box::pin(writer.check(&env.broker)).await {
                Ok(Watch::Fine) => {}
                Ok(Watch::CancelRequested) => {
                    info!("cancelled by a client (seen in the record)");
                    writer.cancel_by_client();
                    cancel.cancel();
                }
                Ok(Watch::Lost) => {
                    warn!("another attempt took this request over; stopping this one");
                    cancel.cancel();
                }
                Err(e) => debug!(id = %id, error = %e, "cannot re-read the record"),
            }
        }
    };
    // A slow attempt says `running` (its claim, written on its own).
    let mark_running = async {
        tokio::time::sleep(env.running_after).await;
        match Box::pin(writer.ensure_claimed()).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Conflict => {
                warn!(error = %e, "another attempt took this request over, or it was cancelled; stopping this one");
                if let Ok(Watch::CancelRequested) = Box::pin(writer.check(&env.broker)).await {
                    writer.cancel_by_client();
                }
                cancel.cancel();
            }
            Err(e) => debug!(id = %id, error = %e, "cannot write the running record yet"),
        }
        std::future::pending::<()>().await
    };
    let started = tokio::time::Instant::now();
    // `biased`: the task first, so that one that finishes at its first
    // poll (most quick tasks) never registers the timers and the stop
    // waiter of the other branches, and no random branch order is drawn.
    let outcome = tokio::select! {
        biased;
        r = run => Some(r),
        _ = keepalive => None,
        _ = mark_running => None,
        _ = hard_stop.cancelled() => None,
    };
    env.task_took(started.elapsed());
    outcome
}

/// Called once the worker is stopping (boxed only then). If this attempt
/// has not started, nor written anything (a first delivery's claim is
/// written lazily): put the delivery back unrun ([`put_back_unrun`])
/// rather than start the task with its token fired. Whether it was put
/// back.
async fn released_at_stop(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    request: &Request,
) -> bool {
    if !writer.sent_nothing().await {
        return false;
    }
    debug!("the worker is stopping: putting back a delivery that has not started");
    put_back_unrun(env, delivery, Some(request)).await;
    true
}

/// Wait for a task slot, keeping the delivery alive meanwhile; `None` when
/// the worker closed its slots.
async fn wait_for_slot(
    env: &Env,
    delivery: &dyn Delivery,
    ack_wait: &SharedAckWait,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let wait = Arc::clone(&env.slots).acquire_owned();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            s = &mut wait => return s.ok(),
            _ = tokio::time::sleep(ack_wait.get() / 3) => {
                if let Err(e) = delivery.in_progress().await {
                    debug!(error = %e, "keep-alive failed");
                }
            }
        }
    }
}
