"""S3 throttling: botocore's adaptive retry mode with enough attempts rides out a burst of 503 SlowDown
answers (a real moto S3 server behind a proxy that throttles), and a dead endpoint still fails in seconds."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from recdata import storage
from recdata.storage import StorageError
from tests.conftest import free_port

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class ThrottlingProxy:
    """Answers the first `throttle` requests with 503 SlowDown, forwards the rest to the S3 server."""

    def __init__(self, upstream: str, throttle: int) -> None:
        self.upstream = urlsplit(upstream)
        self.remaining = throttle
        self.throttled = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    throttle = proxy.remaining > 0
                    proxy.remaining -= throttle
                    proxy.throttled += throttle
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                res = conn.getresponse()
                data = res.read()
                self.send_response(res.status)
                for k, v in res.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer carries the object's length without a body.
                length = res.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def throttled(s3_server, s3_bucket):
    url = f"{s3_bucket}/data/object.json"
    storage.write_json_atomic(url, {"payload": list(range(100))})
    proxy = ThrottlingProxy(s3_server, throttle=4)
    yield proxy, url
    proxy.close()


def test_throttling_burst_is_retried(throttled, monkeypatch):
    proxy, url = throttled
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    storage.configure(endpoint_url=proxy.endpoint)
    assert storage.read_json(url) == {"payload": list(range(100))}
    assert proxy.throttled == 4  # four 503 SlowDown answers were absorbed by retries


def test_too_few_attempts_fail_on_the_same_burst(throttled, monkeypatch):
    # The old setting (2 attempts) cannot ride out the burst: the retries above are what makes the difference.
    proxy, url = throttled
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage.configure(endpoint_url=proxy.endpoint)
    with pytest.raises((StorageError, OSError)):
        storage.read_json(url)
    assert proxy.throttled >= 2


def test_dead_endpoint_fails_in_seconds(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-printed")
    port = free_port()  # nothing listens there
    storage.configure(endpoint_url=f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"s3://bucket/x: storage unreachable \(endpoint http://127.0.0.1:{port}\)"):
        storage.exists("s3://bucket/x")
    assert time.monotonic() - t0 < 10


def test_bad_max_attempts_is_named(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "ten")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS='ten'"):
        storage.get_fs("s3://bucket/x")
