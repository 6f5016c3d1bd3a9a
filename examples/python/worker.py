"""A Gantry worker speaking the raw gantry.v1.Worker/Connect stream.

It says hello, heartbeats from a background thread every welcome.heartbeat_interval,
runs each assigned job in a thread pool (max_in_flight threads) and answers
complete or fail with the job's fencing token. With --max-jobs it says goodbye
once it has handled that many jobs; SIGINT or SIGTERM stop it the same way.
Jobs pushed to it while it stops are released (given back unstarted).

The demo handler upper-cases the payload and returns it as the result, except:
  fail...          fails for good (no_retry): the job ends FAILED
  flaky...         fails its first attempt and asks for a retry after --retry-after
  sleep:SECONDS    works that long first (heartbeats keep the session alive)

    python worker.py --queue demo --max-jobs 10
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

import stubs

log = logging.getLogger("worker")
GOODBYE_LINGER = 5.0  # seconds to wait for the broker to end the stream after goodbye
pb = stubs.load()
wpb = pb.worker_pb2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--addr",
        default=os.environ.get("GANTRY_ADDR", "127.0.0.1:50051"),
        help="broker host:port (default: $GANTRY_ADDR or %(default)s)",
    )
    parser.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="queue to take jobs from; repeat for more (default: demo)",
    )
    parser.add_argument(
        "--worker-id", default=f"python-{socket.gethostname()}-{os.getpid()}", help="name shown by ListWorkers"
    )
    parser.add_argument("--max-in-flight", type=int, default=4, help="jobs run at once (default: %(default)s)")
    parser.add_argument(
        "--max-jobs", type=int, default=0, help="say goodbye after this many jobs; 0: run until stopped"
    )
    parser.add_argument(
        "--retry-after", type=float, default=1.0, help="seconds before a flaky job's retry (default: %(default)s)"
    )
    args = parser.parse_args()
    args.queues = args.queues or ["demo"]
    return args


def handle(job, attempt: int, retry_after: float) -> wpb.WorkerMessage:
    """The demo handler: returns the complete or fail message for one job."""
    payload = job.payload.decode(errors="replace")
    if payload.startswith("sleep:"):
        time.sleep(float(payload.removeprefix("sleep:")))
    if payload.startswith("fail"):
        fail = wpb.Fail(error=f"refusing {payload!r}", no_retry=True)
        return wpb.WorkerMessage(fail=fail)
    if payload.startswith("flaky") and attempt == 1:
        fail = wpb.Fail(error="flaky: the first attempt fails", retry_after=stubs.duration(retry_after))
        return wpb.WorkerMessage(fail=fail)
    return wpb.WorkerMessage(complete=wpb.Complete(result=payload.upper().encode()))


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # Messages for the broker, in order; None ends the request stream.
        self.outbox: queue.Queue[wpb.WorkerMessage | None] = queue.Queue()
        # Everything the main loop reacts to: ("broker", BrokerMessage),
        # ("done", (key, WorkerMessage)) from a job thread, ("closed", error).
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=args.max_in_flight, thread_name_prefix="job")
        self.heartbeats_stop = threading.Event()
        self.taken = 0  # jobs accepted, counted against --max-jobs
        self.running: set[tuple[str, int]] = set()  # (job_id, fencing_token) being handled
        self.unacked: dict[tuple[str, int], str] = {}  # answers sent, not yet acked
        self.counts = {"complete": 0, "fail": 0, "release": 0}
        self.stop_signal: int | None = None
        self.stopping = False
        self.said_goodbye = False
        self.goodbye_at = 0.0

    def send(self, message: wpb.WorkerMessage) -> None:
        self.outbox.put(message)

    def requests(self):
        """The request stream grpcio reads from, on a thread of its own."""
        while (message := self.outbox.get()) is not None:
            yield message

    def read(self, responses) -> None:
        """Moves the broker's messages to the main loop, on a thread of its own."""
        try:
            for message in responses:
                self.events.put(("broker", message))
            self.events.put(("closed", None))
        except grpc.RpcError as e:
            self.events.put(("closed", e))

    def heartbeat(self, interval: float) -> None:
        while not self.heartbeats_stop.wait(interval):
            self.send(wpb.WorkerMessage(heartbeat=wpb.Heartbeat()))

    def run(self) -> int:
        args = self.args
        hello = wpb.Hello(worker_id=args.worker_id, queues=args.queues, max_in_flight=args.max_in_flight)
        self.send(wpb.WorkerMessage(hello=hello))
        with grpc.insecure_channel(args.addr) as channel:
            responses = pb.worker_pb2_grpc.WorkerStub(channel).Connect(self.requests())
            threading.Thread(target=self.read, args=(responses,), daemon=True).start()
            try:
                return self.loop()
            finally:
                self.heartbeats_stop.set()
                self.outbox.put(None)
                responses.cancel()
                self.pool.shutdown(wait=False, cancel_futures=True)

    def loop(self) -> int:
        while True:
            try:
                kind, value = self.events.get(timeout=0.2)
            except queue.Empty:
                kind, value = "tick", None
            if kind == "broker":
                self.on_message(value)
            elif kind == "done":
                self.on_done(*value)
            elif kind == "closed":
                if value is None and self.said_goodbye:
                    log.info("done: %s", ", ".join(f"{n} {what}" for what, n in self.counts.items()))
                    return 0
                reason = f"{value.code().name}: {value.details()}" if value else "the broker ended the stream"
                log.error("stream closed: %s", reason)
                return 1
            if self.stop_signal is not None and not self.stopping:
                log.info("%s: finishing running jobs, then goodbye", signal.Signals(self.stop_signal).name)
                self.begin_stopping()
            if self.stopping and not self.said_goodbye and not self.running and not self.unacked:
                log.info("goodbye")
                self.said_goodbye = True
                self.goodbye_at = time.monotonic()
                self.heartbeats_stop.set()
                self.send(wpb.WorkerMessage(goodbye=wpb.Goodbye()))
                self.outbox.put(None)  # half-close: the broker ends the stream
            if self.said_goodbye and time.monotonic() - self.goodbye_at > GOODBYE_LINGER:
                log.warning("the broker did not close the stream within %ss of goodbye", GOODBYE_LINGER)
                return 0

    def begin_stopping(self) -> None:
        """Graceful shutdown: finish running jobs, release the rest, goodbye."""
        self.stopping = True
        # Drain first: the broker assigns nothing more, so jobs released from
        # now on go to other workers instead of coming straight back here.
        self.send(wpb.WorkerMessage(drain=wpb.Drain()))

    def on_message(self, message: wpb.BrokerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "welcome":
            welcome = message.welcome
            interval = welcome.heartbeat_interval.ToTimedelta().total_seconds() or 1.0
            log.info(
                "welcome: session %s on node %d, heartbeat every %ss", welcome.session_id, welcome.node_id, interval
            )
            threading.Thread(target=self.heartbeat, args=(interval,), daemon=True).start()
        elif kind == "assign":
            self.on_assign(message.assign)
        elif kind == "ack":
            ack = message.ack
            sent = self.unacked.pop((ack.job_id, ack.fencing_token), "?")
            status = wpb.AckStatus.Name(ack.status).removeprefix("ACK_STATUS_")
            log.info("job %s: %s %s%s", ack.job_id, sent, status, f" ({ack.message})" if ack.message else "")
        elif kind == "revoke":
            revoke = message.revoke
            # The job belongs to someone else now; its result would be refused.
            self.running.discard((revoke.job_id, revoke.fencing_token))
            log.warning("job %s revoked: %s", revoke.job_id, revoke.reason)
        elif kind == "redirect":
            log.error("not the leader: connect to %s instead", message.redirect.leader_address)
            self.stopping = True

    def on_assign(self, assign: wpb.Assign) -> None:
        job_id, token = assign.job.id, assign.fencing_token
        if self.said_goodbye:
            return  # the stream is closed for sending; goodbye requeues the job
        if self.stopping:
            self.answer((job_id, token), wpb.WorkerMessage(release=wpb.Release()))
            return
        self.taken += 1
        if self.args.max_jobs and self.taken >= self.args.max_jobs:
            self.begin_stopping()  # this is the last one
        log.info("job %s: attempt %d, %d bytes", job_id, assign.attempt, len(assign.job.payload))
        self.running.add((job_id, token))
        self.pool.submit(self.work, assign)

    def work(self, assign: wpb.Assign) -> None:
        """Runs on a pool thread; hands the answer back to the main loop."""
        try:
            attempt = assign.attempt or assign.job.attempt
            answer = handle(assign.job, attempt, self.args.retry_after)
        except Exception as e:  # a crashing handler: let the queue's backoff apply
            answer = wpb.WorkerMessage(fail=wpb.Fail(error=f"{type(e).__name__}: {e}"))
        self.events.put(("done", ((assign.job.id, assign.fencing_token), answer)))

    def on_done(self, key: tuple[str, int], answer: wpb.WorkerMessage) -> None:
        if key not in self.running:
            return  # revoked meanwhile
        self.running.discard(key)
        self.answer(key, answer)

    def answer(self, key: tuple[str, int], message: wpb.WorkerMessage) -> None:
        """Sends complete, fail or release for the job under its fencing token."""
        kind = message.WhichOneof("kind")
        body = getattr(message, kind)
        body.job_id, body.fencing_token = key
        self.counts[kind] += 1
        self.unacked[key] = kind
        self.send(message)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    worker = Worker(parse_args())

    def on_signal(signum, _frame):
        if worker.stop_signal is not None:
            sys.exit(128 + signum)  # a second signal: stop now, without goodbye
        worker.stop_signal = signum  # the main loop notices within 0.2 s

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
