#!/usr/bin/env python3
"""A foreign (non-Rust) jetq client that follows docs/wire-format.md only.

Usage: client.py NATS_URL [--before-worker | --auth SECRET_FILE ED25519_PRIVATE_PEM]

Run by tests/tests/wire_python.rs against a real nats-server with
`jetq-demo-worker` serving queue `default`. It speaks plain NATS through
nats-py (PyPI package `nats-py`): no jetq code is involved. Every check prints
one line; the first failed check prints `FAIL: ...` and exits with status 1.
Every wait is bounded by WAIT seconds.

Checks (the section of docs/wire-format.md each one proves in brackets):

  a. a JetStream publish of a `demo.add` envelope to
     `jetq.tasks.default.demo.add` with `Nats-Msg-Id` = id, without creating a
     pending record [3, 4, 6 "A foreign client may skip step 2"], is waited
     for by subscribing to `jetq.records.<id>` and then reading the KV bucket
     `JETQ_RESULTS` [7, 1]; the record has every field [5], `succeeded`,
     value 42, the metadata, one attempt, `seq` = the publish's sequence;
  b. a second publish of the same id is acknowledged as a duplicate with the
     first message's sequence, and the task does not run again [3, 6
     "Duplicates"];
  c. bad args end `failed` with kind `invalid_args` after one attempt [5];
  d. an unknown task ends `failed` with kind `unknown_task` [5];
  e. the raw direct get of a record, 404 for a missing one, and the stream
     API fallback [1];
  f. the `run_task` function of the Python example [8], taken from the
     document itself, returns the succeeded record;
  g. the failed request of c. has a dead letter: a direct get of the last
     message on `jetq.dead.<id>` of `JETQ_DEAD` returns the original body
     with the `Jetq-*` headers naming the reason [6 "Dead letters"];
  h. a delayed request published as a message schedule on
     `jetq.delayed.<id>` (`Nats-Schedule: @at T`, `Nats-Schedule-Target`)
     runs once, not before T [3 "Delayed requests", 4 `not_before`];
  i. a delayed request cancelled as documented (revision-checked record
     update to `cancelled`, purge of `jetq.delayed.<id>`) never runs
     [6 "Cancelling"];
  j. the `run_many` function of the Python example [8], taken from the
     document: requests naming an inbox in `notify` get their ended records
     sent there by the worker [4 `notify`, 7];
  k. (with --auth) signed requests, following docs/middleware.md (Auth context): the
     `jetq_auth_header` function taken from that document signs with PyJWT
     an `authorization` header bound to the request [4 `headers`]; a
     `jetq-demo-worker --auth-key-file` on queue `wire-auth-hs` (the shared
     secret) runs `demo.whoami` for the signed user, and one on queue
     `wire-auth-ed` (the Ed25519 public key) runs `demo.admin` signed with the
     private key for an admin; unsigned, a token bound to another request,
     and a viewer on `demo.admin` end `failed` with kinds `unauthenticated`,
     `unauthenticated` and `forbidden`;
  l. a request whose envelope carries a `traceparent` header set by hand
     (W3C trace context) [4 `headers`] succeeds; the line printed names the
     traceparent, and the Rust test checks that the worker (run with
     `--otlp`) exported the attempt's span in that trace, as a child of that
     span (docs/middleware.md (Tracing)).
  m. a workflow driven from Python [1 "Workflow entries", "The mailbox
     stream", 6 "Suspended workflows"]: `demo.checkout` published like any
     request sets event `status` = `reserved` (read at
     `<id>.event.status`), suspends in its `recv` (record `suspended`,
     `waiting` = `recv:payment`); a message published to
     `jetq.mail.<id>.payment` (with an idempotency key, twice) and the
     wake-up fired as documented (the schedule on `jetq.delayed.<id>`
     published to its target with `Nats-Msg-Id: <id>.wake.<token>`) resume
     it at once; it suspends again in its 5 s sleep, the server's schedule
     resumes it, and it ends `succeeded` with `{"paid": 5}`, event `status`
     = `shipped`, one attempt, and the step log at `<id>.step.<n>`.

With --before-worker it checks one thing only, on a server where no jetq
worker or client has run yet: a JetStream publish to jetq.tasks.default.demo.add
fails with nats-py's NoStreamResponseError [1].
"""

import asyncio
import base64
import json
import os
import re
import sys
import traceback
import uuid
from datetime import datetime, timezone

try:
    import nats
    from nats.js.errors import KeyNotFoundError, NoStreamResponseError, NotFoundError
except ImportError:  # pragma: no cover - the Rust test checks this first
    sys.exit("FAIL: python3 cannot import nats: pip install nats-py (scripts/test installs it)")

WAIT = 20.0  # seconds: the bound of every wait
TERMINAL = {"succeeded", "failed", "cancelled"}
# Every field a writer always writes (section 5); `seq` is checked apart.
# Written in every record.
RECORD_FIELDS = [
    "v", "id", "task", "queue", "status", "attempts", "max_retries", "enqueued_at",
]
# Omitted by writers while unset; readers take a missing one as null.
RECORD_OPTIONAL = [
    "value", "error", "progress", "started_at", "finished_at", "next_attempt_at",
    "cancel_requested_at", "worker", "seq", "waiting", "resume", "parent",
]
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "wire-format.md")
AUTH_DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "middleware.md")


class CheckFailed(Exception):
    pass


def ok(msg):
    print(f"ok   {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def now_rfc3339():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value, field):
    check(isinstance(value, str) and RFC3339.match(value),
          f"{field} is not an RFC 3339 string: {value!r}")
    # datetime.fromisoformat (3.11) takes "Z" but at most 6 fractional digits.
    text = re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00")
    return datetime.fromisoformat(text)


def envelope(request_id, task, args, metadata=None, queue="default"):
    env = {
        "v": 1,
        "id": request_id,
        "task": task,
        "queue": queue,
        "args": args,
        "enqueued_at": now_rfc3339(),
    }
    if metadata is not None:
        env["metadata"] = metadata
    return env


def new_id(label):
    # An idempotency key of the caller's: [A-Za-z0-9_-], at most 128 bytes.
    return f"wire-py-{label}-{uuid.uuid4().hex}"


async def publish(js, env):
    """Section 3: JetStream publish to <prefix>.tasks.<queue>.<task>, Nats-Msg-Id = id."""
    subject = f"jetq.tasks.{env['queue']}.{env['task']}"
    return await js.publish(
        subject,
        json.dumps(env).encode(),
        headers={"Nats-Msg-Id": env["id"]},
        timeout=WAIT,
    )


class Follower:
    """Section 7: subscribe to jetq.records.<id> first, then read the record."""

    def __init__(self, nc, kv, request_id):
        self.nc, self.kv, self.id = nc, kv, request_id
        self.sub = None
        self.revision = 0  # the last revision seen, from either source
        self.record = None
        self.republished = []  # (revision, record) of each republished write

    async def subscribe(self):
        self.sub = await self.nc.subscribe(f"jetq.records.{self.id}")
        return self

    async def close(self):
        if self.sub is not None:
            await self.sub.unsubscribe()
            self.sub = None

    async def next_republished(self, deadline):
        """The next republished write: (revision, record or None for a delete)."""
        loop = asyncio.get_running_loop()
        msg = await self.sub.next_msg(timeout=max(deadline - loop.time(), 0.001))
        headers = msg.headers or {}
        check("Nats-Sequence" in headers,
              f"a message on jetq.records.{self.id} has no Nats-Sequence header: {headers}")
        revision = int(headers["Nats-Sequence"])
        if not msg.data or headers.get("KV-Operation") in ("DEL", "PURGE"):
            return revision, None
        record = parse_record(msg.data)
        self.republished.append((revision, record))
        return revision, record

    async def wait_terminal(self, timeout=WAIT):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            entry = await self.kv.get(self.id)
            self.record, self.revision = parse_record(entry.value), entry.revision
        except KeyNotFoundError:
            pass
        while self.record is None or self.record.get("status") not in TERMINAL:
            try:
                revision, record = await self.next_republished(deadline)
            except nats.errors.TimeoutError:
                raise CheckFailed(
                    f"no terminal record for {self.id} within {timeout:.0f} s; last: {self.record}")
            if revision <= self.revision or record is None:
                continue
            self.record, self.revision = record, revision
        return self.record

    async def republished_up_to(self, revision, timeout=WAIT):
        """Read the subscription until the write of `revision` has been republished."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.republished or self.republished[-1][0] < revision:
            try:
                await self.next_republished(deadline)
            except nats.errors.TimeoutError:
                raise CheckFailed(
                    f"revision {revision} of {self.id} was not republished to "
                    f"jetq.records.{self.id} within {timeout:.0f} s (saw {[r for r, _ in self.republished]})")
        return self.republished


def parse_record(data):
    """A stored or republished record, read as the wire format says: a
    missing optional field is null, a missing metadata is {}. Writers omit
    unset fields rather than write null."""
    record = json.loads(data)
    nulls = [f for f, v in record.items() if v is None]
    check(not nulls, f"a record written with explicit nulls {nulls}: {record}")
    for field in RECORD_OPTIONAL:
        record.setdefault(field, None)
    record.setdefault("metadata", {})
    return record


def check_record_shape(record, env):
    missing = [f for f in RECORD_FIELDS if f not in record]
    check(not missing, f"record lacks documented fields {missing}: {record}")
    check(record["v"] == 1, f"record v is {record['v']!r}, not 1")
    for field in ("id", "task", "queue"):
        check(record[field] == env[field], f"record {field} {record[field]!r} != request's {env[field]!r}")
    check(isinstance(record["metadata"], dict), f"metadata is not an object: {record['metadata']!r}")
    check(isinstance(record["attempts"], int), f"attempts is not an integer: {record['attempts']!r}")
    check(isinstance(record["max_retries"], int), f"max_retries is not an integer: {record['max_retries']!r}")
    check(parse_time(record["enqueued_at"], "enqueued_at") == parse_time(env["enqueued_at"], "sent enqueued_at"),
          f"enqueued_at {record['enqueued_at']!r} != the request's {env['enqueued_at']!r}")
    for field in ("started_at", "finished_at", "next_attempt_at"):
        if record[field] is not None:
            parse_time(record[field], field)
    check(record["worker"] is None or isinstance(record["worker"], str), f"worker: {record['worker']!r}")


def check_failed(record, kind):
    check(record["status"] == "failed", f"status {record['status']!r}, expected 'failed': {record}")
    err = record["error"]
    check(isinstance(err, dict) and set(err) >= {"kind", "message"},
          f"error is not {{kind, message}}: {err!r}")
    check(err["kind"] == kind, f"error kind {err['kind']!r}, expected {kind!r}: {record}")
    check(isinstance(err["message"], str), f"error message is not a string: {err!r}")
    check(record["value"] is None, f"a failed record has a value: {record}")
    check(record["finished_at"] is not None, f"a failed record has no finished_at: {record}")


async def wait_for_jetq(js):
    """Section 1: workers create the stream and bucket when they start; wait for them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        try:
            info = await js.stream_info("JETQ_TASKS")
            kv = await js.key_value("JETQ_RESULTS")
            break
        except NotFoundError:
            if loop.time() > deadline:
                raise CheckFailed(f"stream JETQ_TASKS / bucket JETQ_RESULTS not created within {WAIT:.0f} s: is a worker running?")
            await asyncio.sleep(0.1)
    cfg = info.config
    want = ["jetq.tasks.>", "jetq.delayed.>"]
    check(cfg.subjects == want, f"JETQ_TASKS subjects are {cfg.subjects}, not {want}")
    check(str(getattr(cfg.retention, "value", cfg.retention)) == "workqueue",
          f"JETQ_TASKS retention is {cfg.retention}, not workqueue")
    kinfo = await js.stream_info("KV_JETQ_RESULTS")
    check(kinfo.config.allow_direct, "KV_JETQ_RESULTS is not created with allow_direct")
    republish = kinfo.config.republish
    check(republish is not None and republish.dest == "jetq.records.>",
          f"KV_JETQ_RESULTS republishes to {republish and republish.dest!r}, not jetq.records.>")
    ok("names: stream JETQ_TASKS (jetq.tasks.>, work queue), bucket JETQ_RESULTS "
       "(stream KV_JETQ_RESULTS, direct get, republished to jetq.records.>)")
    return kv


async def check_a_b(nc, js, kv):
    # a. publish without a pending record, wait as section 7 says.
    env = envelope(new_id("add"), "demo.add", {"a": 2, "b": 40}, {"tenant": "acme"})
    follower = await Follower(nc, kv, env["id"]).subscribe()
    try:
        try:
            await kv.get(env["id"])
            raise CheckFailed(f"a record for {env['id']} exists before the publish")
        except KeyNotFoundError:
            pass
        ack = await publish(js, env)
        check(ack.stream == "JETQ_TASKS", f"publish acknowledged by stream {ack.stream!r}, not JETQ_TASKS")
        check(not ack.duplicate, f"first publish acknowledged as a duplicate: {ack}")
        ok(f"a. published {env['id']} to jetq.tasks.default.demo.add (stream JETQ_TASKS, seq {ack.seq}), no pending record")
        record = await follower.wait_terminal()
        check(record["status"] == "succeeded", f"status {record['status']!r}, expected 'succeeded': {record}")
        check_record_shape(record, env)
        check(record["value"] == 42, f"value {record['value']!r}, expected 42")
        check(record["metadata"].get("tenant") == "acme", f"metadata {record['metadata']!r} lacks tenant acme")
        check(record["attempts"] == 1, f"attempts {record['attempts']!r}, expected 1")
        check(record["max_retries"] == 3, f"max_retries {record['max_retries']!r}, expected the default policy's 3")
        check(record["error"] is None and record["progress"] is None and record["next_attempt_at"] is None,
              f"error/progress/next_attempt_at not null on a succeeded record: {record}")
        check(isinstance(record["worker"], str) and record["worker"], f"worker not set: {record['worker']!r}")
        started = parse_time(record["started_at"], "started_at")
        finished = parse_time(record["finished_at"], "finished_at")
        check(started <= finished, f"started_at {record['started_at']} after finished_at {record['finished_at']}")
        check(record.get("seq") == ack.seq, f"record seq {record.get('seq')!r} != the message's stream sequence {ack.seq}")
        ok(f"a. record succeeded: value 42, metadata tenant acme, attempts 1, max_retries 3, seq {ack.seq}, "
           f"the {len(RECORD_FIELDS)} fields always written present, no explicit null")

        # The republished writes: every one has Nats-Sequence, revisions rise,
        # the last is the terminal record, equal to a KV get of the key.
        entry = await kv.get(env["id"])
        check(parse_record(entry.value) == record, "KV get disagrees with the terminal record")
        writes = await follower.republished_up_to(entry.revision)
        revisions = [r for r, _ in writes]
        check(revisions == sorted(set(revisions)), f"republished revisions do not rise: {revisions}")
        check(writes[-1] == (entry.revision, record),
              f"the last republished write (revision {writes[-1][0]}) is not the KV's (revision {entry.revision})")
        statuses = [w["status"] for _, w in writes]
        ok(f"a. jetq.records.{env['id']} carried revisions {revisions} with statuses {statuses}; "
           f"the last equals the KV entry")

        # b. the same id again: a duplicate, and the task does not run again.
        ack2 = await publish(js, env)
        check(ack2.duplicate is True, f"second publish of the same Nats-Msg-Id not a duplicate: {ack2}")
        check(ack2.seq == ack.seq, f"duplicate ack seq {ack2.seq} != the first message's {ack.seq}")
        ok(f"b. second publish of {env['id']}: ack duplicate=true, seq {ack2.seq} (the first's)")
        loop = asyncio.get_running_loop()
        try:
            revision, later = await follower.next_republished(loop.time() + 2.0)
            raise CheckFailed(f"the record changed after the duplicate publish (revision {revision}): {later}")
        except nats.errors.TimeoutError:
            pass
        entry2 = await kv.get(env["id"])
        after = parse_record(entry2.value)
        check(entry2.revision == entry.revision and after == record,
              f"record changed after the duplicate publish: {after}")
        check(after["finished_at"] == record["finished_at"] and after["attempts"] == 1,
              "finished_at/attempts changed after the duplicate publish")
        ok(f"b. task did not run again: record unchanged for 2 s (revision {entry.revision}, "
           f"finished_at {after['finished_at']}, attempts 1)")
        return env["id"], entry
    finally:
        await follower.close()


async def run_and_wait(nc, js, kv, env):
    follower = await Follower(nc, kv, env["id"]).subscribe()
    try:
        ack = await publish(js, env)
        check(not ack.duplicate, f"publish acknowledged as a duplicate: {ack}")
        record = await follower.wait_terminal()
        check_record_shape(record, env)
        return record
    finally:
        await follower.close()


async def check_c(nc, js, kv):
    env = envelope(new_id("badargs"), "demo.add", {"a": "x"})
    record = await run_and_wait(nc, js, kv, env)
    check_failed(record, "invalid_args")
    check(record["attempts"] == 1, f"attempts {record['attempts']!r}, expected 1")
    check(record["metadata"] == {}, f"metadata {record['metadata']!r}, expected {{}} (none was sent)")
    ok(f"c. demo.add {{\"a\":\"x\"}}: failed, kind invalid_args, attempts 1 ({record['error']['message']!r})")
    return env


async def check_g(nc, env):
    subject = f"$JS.API.DIRECT.GET.JETQ_DEAD.jetq.dead.{env['id']}"
    msg = await nc.request(subject, b"", timeout=WAIT)
    headers = msg.headers or {}
    check("Status" not in headers, f"no dead letter for {env['id']}: {headers}")
    check(json.loads(msg.data) == env, f"the dead letter's body is not the request: {msg.data!r}")
    for name, want in [("Jetq-Error-Kind", "invalid_args"), ("Jetq-Task", "demo.add"),
                       ("Jetq-Queue", "default"), ("Jetq-Attempts", "1")]:
        check(headers.get(name) == want, f"dead letter header {name} is {headers.get(name)!r}, not {want!r}")
    for name in ["Jetq-Error", "Jetq-Died-At", "Jetq-Worker", "Jetq-Sequence"]:
        check(headers.get(name), f"dead letter has no {name} header: {headers}")
    parse_time(headers["Jetq-Died-At"], "Jetq-Died-At")
    ok(f"g. direct get {subject}: the original request, Jetq-Error-Kind invalid_args, "
       f"Jetq-Error {headers['Jetq-Error'][:40]!r}...")


def rfc3339_in(seconds):
    at = datetime.now(timezone.utc).timestamp() + seconds
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def publish_delayed(js, env):
    """Section 3 "Delayed requests": a one-shot schedule on jetq.delayed.<id>."""
    return await js.publish(
        f"jetq.delayed.{env['id']}",
        json.dumps(env).encode(),
        headers={
            "Nats-Msg-Id": env["id"],
            "Nats-Schedule": f"@at {env['not_before']}",
            "Nats-Schedule-Target": f"jetq.tasks.{env['queue']}.{env['task']}",
        },
        timeout=WAIT,
    )


async def check_h(nc, js, kv):
    env = envelope(new_id("delayed"), "demo.add", {"a": 20, "b": 22})
    env["not_before"] = rfc3339_in(1.5)
    follower = await Follower(nc, kv, env["id"]).subscribe()
    try:
        await publish_delayed(js, env)
        record = await follower.wait_terminal()
    finally:
        await follower.close()
    check(record["status"] == "succeeded" and record["value"] == 42, f"delayed request ended {record}")
    check(record["attempts"] == 1, f"delayed request ran {record['attempts']} times")
    started = parse_time(record["started_at"], "started_at")
    due = parse_time(env["not_before"], "not_before")
    check(started >= due, f"started at {record['started_at']}, before not_before {env['not_before']}")
    ok(f"h. delayed request: published as a schedule, ran once at {record['started_at']} "
       f"(not_before {env['not_before']}, {(started - due).total_seconds() * 1000:.0f} ms later)")


async def check_i(nc, js, kv):
    env = envelope(new_id("cancel"), "demo.add", {"a": 1, "b": 1})
    env["not_before"] = rfc3339_in(1.0)
    # Section 6, submitting: the pending record first, then the schedule.
    # Unset fields are left out, as writers do.
    pending = {
        "v": 1, "id": env["id"], "task": env["task"], "queue": env["queue"], "status": "pending",
        "attempts": 0, "max_retries": 3, "enqueued_at": env["enqueued_at"],
        "next_attempt_at": env["not_before"],
    }
    revision = await kv.create(env["id"], json.dumps(pending).encode())
    await publish_delayed(js, env)
    # Section 6, cancelling: a pending record becomes cancelled, the schedule is purged.
    now = now_rfc3339()
    cancelled = dict(pending, status="cancelled", cancel_requested_at=now, finished_at=now,
                     error={"kind": "cancelled", "message": "cancelled from Python"})
    del cancelled["next_attempt_at"]
    await kv.update(env["id"], json.dumps(cancelled).encode(), last=revision)
    await js.purge_stream("JETQ_TASKS", subject=f"jetq.delayed.{env['id']}")
    # Past its due time, a request published after it completes; the cancelled one did not run.
    await asyncio.sleep(1.2)
    later = envelope(new_id("after-cancel"), "demo.add", {"a": 1, "b": 2})
    await run_and_wait(nc, js, kv, later)
    entry = await kv.get(env["id"])
    record = parse_record(entry.value)
    check(record["status"] == "cancelled" and record["attempts"] == 0,
          f"the cancelled delayed request changed: {record}")
    ok("i. delayed request cancelled (record update + purge of jetq.delayed.<id>): never ran, still cancelled")


async def check_d(nc, js, kv):
    env = envelope(new_id("nope"), "demo.nope", None)
    record = await run_and_wait(nc, js, kv, env)
    check_failed(record, "unknown_task")
    ok(f"d. demo.nope: failed, kind unknown_task, attempts {record['attempts']} ({record['error']['message']!r})")


async def check_e(nc, request_id, entry):
    subject = f"$JS.API.DIRECT.GET.KV_JETQ_RESULTS.$KV.JETQ_RESULTS.{request_id}"
    msg = await nc.request(subject, b"", timeout=WAIT)
    headers = msg.headers or {}
    check("Status" not in headers, f"direct get of an existing record has a status: {headers}")
    check(json.loads(msg.data) == json.loads(entry.value), f"direct get body is not the record: {msg.data!r}")
    ok(f"e. direct get {subject}: body is the record")

    missing = new_id("missing")
    subject = f"$JS.API.DIRECT.GET.KV_JETQ_RESULTS.$KV.JETQ_RESULTS.{missing}"
    msg = await nc.request(subject, b"", timeout=WAIT)
    headers = msg.headers or {}
    check(headers.get("Status") == "404", f"direct get of a missing record: headers {headers}, not Status 404")
    check(msg.data == b"", f"direct get of a missing record has a body: {msg.data!r}")
    ok(f"e. direct get of missing id {missing}: Status 404, empty body")

    body = json.dumps({"last_by_subj": f"$KV.JETQ_RESULTS.{request_id}"}).encode()
    msg = await nc.request("$JS.API.STREAM.MSG.GET.KV_JETQ_RESULTS", body, timeout=WAIT)
    reply = json.loads(msg.data)
    check("message" in reply and "data" in reply["message"], f"stream msg get reply has no message.data: {reply}")
    check(json.loads(base64.b64decode(reply["message"]["data"])) == json.loads(entry.value),
          "stream msg get message.data is not the record")
    ok("e. $JS.API.STREAM.MSG.GET.KV_JETQ_RESULTS {last_by_subj}: message.data (base64) is the record")


async def check_f(nc):
    """Section 8: the document's own Python example, minus its `asyncio.run(main())`."""
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    found = re.search(r"### Python \(nats-py\)\s*```python\n(.*?)```", doc, re.S)
    check(found, f"no ```python block under '### Python (nats-py)' in {DOC}")
    code = found.group(1)
    check("asyncio.run(main())" in code, "the Python example no longer ends with asyncio.run(main())")
    code = code.replace("asyncio.run(main())", "")
    scope = {"__name__": "wire_format_example"}
    exec(compile(code, "docs/wire-format.md (Python example)", "exec"), scope)
    record = await scope["run_task"](nc, "demo.add", {"a": 2, "b": 40}, metadata={"tenant": "acme"}, timeout=WAIT)
    check(record["status"] == "succeeded" and record["value"] == 42,
          f"the document's run_task returned {record}")
    ok("f. the document's Python example run_task(nc, 'demo.add', {a:2,b:40}) returned succeeded, value 42")


async def check_j(nc):
    """Section 8: the document's inbox example (`run_many`), with the first example's imports."""
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    section = doc.split("### Python (nats-py)", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    many = [b for b in blocks if "def run_many" in b]
    check(blocks and many, f"no ```python block with run_many under '### Python (nats-py)' in {DOC}")
    scope = {"__name__": "wire_format_example"}
    exec(compile(blocks[0].replace("asyncio.run(main())", ""), "docs/wire-format.md (Python example)", "exec"), scope)
    exec(compile(many[0], "docs/wire-format.md (inbox example)", "exec"), scope)
    records = await scope["run_many"](nc, "demo.add", [{"a": 1, "b": 2}, {"a": 3, "b": 4}], timeout=WAIT)
    values = sorted(r["value"] for r in records.values())
    check(len(records) == 2 and all(r["status"] == "succeeded" for r in records.values()) and values == [3, 7],
          f"the document's run_many returned {records}")
    ok("j. the document's inbox example run_many: both records arrived on the inbox, values 3 and 7")


def auth_header_function():
    """docs/middleware.md (Auth context): the `jetq_auth_header` function, run as written."""
    with open(AUTH_DOC, encoding="utf-8") as f:
        doc = f.read()
    section = doc.split("## Signing from another language (Python)", 1)
    check(len(section) == 2, f"no section 'Signing from another language (Python)' in {AUTH_DOC}")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section[1], re.S) if "def jetq_auth_header" in b]
    check(blocks, f"no ```python block defining jetq_auth_header in {AUTH_DOC}")
    scope = {"__name__": "middleware_auth_example"}
    exec(compile(blocks[0], "docs/middleware.md (Auth context) (Python example)", "exec"), scope)
    return scope["jetq_auth_header"]


async def check_k(nc, js, kv, secret_file, private_pem_file):
    import jwt  # PyJWT: the Rust test checks that it imports

    sign = auth_header_function()
    secret = open(secret_file).read().strip()  # as the document says
    private_pem = open(private_pem_file, "rb").read()

    def signed(task, queue, header_for=None, **kwargs):
        env = envelope(new_id("auth"), task, None, queue=queue)
        if header_for is not None:
            key, algorithm, user, roles = header_for
            env["headers"] = {"authorization": sign(key, algorithm, kwargs.get("bound_id", env["id"]),
                                                    task, user, roles)}
        return env

    # HS256, the shared secret: the worker runs the task for the signed user.
    env = signed("demo.whoami", "wire-auth-hs", (secret, "HS256", "alice", ["viewer"]))
    token = env["headers"]["authorization"].split(" ", 1)[1]
    check(jwt.get_unverified_header(token)["alg"] == "HS256", f"not an HS256 token: {token[:20]}...")
    record = await run_and_wait(nc, js, kv, env)
    check(record["status"] == "succeeded", f"signed demo.whoami ended {record}")
    want = {"user": "alice", "roles": ["viewer"], "assumed_role": None}
    check(record["value"] == want, f"demo.whoami value {record['value']!r}, expected {want!r}")
    ok(f"k. HS256 token from the document's jetq_auth_header: demo.whoami on wire-auth-hs ran for alice: {record['value']}")

    # EdDSA, the private key; the worker holds the public key only.
    env = signed("demo.admin", "wire-auth-ed", (private_pem, "EdDSA", "root", ["viewer", "admin"]))
    record = await run_and_wait(nc, js, kv, env)
    check(record["status"] == "succeeded" and record["value"] == "ok", f"signed demo.admin ended {record}")
    ok("k. EdDSA token signed with the private key: demo.admin on wire-auth-ed (public key) returned 'ok'")

    # Refusals: ended at once, with their kinds.
    cases = [
        ("unsigned", signed("demo.whoami", "wire-auth-hs"), "unauthenticated"),
        ("bound to another request",
         signed("demo.whoami", "wire-auth-hs", (secret, "HS256", "alice", []), bound_id=new_id("other")),
         "unauthenticated"),
        ("a viewer on demo.admin",
         signed("demo.admin", "wire-auth-ed", (private_pem, "EdDSA", "alice", ["viewer"])), "forbidden"),
    ]
    for label, env, kind in cases:
        record = await run_and_wait(nc, js, kv, env)
        check_failed(record, kind)
        check(record["attempts"] == 1, f"{label}: attempts {record['attempts']!r}, expected 1")
        token = env.get("headers", {}).get("authorization", "Bearer -").split(" ", 1)[1]
        check(token == "-" or token not in record["error"]["message"], f"{label}: the error quotes the token")
        ok(f"k. {label}: failed, kind {kind} ({record['error']['message']!r})")


async def check_l(nc, js, kv):
    """Section 4 `headers`: trace context set by hand, as docs/middleware.md (Tracing) shows."""
    trace_id = uuid.uuid4().hex  # 32 hex digits, not all zero
    span_id = uuid.uuid4().hex[:16]  # 16 hex digits
    traceparent = f"00-{trace_id}-{span_id}-01"  # version 00, sampled
    env = envelope(new_id("traced"), "demo.add", {"a": 20, "b": 22})
    env["headers"] = {"traceparent": traceparent}
    record = await run_and_wait(nc, js, kv, env)
    check(record["status"] == "succeeded" and record["value"] == 42, f"traced request ended {record}")
    ok(f"l. demo.add with a hand-set header: succeeded, traceparent={traceparent} id={env['id']}")


async def check_m(nc, js, kv):
    """Workflows: start, events, send, wake-up, steps, from the document alone."""
    env = envelope(new_id("checkout"), "demo.checkout", {"order": "py1"})
    wf = env["id"]
    follower = await Follower(nc, kv, wf).subscribe()
    try:
        await publish(js, env)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        # Event `status`: follow its republished subject, then read the key.
        events = await nc.subscribe(f"jetq.records.{wf}.event.status")
        try:
            status = None
            try:
                status = json.loads((await kv.get(f"{wf}.event.status")).value)
            except KeyNotFoundError:
                msg = await events.next_msg(timeout=WAIT)
                status = json.loads(msg.data)
            check(status == "reserved", f"event status of {wf} is {status!r}, expected 'reserved'")
        finally:
            await events.unsubscribe()
        # Suspended in its recv: the record says so.
        record = None
        try:
            record = parse_record((await kv.get(wf)).value)
        except KeyNotFoundError:
            pass
        while record is None or record.get("status") != "suspended":
            _, record = await follower.next_republished(deadline)
        check(record.get("waiting") == "recv:payment" and record.get("resume"),
              f"a suspended checkout names its wait and token: {record}")
        check(record["attempts"] == 1, f"attempts {record['attempts']} while suspended")
        # Send the payment (twice: the key sends once), then wake it.
        for _ in range(2):
            ack = await js.publish(f"jetq.mail.{wf}.payment", b'{"amount": 5}',
                                   headers={"Nats-Msg-Id": f"{wf}.pay-1"}, timeout=WAIT)
        check(ack.duplicate, f"the second send with the same key is a duplicate: {ack}")
        current = parse_record((await kv.get(wf)).value)
        check(current["status"] == "suspended" and current["waiting"] == "recv:payment",
              f"still suspended in recv:payment: {current}")
        token = current["resume"]
        # The worker writes the record `suspended` first, then publishes the
        # wake-up schedule (section 6): a sender may find the record before
        # the schedule. The worker then finds the message sent meanwhile
        # and fires the wake-up itself, so a sender that finds no schedule
        # has nothing more to do; this one waits for it, to test both.
        schedule = None
        while schedule is None:
            try:
                schedule = await js.get_last_msg("JETQ_TASKS", f"jetq.delayed.{wf}")
            except NotFoundError:
                try:
                    _, changed = await follower.next_republished(min(loop.time() + 0.05, deadline))
                except nats.errors.TimeoutError:
                    check(loop.time() < deadline, f"no wake-up schedule for {wf} within {WAIT} s")
                    continue
                if changed is not None and changed.get("status") != "suspended":
                    break  # fired by the worker: the schedule is gone
        woken = loop.time()
        if schedule is not None:
            check(schedule.headers.get("Nats-Msg-Id") == f"{wf}.resume.{token}",
                  f"the wake-up schedule carries the record's token: {schedule.headers}")
            target = schedule.headers["Nats-Schedule-Target"]
            check(target == "jetq.tasks.default.demo.checkout", f"the wake-up targets {target}")
            headers = {k: v for k, v in schedule.headers.items() if not k.startswith("Nats-")}
            headers["Nats-Msg-Id"] = f"{wf}.wake.{token}"
            await js.publish(target, schedule.data, headers=headers, timeout=WAIT)
            await js.purge_stream("JETQ_TASKS", subject=f"jetq.delayed.{wf}", seq=schedule.seq + 1)
            woken = loop.time()
        record = await follower.wait_terminal()
        check(loop.time() - woken < WAIT,
              "woken at once, not at the recv's 60 s timeout")
        check(record["status"] == "succeeded" and record["value"] == {"paid": 5},
              f"checkout ended {record}")
        check(record["attempts"] == 1, f"suspensions are not attempts: {record}")
        status = json.loads((await kv.get(f"{wf}.event.status")).value)
        check(status == "shipped", f"event status {status!r}, expected 'shipped'")
        names = []
        for n in range(16):
            try:
                step = json.loads((await kv.get(f"{wf}.step.{n}")).value)
            except KeyNotFoundError:
                break
            check(step["position"] == n, f"step {n} names position {step['position']}")
            names.append(step["name"])
        expected = ["set_event:status", "deadline:recv:payment", "recv:payment", "charge",
                    "sleep", "set_event:status"]
        check(names == expected, f"step log {names}, expected {expected}")
        ok(f"m. demo.checkout from Python: reserved, suspended, sent, woken, shipped; steps {names}")
    finally:
        await follower.close()


async def before_worker(nc):
    """Section 1: publishing before any worker ran fails with NoStreamResponseError."""
    js = nc.jetstream(timeout=WAIT)
    env = envelope(new_id("early"), "demo.add", {"a": 1, "b": 1})
    try:
        ack = await publish(js, env)
    except NoStreamResponseError:
        ok("before any worker: a JetStream publish to jetq.tasks.default.demo.add raises NoStreamResponseError")
        return
    raise CheckFailed(f"a publish before any worker ran was acknowledged: {ack}")


async def main(url, mode, auth_files=None):
    async def on_error(e):  # nats-py logs a traceback per error otherwise
        print(f"nats-py: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    try:
        nc = await nats.connect(url, connect_timeout=WAIT, allow_reconnect=False, max_reconnect_attempts=1,
                                 reconnect_time_wait=0.5, error_cb=on_error)
    except Exception as e:
        raise CheckFailed(f"cannot connect to {url}: {type(e).__name__}: {e}")
    try:
        if mode == "--before-worker":
            await before_worker(nc)
            return
        js = nc.jetstream(timeout=WAIT)
        kv = await wait_for_jetq(js)
        request_id, entry = await check_a_b(nc, js, kv)
        failed = await check_c(nc, js, kv)
        await check_d(nc, js, kv)
        await check_e(nc, request_id, entry)
        await check_f(nc)
        await check_g(nc, failed)
        await check_h(nc, js, kv)
        await check_i(nc, js, kv)
        await check_j(nc)
        if auth_files is not None:
            await check_k(nc, js, kv, *auth_files)
        await check_l(nc, js, kv)
        await check_m(nc, js, kv)
    finally:
        await nc.close()


if __name__ == "__main__":
    rest = sys.argv[2:]
    mode, auth_files = None, None
    if rest == ["--before-worker"]:
        mode = rest[0]
    elif len(rest) == 3 and rest[0] == "--auth":
        auth_files = rest[1:]
    elif rest or len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} NATS_URL [--before-worker | --auth SECRET_FILE ED25519_PRIVATE_PEM]")
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], mode, auth_files), timeout=10 * WAIT))
    except CheckFailed as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
    except asyncio.TimeoutError:
        print(f"FAIL: the checks did not finish within {10 * WAIT:.0f} s", flush=True)
        sys.exit(1)
    except Exception as e:  # a broken assumption about the wire: say which
        traceback.print_exc()
        print(f"FAIL: unexpected {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
    print("all wire-format checks passed" if mode is None else "before-worker check passed", flush=True)
