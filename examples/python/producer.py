"""Enqueue jobs into a Gantry queue over gantry.v1.Jobs; with --wait, wait for them.

Prints one line per job, tab-separated: its id and state, and with --wait
its result (SUCCEEDED) or last error (FAILED, CANCELLED).

    python producer.py --queue demo --count 5 --payload 'hello {i}' --wait
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import stubs

pb = stubs.load()
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def state_name(state: int) -> str:
    return pb.job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--addr",
        default=os.environ.get("GANTRY_ADDR", "127.0.0.1:50051"),
        help="broker host:port (default: $GANTRY_ADDR or %(default)s)",
    )
    parser.add_argument("--queue", default="demo", help="queue to enqueue into (default: %(default)s)")
    parser.add_argument("-n", "--count", type=int, default=10, help="how many jobs (default: %(default)s)")
    parser.add_argument(
        "--payload",
        default="job-{i}",
        help="payload of each job, {i} replaced by its number from 0 (default: %(default)s)",
    )
    parser.add_argument("--priority", type=int, default=0, help="higher goes out first")
    parser.add_argument("--max-attempts", type=int, default=0, help="0: the queue's default")
    parser.add_argument("--wait", action="store_true", help="wait for every job to end (WaitJob)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="with --wait: seconds to wait for each job (default: %(default)s)"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    with grpc.insecure_channel(args.addr) as channel:
        jobs = pb.jobs_pb2_grpc.JobsStub(channel)
        job_ids = []
        for i in range(args.count):
            request = pb.jobs_pb2.EnqueueRequest(
                queue=args.queue,
                payload=args.payload.replace("{i}", str(i)).encode(),
                priority=args.priority,
                max_attempts=args.max_attempts,
            )
            response = jobs.Enqueue(request, timeout=10)
            job_ids.append(response.job_id)
            if not args.wait:
                print(f"{response.job_id}\t{state_name(response.state)}", flush=True)
        if not args.wait:
            return 0

        unfinished = 0
        for job_id in job_ids:
            request = pb.jobs_pb2.WaitJobRequest(job_id=job_id, timeout=stubs.duration(args.timeout))
            job = jobs.WaitJob(request, timeout=args.timeout + 10)
            state = state_name(job.state)
            outcome = job.result.decode(errors="replace") if state == "SUCCEEDED" else job.error
            print(f"{job.id}\t{state}\t{outcome}", flush=True)
            unfinished += state not in TERMINAL
    if unfinished:
        print(f"{unfinished} job(s) still not finished after {args.timeout}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as e:
        sys.exit(f"gantry: {e.code().name}: {e.details()}")
    except KeyboardInterrupt:
        sys.exit(130)
