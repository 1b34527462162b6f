//! Pulling deliveries from a queue's consumer and handing each to its own attempt.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn pull_loop(
    queue: String,
    mut consumer: Box<dyn Consumer>,
    ack_wait: Arc<SharedAckWait>,
    env: Arc<Env>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut refreshed = tokio::time::Instant::now();
    loop {
        if refreshed.elapsed() >= ACK_WAIT_REFRESH {
            ack_wait.refresh(&queue, &mut *consumer).await;
            refreshed = tokio::time::Instant::now();
        }
        // Wait for at least one free slot, then take all free slots.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut held = first;
        let extra = permits.available_permits();
        if extra > 0 {
            if let Ok(more) = Arc::clone(&permits).try_acquire_many_owned(extra as u32) {
                held.merge(more);
            }
        }
        // Reading ahead (taking deliveries and reading their records while
        // every task slot is busy) only while tasks are quick: a delivery
        // must not wait here for a slot that a long task holds while
        // another worker could run it.
        // Not reading ahead: take only as many as there are task slots, and
        // reserve those slots now (a delivery taken but not yet in its slot
        // must not count as a free one).
        let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
        if !env.read_ahead_ok() {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                p = Arc::clone(&env.slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let mut slots = first;
            let more = env
                .slots
                .available_permits()
                .min(held.num_permits().saturating_sub(1));
            if more > 0 {
                if let Ok(m) = Arc::clone(&env.slots).try_acquire_many_owned(more as u32) {
                    slots.merge(m);
                }
            }
            if held.num_permits() > slots.num_permits() {
                drop(held.split(held.num_permits() - slots.num_permits()));
            }
            reserved = Some(slots);
        }
        let want = held.num_permits();
        let pulled = tokio::select! {
            _ = stop.cancelled() => return,
            s = consumer.pull(want, PULL_EXPIRES) => s,
        };
        let mut stream = match pulled {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                s
            }
            Err(e) => {
                warn!(queue = %queue, error = %e, "pull failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {},
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(delivery)) => {
                    let Some(permit) = held.split(1) else {
                        // The broker sent more than asked for: release it at once.
                        let _ = delivery.nak(None).await;
                        continue;
                    };
                    let slot = reserved.as_mut().and_then(|s| s.split(1));
                    let env = Arc::clone(&env);
                    let queue = queue.clone();
                    let stop = stop.clone();
                    let hard_stop = hard_stop.clone();
                    let ack_wait = Arc::clone(&ack_wait);
                    let attempt = process(
                        env,
                        queue,
                        delivery,
                        Taken {
                            reading: permit,
                            slot,
                        },
                        ack_wait,
                        stop,
                        hard_stop,
                    );
                    // Boxed: the attempt's state machine is several
                    // kilobytes, and tokio would copy it by value into the
                    // task (twice) and again when it completes.
                    tracker.spawn(Box::pin(attempt));
                }
                Some(Err(e)) => {
                    debug!(queue = %queue, error = %e, "pull ended with an error");
                    break;
                }
            }
        }
    }
}
