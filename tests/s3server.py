"""A real S3 endpoint on 127.0.0.1 for the bucket tests and benchmarks: moto's server mode in
its own process group on a free port, the ``AWS_*`` variables pointing at it while it runs
(pyarrow's client, boto3 and every subprocess, Ray workers included, read them). Nothing of
ours is patched. Test-only (moto is a dev extra); ``bench/buckets.py`` uses it too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def moto_server_path() -> Path | None:
    path = Path(sys.executable).with_name("moto_server")
    return path if path.exists() else None


@contextmanager
def moto_endpoint():
    """Yields the endpoint URL; stops the server and restores the environment after."""
    server = moto_server_path()
    if server is None:
        raise RuntimeError("moto_server not found: pip install -e '.[dev]' (make test does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own group: nothing else on the machine
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
