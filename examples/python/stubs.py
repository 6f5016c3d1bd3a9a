"""Python stubs for gantry.v1, generated from the repository's proto/ files.

producer.py and worker.py call load(): the first run generates the stubs with
grpcio-tools (no protoc install needed) under _gen/ beside this file, or
$GANTRY_STUBS_DIR; later runs reuse them until a .proto file changes.
Run this file to generate them ahead of time and print where they are.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
PROTO_DIR = Path(os.environ.get("GANTRY_PROTO_DIR", HERE.parent.parent / "proto"))
STUBS_DIR = Path(os.environ.get("GANTRY_STUBS_DIR", HERE / "_gen"))
INSTALL_HINT = f"python3 -m pip install -r {HERE / 'requirements.txt'}"


def generate() -> Path:
    """Generates the stubs if needed; returns the directory to import them from."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit(f"grpcio-tools is not installed: {INSTALL_HINT}")

    protos = sorted(PROTO_DIR.glob("gantry/v1/*.proto"))
    if not protos:
        sys.exit(f"no gantry/v1/*.proto under {PROTO_DIR} (set GANTRY_PROTO_DIR)")
    # One directory per version of the protos: a changed .proto gets fresh
    # stubs, and processes starting at once never see half-written ones.
    digest = hashlib.sha256()
    for proto in protos:
        digest.update(proto.relative_to(PROTO_DIR).as_posix().encode())
        digest.update(proto.read_bytes())
    target = STUBS_DIR / digest.hexdigest()[:16]
    if target.is_dir():
        return target

    STUBS_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=STUBS_DIR))
    scratch.chmod(0o755)  # mkdtemp makes it private
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(proto) for proto in protos),
        ]
    )
    if status != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        sys.exit(f"protoc failed on {PROTO_DIR} (exit {status})")
    try:
        scratch.rename(target)
    except OSError:  # another process got there first with the same stubs
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load() -> SimpleNamespace:
    """Imports the gantry.v1 messages and service stubs, generating them if needed."""
    path = str(generate())
    if path not in sys.path:
        sys.path.insert(0, path)
    modules = {
        name: importlib.import_module(f"gantry.v1.{name}")
        for name in ("job_pb2", "jobs_pb2", "jobs_pb2_grpc", "worker_pb2", "worker_pb2_grpc")
    }
    return SimpleNamespace(**modules)


def duration(seconds: float):
    """A google.protobuf.Duration of `seconds`."""
    from google.protobuf.duration_pb2 import Duration

    value = Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


if __name__ == "__main__":
    print(generate())
