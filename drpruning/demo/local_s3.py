"""An S3-compatible server on loopback (moto's server mode), for the remote-data tests and benchmark.

`make install` installs moto as a development dependency. The server runs in its own process, so it does
not compete with the reader for the GIL. Streaming and boto3 find it through `S3_ENDPOINT_URL` and fake
credentials, which this sets for the block and which subprocesses inherit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

ENDPOINT_VARIABLE = "S3_ENDPOINT_URL"


@contextlib.contextmanager
def local_s3_bucket(bucket: str = "drpruning") -> Iterator[str]:
    """Start a server on a free loopback port, create `bucket`, yield its `s3://` URL; stop and restore after."""
    if importlib.util.find_spec("moto") is None:
        raise RuntimeError("a local S3 server needs moto: pip install 'moto[server]' (make install does)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's server did not start on port {port}") from None
            time.sleep(0.2)
    settings = {ENDPOINT_VARIABLE: f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        s3_client().create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_client():  # noqa: ANN201 (boto3's client type is generated)
    """A boto3 S3 client for the server that `local_s3_bucket` started."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ[ENDPOINT_VARIABLE])
