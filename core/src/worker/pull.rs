//! Pulling deliveries from a queue's consumer and running an attempt for
//! each, in the queue's driver.

use super::*;

/// What a queue's pull loop works with.
pub(super) struct QueueServer {
    pub(super) queue: String,
    pub(super) consumer: Box<dyn Consumer>,
    pub(super) ack_wait: Arc<SharedAckWait>,
    pub(super) env: Arc<Env>,
    /// Deliveries taken and having their records read (shared by the
    /// worker's queues).
    pub(super) permits: Arc<Semaphore>,
    pub(super) tracker: TaskTracker,
    pub(super) stop: CancellationToken,
    pub(super) hard_stop: CancellationToken,
}

/// Serve one queue: its pull loop and the driver of its attempts, in one
/// task (a delivery reaches its attempt without waking another task).
/// `pulling` fires when the pull loop has stopped (after `stop`); the task
/// itself ends when every attempt has ended too.
pub(super) async fn serve_queue(server: QueueServer, pulling: tokio::sync::oneshot::Sender<()>) {
    let (attempts, receiver) = tokio::sync::mpsc::unbounded_channel();
    // The loop is jetq's own and bounded (it takes what it has places
    // for), so it runs outside tokio's cooperative budget, which the
    // attempts driven beside it share (see `own`).
    let pull = own(async move {
        pull_loop(server, attempts).await;
        let _ = pulling.send(());
    });
    tokio::join!(pull, drive(receiver));
}

async fn pull_loop(server: QueueServer, attempts: tokio::sync::mpsc::UnboundedSender<Inline>) {
    let QueueServer {
        queue,
        mut consumer,
        ack_wait,
        env,
        permits,
        tracker,
        stop,
        hard_stop,
    } = server;
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
        // every task slot is busy) only while tasks are quick, and no more
        // in all than their length allows (the deliveries other pulls hold
        // are the allowance's other permits): a delivery must not wait here
        // long for a slot while another worker could run it.
        let ahead = if env.read_ahead_ok() {
            let elsewhere = pipeline(env.concurrency).saturating_sub(held.num_permits());
            env.read_ahead_limit().saturating_sub(elsewhere)
        } else {
            0
        };
        if ahead > 0 && held.num_permits() > ahead {
            drop(held.split(held.num_permits() - ahead));
        }
        // Not reading ahead (tasks too long, or as many held as they allow):
        // take only as many as there are task slots, and reserve those
        // slots now (a delivery taken but not yet in its slot must not count
        // as a free one).
        let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
        if ahead == 0 {
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
                _ = stop.cancelled() => {
                    let pulled = take_pulled(&mut stream).await;
                    // This worker pulls no more (the consumer's pull
                    // subscription goes with it) before anything is put
                    // back: a delivery put back into a pull still open
                    // here would come straight back, again and again.
                    drop(stream);
                    drop(consumer);
                    for delivery in pulled {
                        put_back_unrun(&env, &*delivery, None).await;
                    }
                    return;
                }
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(delivery)) => {
                    let Some(permit) = held.split(1) else {
                        // The broker sent more than asked for: release it at once.
                        put_back_unrun(&env, &*delivery, None).await;
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
                    // Boxed: the attempt's state machine is about two
                    // kilobytes, and it may move to a task of its own.
                    let _ = attempts.send(Inline::new(Box::pin(attempt), tracker.clone()));
                }
                Some(Err(e)) => {
                    debug!(queue = %queue, error = %e, "pull ended with an error");
                    break;
                }
            }
        }
    }
}

/// Stopping with a pull under way: take the deliveries the server has
/// already sent for it, to be put back at once rather than left
/// unacknowledged (and out of every worker's reach) until the ack wait
/// passes. Read until the pull ends or has had nothing more for
/// [`RELEASE_IDLE`]; the server sends what a pull asked for as soon as it
/// has it.
async fn take_pulled(stream: &mut crate::broker::Deliveries) -> Vec<Box<dyn Delivery>> {
    let mut pulled = Vec::new();
    loop {
        match tokio::time::timeout(RELEASE_IDLE, stream.next()).await {
            Ok(Some(Ok(delivery))) => pulled.push(delivery),
            Ok(Some(Err(_)) | None) | Err(_) => return pulled,
        }
    }
}

/// How long a stopping pull loop waits for more of what its last pull
/// asked for (see [`take_pulled`]).
const RELEASE_IDLE: Duration = Duration::from_millis(50);

/// How much time an attempt may spend being polled (running its own code
/// and its handler's, not waiting) inside its pull loop's driver before it
/// moves to a tokio task of its own.
const INLINE_BUSY: Duration = Duration::from_millis(1);

/// Run the attempts handed over by a pull loop, all in this one future (the
/// queue's task), until the loop is gone and every attempt has ended.
///
/// One task for the attempts of a queue, rather than one tokio task each:
/// the broker operations of all the attempts woken together (acks, record
/// reads and writes, notifications) then reach the connection in one go and
/// leave in one socket write, and waking an attempt costs no scheduling. An
/// attempt that keeps the driver busy (a handler computing between its
/// awaits) moves to a task of its own, so that it runs beside the others
/// on another thread. A handler that blocks its thread without awaiting
/// holds up every attempt of its driver until it returns: blocking work
/// belongs in [`Task::blocking`](crate::Task::blocking).
async fn drive(mut receiver: tokio::sync::mpsc::UnboundedReceiver<Inline>) {
    use futures_util::stream::FuturesUnordered;
    use std::task::Poll;
    let mut running: FuturesUnordered<Inline> = FuturesUnordered::new();
    let mut open = true;
    std::future::poll_fn(|cx| {
        while open {
            // Outside the budget too: taking the attempts handed over is
            // bounded by what was pulled.
            let recv = own(std::future::poll_fn(|cx| receiver.poll_recv(cx)));
            match std::pin::pin!(recv).poll(cx) {
                Poll::Ready(Some(attempt)) => running.push(attempt),
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
        if !open && running.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One attempt run inside a driver; it moves to a task of its own (the
/// tracker's, which shutdown waits for) once it has kept the driver busy
/// for [`INLINE_BUSY`] in all.
pub(super) struct Inline {
    attempt: Option<BoxFuture<'static, ()>>,
    busy: Duration,
    tracker: TaskTracker,
}

impl Inline {
    pub(super) fn new(attempt: BoxFuture<'static, ()>, tracker: TaskTracker) -> Inline {
        Inline {
            attempt: Some(attempt),
            busy: Duration::ZERO,
            tracker,
        }
    }
}

impl Future for Inline {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        let this = &mut *self;
        let Some(attempt) = this.attempt.as_mut() else {
            return Poll::Ready(());
        };
        let started = std::time::Instant::now();
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Ready(())) => Poll::Ready(()),
            Ok(Poll::Pending) => {
                this.busy += started.elapsed();
                if this.busy >= INLINE_BUSY {
                    if let Some(attempt) = this.attempt.take() {
                        this.tracker.spawn(attempt);
                    }
                    return Poll::Ready(());
                }
                Poll::Pending
            }
            Err(_) => {
                // Handlers' and middleware's panics are caught inside the
                // attempt; this is one in jetq's own code. The delivery is
                // left unacknowledged: it comes back after the ack wait.
                error!("an attempt panicked; its request will be delivered again");
                Poll::Ready(())
            }
        }
    }
}
