//! Writing an attempt's outcome and settling its message: acknowledgements,
//! releases, dead letters.

use super::*;

#[derive(Clone, Copy)]
pub(super) enum Settle {
    Ack,
    Nak(Duration),
    Term,
}

/// Write the attempt's outcome, then settle the message: `how` once the
/// record is written (a `failed` record is dead-lettered before the message
/// is terminated); a cancellation found in the record wins over `change`.
/// If the record cannot be written, the message is released so the request
/// runs again later; if another attempt took it over, the message is left to it.
pub(super) async fn conclude(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    change: &(dyn Fn(&mut Record) + Send + Sync),
    how: Settle,
) {
    let now = OffsetDateTime::now_utc();
    let guarded = |r: &mut Record| {
        if r.cancel_requested_at.is_some() {
            r.mark_cancelled(now)
        } else {
            change(r)
        }
    };
    let mut how = how;
    let written = match writer.apply(&guarded).await {
        Err(e) if e.kind() == ErrorKind::PayloadTooLarge => {
            // Boxed, as every rare path here: this future is one per task.
            match Box::pin(outcome_too_large(env, writer, delivery, e, now)).await {
                Some(written) => {
                    how = Settle::Term;
                    written
                }
                None => return,
            }
        }
        other => other,
    };
    if matches!(&written, Ok(status) if status.is_terminal()) {
        ended(env, writer).await;
    }
    // `Term` means the dead letter is already stored (finish_failed, or the
    // too-large path above); only a failure is written with it.
    let result = match written {
        Ok(Status::Failed) => delivery.term("jetq: failed").await,
        Ok(status) => match how {
            // Cancelled while being failed: it is no dead letter after all.
            Settle::Term => {
                if let Err(e) = env.broker.remove_dead_letter(writer.id()).await {
                    warn!(error = %e, "cannot remove the dead letter of a cancelled request");
                }
                delivery.ack().await
            }
            Settle::Nak(d) if status == Status::Retrying => delivery.nak(Some(d)).await,
            // The record decides: a lost acknowledgement only brings a
            // redelivery that the record drops, so it is not waited for.
            Settle::Nak(_) | Settle::Ack => delivery.ack_unconfirmed().await,
        },
        Err(e) => return Box::pin(not_written(env, writer, delivery, e)).await,
    };
    if let Err(e) = result {
        warn!(error = %e, "acknowledgement failed; the request may run again");
    }
}

/// The outcome of an attempt does not fit in a record: dead-letter the
/// request and fail it with a record that fits. `None` if the dead letter
/// could not be stored (the message is left for another attempt).
async fn outcome_too_large(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    e: Error,
    now: OffsetDateTime,
) -> Option<Result<Status>> {
    // The value (or metadata) cannot be stored: fail with a record
    // that fits rather than retrying something that never will.
    let message = format!("the task's outcome does not fit in a record: {e}");
    warn!("{message}");
    let current = writer.current().await;
    let letter = dead_letter_of(
        env,
        delivery,
        &current,
        ErrorInfo::new(kinds::TOO_LARGE, message),
    );
    let verdict = store_failure(env, delivery, letter).await?;
    let error = verdict.error.clone();
    let shrink = |r: &mut Record| {
        r.status = Status::Failed;
        r.value = None;
        r.progress = None;
        verdict.apply(r);
        r.finished_at = Some(now);
        r.next_attempt_at = None;
    };
    Some(match writer.apply(&shrink).await {
        // Still too large: the metadata too (a claim written with the
        // outcome carries it for the first time).
        Err(e) if e.kind() == ErrorKind::PayloadTooLarge => {
            let error = ErrorInfo::new(
                kinds::TOO_LARGE,
                format!("{}; its metadata was dropped", error.message),
            );
            let smaller = |r: &mut Record| {
                shrink(r);
                r.error = Some(error.clone());
                r.metadata = Map::new();
                r.extra = Map::new();
            };
            writer.apply(&smaller).await
        }
        other => other,
    })
}

/// The attempt wrote its request's final record: send it to the producer's
/// inbox if the request named one, and wake the workflow waiting for it if
/// it is a workflow's child.
async fn ended(env: &Env, writer: &RecordWriter) {
    if let (Some(address), Some(bytes)) = (writer.notify(), writer.written_for_inbox().await) {
        if let Err(e) = env.broker.notify(address, bytes).await {
            debug!(error = %e, "cannot send the record to the producer's inbox");
        }
    }
    if let Some(parent) = writer.parent() {
        Box::pin(crate::workflow::wake_parent(
            &*env.broker,
            parent,
            writer.id(),
        ))
        .await;
    }
}

/// The attempt's record could not be written: another attempt took it over
/// or it ended (cancelled, or a duplicate finished it): leave the message to
/// the record's owner, or drop it if the request has ended; else (an
/// outage) release the message for another attempt.
pub(super) async fn not_written(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    e: Error,
) {
    let result = if e.kind() == ErrorKind::Conflict {
        if stored_record(env, writer.id())
            .await
            .is_some_and(|r| r.status.is_terminal())
        {
            debug!(error = %e, "the request ended meanwhile; dropping this delivery");
            if let Err(e) = delivery.ack().await {
                warn!(error = %e, "cannot acknowledge a dropped delivery");
            }
            return;
        }
        warn!(error = %e, "leaving the message to the attempt that owns the record");
        Ok(())
    } else {
        let delay = release_delay(delivery.info().delivered);
        error!(error = %e, "cannot write the record; releasing the request for another attempt in {delay:?}");
        delivery.nak(Some(delay)).await
    };
    if let Err(e) = result {
        warn!(error = %e, "acknowledgement failed; the request may run again");
    }
}

pub(super) async fn finish_failed(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    err: &TaskError,
) {
    warn!(error = %err, "request failed");
    // A claimed record first: a worker that dies after the dead letter
    // leaves a `running` record naming this message, which the next delivery
    // fails from the dead letter (see `claim`).
    if let Err(e) = writer.ensure_claimed().await {
        return not_written(env, writer, delivery, e).await;
    }
    // An attempt taken over meanwhile (its worker was presumed dead) must
    // not leave a dead letter for a request another attempt runs.
    if let Ok(Watch::Lost) = writer.check(&env.broker).await {
        let lost = Error::new(
            ErrorKind::Conflict,
            format!("record `{}` was taken over by another attempt", writer.id()),
        );
        return not_written(env, writer, delivery, lost).await;
    }
    let now = OffsetDateTime::now_utc();
    // The dead letter first: once a client sees the record `failed`, the
    // dead letter is there. A worker dying in between leaves a `running`
    // record that the next delivery fails from the dead letter (see `claim`).
    let current = writer.current().await;
    let mut verdict = None;
    if current.cancel_requested_at.is_none() {
        let mut letter = dead_letter_of(env, delivery, &current, err.info());
        letter.died_at = now;
        match store_failure(env, delivery, letter).await {
            Some(stored) => verdict = Some(stored),
            None => return,
        }
    }
    let info = err.info();
    let change = |r: &mut Record| {
        r.status = Status::Failed;
        match &verdict {
            Some(v) => v.apply(r),
            None => r.error = Some(info.clone()),
        }
        r.finished_at = Some(now);
        r.next_attempt_at = None;
    };
    conclude(env, writer, delivery, &change, Settle::Term).await;
}

/// The dead letter of the request `record` describes, delivered as `delivery`.
pub(super) fn dead_letter_of(
    env: &Env,
    delivery: &dyn Delivery,
    record: &Record,
    error: ErrorInfo,
) -> DeadLetter {
    let mut letter = letter_for(
        env,
        delivery,
        record.id.clone(),
        &record.queue,
        record.task.clone(),
        error,
    );
    letter.attempts = record.attempts;
    letter.died_at = record.finished_at.unwrap_or_else(OffsetDateTime::now_utc);
    letter
}

/// The dead letter of the message `delivery`, under `key`, written by this worker.
pub(super) fn letter_for(
    env: &Env,
    delivery: &dyn Delivery,
    key: String,
    queue: &str,
    task: String,
    error: ErrorInfo,
) -> DeadLetter {
    let mut letter = DeadLetter::new(
        key,
        queue,
        task,
        error,
        Bytes::copy_from_slice(delivery.payload()),
    );
    letter.worker = env.name.to_string();
    letter.sequence = delivery.info().sequence;
    letter
}

/// Dead-letter a failed request's message, then terminate it. If the dead
/// letter cannot be stored the message is released instead, to be buried by
/// a later delivery: it must not vanish without a trace.
pub(super) async fn bury(env: &Env, delivery: &dyn Delivery, record: &Record) {
    let error = record
        .error
        .clone()
        .unwrap_or_else(|| ErrorInfo::new(kinds::ERROR, "failed"));
    let letter = dead_letter_of(env, delivery, record, error);
    bury_letter(env, delivery, letter).await;
}

pub(super) async fn bury_letter(env: &Env, delivery: &dyn Delivery, letter: DeadLetter) {
    let reason = format!("jetq: {}: {}", letter.error.kind, letter.error.message);
    if store_dead_letter(env, delivery, letter).await {
        if let Err(e) = delivery.term(&reason).await {
            warn!(error = %e, "cannot terminate a dead-lettered message; it will be buried again");
        }
    }
}

/// Store the dead letter of a request whose record is then written
/// `failed`, and return what that record says ([`Verdict`]): the letter's
/// own, or the stored one's when another attempt at the same message
/// dead-lettered it first (one taken over when its keep-alives could not
/// reach the server, or whose failure was on its way when its delivery was
/// taken over): the letter's key is the message's, so that letter stays,
/// and the record must say the same, down to the attempt and worker that
/// failed it. `None` if the letter could not be stored (the message is
/// released; see [`store_dead_letter`]).
async fn store_failure(env: &Env, delivery: &dyn Delivery, letter: DeadLetter) -> Option<Verdict> {
    let (id, sequence, mine) = (letter.id.clone(), letter.sequence, Verdict::of(&letter));
    if !store_dead_letter(env, delivery, letter).await {
        return None;
    }
    match Box::pin(own_dead_letter(env, &id, sequence)).await {
        Ok(Some(stored)) if Verdict::of(&stored) != mine => {
            debug!(kept = %stored.error.kind, "this message was dead-lettered already; the record follows that letter");
            Some(Verdict::of(&stored))
        }
        _ => Some(mine),
    }
}

/// Store a dead letter; if that fails, release the message (to be failed
/// again by a later delivery: it must not vanish without a trace) and
/// return false.
pub(super) async fn store_dead_letter(
    env: &Env,
    delivery: &dyn Delivery,
    letter: DeadLetter,
) -> bool {
    let id = letter.id.clone();
    match env.broker.put_dead_letter(letter).await {
        Ok(()) => true,
        Err(e) => {
            let delay = release_delay(delivery.info().delivered);
            error!(id = %id, error = %e, "cannot store the dead letter; releasing the request to try again in {delay:?}");
            if let Err(e) = delivery.nak(Some(delay)).await {
                warn!(id = %id, error = %e, "cannot release the request");
            }
            false
        }
    }
}

/// Give the request back for immediate redelivery (worker shutting down).
pub(super) async fn release(env: &Env, writer: &RecordWriter, delivery: &dyn Delivery) {
    let info = ErrorInfo::new(
        kinds::INTERRUPTED,
        format!(
            "worker `{}` shut down during the attempt; released for redelivery",
            env.name
        ),
    );
    let change = |r: &mut Record| {
        r.status = Status::Retrying;
        r.error = Some(info.clone());
        r.next_attempt_at = Some(OffsetDateTime::now_utc());
    };
    conclude(env, writer, delivery, &change, Settle::Nak(Duration::ZERO)).await;
}

/// A message that may not run: its envelope cannot be decoded, or it speaks
/// for a request, task or queue it does not belong to. It is dead-lettered
/// under its own key (`invalid-<queue>-<sequence>`) and terminated; no
/// record is written, since the message owns none (an id in it may be
/// another request's).
pub(super) async fn poison(
    env: &Env,
    queue: &str,
    delivery: &dyn Delivery,
    kind: &str,
    reason: String,
) {
    let loose: Option<serde_json::Map<String, Value>> =
        serde_json::from_slice(delivery.payload()).ok();
    let field = |k: &str| {
        loose
            .as_ref()
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let claimed = field("id").filter(|id| names::validate_id(id).is_ok());
    let task = field("task")
        .filter(|t| names::validate_task(t).is_ok())
        .unwrap_or_default();
    let info = delivery.info();
    let reason = match &claimed {
        Some(id) if !reason.contains(id.as_str()) => format!("{reason} (claims id `{id}`)"),
        _ => reason,
    };
    warn!(queue, seq = info.sequence, "refusing a message: {reason}");
    let letter = letter_for(
        env,
        delivery,
        DeadLetter::invalid_key(queue, info.sequence),
        queue,
        task,
        ErrorInfo::new(kind, reason.clone()),
    );
    // Past the budget a message ends even if its dead letter cannot be stored.
    let give_up = info.delivered > delivery_budget(crate::request::DEFAULT_MAX_RETRIES);
    if !give_up && !store_dead_letter(env, delivery, letter).await {
        return;
    }
    if let Err(e) = delivery.term(&format!("jetq: {kind}: {reason}")).await {
        warn!(error = %e, "cannot terminate a refused message");
    }
}

/// The backstop: a message delivered more often than its request's budget
/// allows, whatever the reason (a record or dead letter that cannot be read
/// or written, a bug), is ended: its record failed (`abandoned`) where this
/// message owns it, a dead letter stored where possible, the message
/// terminated even if neither could be written.
pub(super) async fn abandon(
    env: &Env,
    queue: &str,
    delivery: &dyn Delivery,
    request: &Request,
    budget: u64,
) {
    let info = delivery.info();
    let existing = env.broker.get_record(&request.id).await.ok().flatten();
    // The record as this message will write it, if it owns it: none yet or
    // not a record at all (nobody owns that) gives a fresh one. A request
    // that has finished (a duplicate, or only the acknowledgement kept
    // getting lost) is neither dead-lettered nor rewritten: the message goes.
    let (owned, finished) = match &existing {
        None => (Some(Record::pending(request)), false),
        Some(entry) => match Record::decode(&request.id, &entry.value) {
            Ok(record) if record.status.is_terminal() => (None, true),
            Ok(record) if owns(&record, request, info.sequence) => (Some(record), false),
            Ok(_) => (None, false),
            Err(_) => (Some(Record::pending(request)), false),
        },
    };
    if !finished {
        let last = owned
            .as_ref()
            .and_then(|r| r.error.as_ref())
            .map(|e| format!("; the last error reported: {}: {}", e.kind, e.message))
            .unwrap_or_default();
        let message = format!(
            "delivered {} times, more than the {budget} its retries allow (max_retries + 1 + {DELIVERY_SLACK}); ended so that it cannot loop{last}",
            info.delivered
        );
        error!(id = %request.id, "{message}");
        let error = ErrorInfo::new(kinds::ABANDONED, message);
        let key = match owned {
            Some(_) => request.id.clone(),
            None => DeadLetter::invalid_key(queue, info.sequence),
        };
        let mut letter = letter_for(
            env,
            delivery,
            key,
            queue,
            request.task.clone(),
            error.clone(),
        );
        letter.attempts = owned.as_ref().map_or(0, |r| r.attempts);
        if let Err(e) = env.broker.put_dead_letter(letter).await {
            warn!(error = %e, "cannot store the dead letter of an abandoned request");
        }
        if let Some(mut record) = owned {
            record.status = Status::Failed;
            record.error = Some(error);
            record.seq = Some(info.sequence);
            record.finished_at = Some(OffsetDateTime::now_utc());
            record.next_attempt_at = None;
            record.worker = Some(env.name.to_string());
            let revision = existing.as_ref().map(|e| e.revision);
            if let Err(e) = put_record(env, &request.id, &record, revision).await {
                warn!(error = %e, "cannot write the failed record of an abandoned request");
            }
        }
    }
    if let Err(e) = delivery.term("jetq: abandoned: delivered too often").await {
        warn!(error = %e, "cannot terminate an abandoned request");
    }
}

/// A workflow suspended (a durable sleep, a `recv`): write its record
/// `suspended` with a fresh wake-up token, publish the wake-up message (the
/// request again, carrying the token, delayed until the wait ends), then
/// acknowledge this message: the run holds no slot and no message until it
/// is woken. If a message the run waits for arrived meanwhile, the wake-up
/// is fired at once (a sender that saw the record before it said
/// `suspended` did not).
///
/// If the wake-up cannot be published, this message is released instead: its
/// redelivery owns the record (same `seq`) and runs the workflow again.
pub(super) async fn suspend(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    request: &Request,
    suspension: &Suspension,
) {
    let token = crate::request::new_id();
    let now = OffsetDateTime::now_utc();
    let change = |r: &mut Record| {
        if r.cancel_requested_at.is_some() {
            r.mark_cancelled(now);
            return;
        }
        r.status = Status::Suspended;
        r.waiting = Some(suspension.waiting.clone());
        r.resume = Some(token.clone());
        r.next_attempt_at = Some(suspension.until);
    };
    match writer.apply(&change).await {
        Ok(Status::Suspended) => {}
        Ok(_) => {
            // Cancelled meanwhile: it ends here.
            ended(env, writer).await;
            if let Err(e) = delivery.ack().await {
                warn!(error = %e, "cannot acknowledge a cancelled workflow's message");
            }
            return;
        }
        Err(e) => return not_written(env, writer, delivery, e).await,
    }
    let mut wake = request.clone();
    wake.resume = Some(token.clone());
    wake.not_before = None;
    let published = match wake.to_json() {
        Ok(payload) => {
            let mut out = crate::broker::OutgoingRequest::new(
                request.id.clone(),
                request.queue.clone(),
                request.task.clone(),
                Bytes::from(payload),
            );
            out.headers = request
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            out.not_before = Some(suspension.until);
            out.dedup_key = Some(Request::resume_dedup_key(&request.id, &token));
            env.broker.publish(out).await.map(|_| ())
        }
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        let delay = release_delay(delivery.info().delivered);
        warn!(error = %e, "cannot schedule the wake-up of a suspended workflow; releasing it for {delay:?}");
        if let Err(e) = delivery.nak(Some(delay)).await {
            warn!(error = %e, "cannot release the message of a suspended workflow");
        }
        return;
    }
    info!(waiting = %suspension.waiting, until = %suspension.until, "workflow suspended");
    if let Err(e) = delivery.ack().await {
        // Its redelivery runs the workflow again, which suspends it anew.
        warn!(error = %e, "cannot acknowledge the message of a suspended workflow");
    }
    let arrived = match &suspension.check {
        None => Ok(false),
        Some(WakeCheck::Mail { id, topic, from }) => env
            .broker
            .next_mail(id, topic.as_deref(), *from)
            .await
            .map(|m| m.is_some()),
        Some(WakeCheck::Child { child }) => match env.broker.get_record(child).await {
            Ok(Some(entry)) => Ok(Record::decode(child, &entry.value)
                .map(|r| r.status.is_terminal())
                .unwrap_or(false)),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        },
    };
    match arrived {
        Ok(true) => {
            debug!("what the workflow waits for came while it suspended; waking it");
            if let Err(e) = env.broker.wake(&request.id).await {
                warn!(error = %e, "cannot wake a workflow whose wait is over");
            }
        }
        Ok(false) => {}
        Err(e) => warn!(error = %e, "cannot look at what a suspended workflow waits for"),
    }
}
