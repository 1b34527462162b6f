"""The same job as jetq-bench's throughput run, done with taskiq + taskiq-nats.

N no-op `add` tasks through taskiq's PullBasedJetStreamBroker (a work-queue
style JetStream stream, a durable pull consumer), with a worker process
started by `taskiq worker` (16 tasks at once, like jetq's default), and:

- `results`: the NATS object-store result backend; the producer publishes
  every task, then waits for every result (`wait_result`, taskiq's polling);
- `no-results`: no result backend; done when the worker has run all N
  (counted through a core NATS message per task, which the worker sends).

`PEER_WINDOW` (default 1000, as jetq-bench) bounds the requests in flight
(published and not yet read back).

Prints one JSON line per mode: {"peer": "taskiq", "mode": ..., "tasks": N,
"tasks_per_s": ...}. Run it through `scripts/bench-peers`.
"""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import nats
from taskiq_nats import NATSObjectStoreResultBackend, PullBasedJetStreamBroker

URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
MODE = os.environ.get("PEER_MODE", "results")
RUN = os.environ.get("PEER_RUN", uuid.uuid4().hex[:8])

broker = PullBasedJetStreamBroker(
    URL,
    subject=f"peer_{RUN}.tasks",
    stream_name=f"peer_{RUN}",
    durable=f"peer_{RUN}",
    pull_consume_batch=16,
)
if MODE == "results":
    broker = broker.with_result_backend(
        NATSObjectStoreResultBackend(URL, bucket_name=f"peer_{RUN}_results")
    )

_done = None


async def _counter():
    global _done
    if _done is None:
        _done = await nats.connect(URL)
    return _done


@broker.task(task_name="add")
async def add(a: int, b: int) -> int:
    if MODE != "results":
        nc = await _counter()
        await nc.publish(f"peer_{RUN}.done", b"")
    return a + b


async def produce(n: int) -> dict:
    await broker.startup()
    done = 0
    finished = asyncio.Event()
    nc = await nats.connect(URL)

    async def count(_msg):
        nonlocal done
        done += 1
        if done >= n:
            finished.set()

    if MODE != "results":
        await nc.subscribe(f"peer_{RUN}.done", cb=count)
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskiq", "worker", "taskiq_peer:broker",
         "--max-async-tasks", "16", "--workers", "1", "--log-level", "WARNING"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        env={**os.environ, "PEER_RUN": RUN, "PEER_MODE": MODE},
    )
    try:
        await asyncio.sleep(3)  # the worker process connects and subscribes
        start = time.monotonic()
        window = asyncio.Semaphore(int(os.environ.get("PEER_WINDOW", "1000")))
        errors = 0
        unread = [0]
        last_error = [None]

        async def one(i):
            nonlocal errors
            async with window:
                task = await add.kiq(i, 1)
                if MODE == "results":
                    await read(task, i)

        async def read(task, i):
            nonlocal errors
            if MODE == "results":
                # taskiq-nats can report a result ready before it can be
                # read (ResultGetError): counted, and read again.
                for _ in range(20):
                    try:
                        result = await task.wait_result(check_interval=0.01, timeout=300)
                    except Exception as exc:  # noqa: BLE001
                        errors += 1
                        last_error[0] = repr(exc.__cause__ or exc)
                        await asyncio.sleep(0.05)
                        continue
                    assert result.return_value == i + 1, result
                    return
                unread[0] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        if MODE != "results":
            await asyncio.wait_for(finished.wait(), 300)
        elapsed = time.monotonic() - start
    finally:
        worker.terminate()
        worker.wait()
        await nc.close()
        await broker.shutdown()
    return {
        "peer": "taskiq",
        "mode": MODE,
        "tasks": n,
        "tasks_per_s": round(n / elapsed),
        "result_read_errors": errors,
        "results_never_read": unread[0],
        "last_error": last_error[0],
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(produce(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))))
