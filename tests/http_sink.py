"""A tiny HTTP server for the webhook and heartbeat tests: it answers every request and
keeps it.

    with HttpSink() as sink:                 # listens on 127.0.0.1, a free port
        ...post to sink.url("/hook")...
        sink.requests[0].json()              # .method .path .headers .body

`status` (changeable while running) is the answer to every request: 200 by default; 500,
429 or 404 make it misbehave the way a webhook service can. `delay` (seconds) holds each
answer back (a hung service).

As a program it is the sink of the drills, run as a unit inside the container; each
request is appended to LOG as one JSON line ({"ts", "method", "path", "headers", "body"}):

    python3 tests/http_sink.py PORT LOG

Standard library only; Python 3.9+.
"""

import http.server
import json
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional


class Request(NamedTuple):
    method: str
    path: str
    headers: Dict[str, str]  # as sent (names as the client wrote them)
    body: bytes
    ts: float

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def text(self) -> str:
        return self.body.decode("utf-8")

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that never finishes must not hang the server thread forever

    def _answer(self) -> None:
        sink: "HttpSink" = self.server.sink  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        sink._store(Request(self.command, self.path, dict(self.headers.items()), body, time.time()))
        if sink.delay:
            time.sleep(sink.delay)
        status = sink.status
        answer = ("ok\n" if status < 300 else "sink says %d\n" % status).encode()
        try:
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a client that gave up during the delay (webhook_timeout): what the test is about

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:  # quiet: the requests are kept, not printed
        pass


class _Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class HttpSink:
    """A running HTTP sink (port chosen by the kernel unless given)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log: Optional[str] = None):
        self.status = 200
        self.delay = 0.0
        self.lock = threading.Lock()
        self.received: List[Request] = []
        self._log = log
        self._server = _Server((host, port), _Handler)
        self._server.sink = self  # type: ignore[attr-defined]
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="http-sink", daemon=True)
        self._thread.start()

    def url(self, path: str = "/") -> str:
        return "http://%s:%d%s" % (self.host, self.port, path)

    @property
    def requests(self) -> List[Request]:
        with self.lock:
            return list(self.received)

    def _store(self, request: Request) -> None:
        with self.lock:
            self.received.append(request)
            if self._log:
                line = json.dumps({"ts": request.ts, "method": request.method, "path": request.path,
                                   "headers": request.headers, "body": request.body.decode("utf-8", "replace")})
                with open(self._log, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")

    def wait(self, count: int = 1, timeout: float = 5.0, path: Optional[str] = None) -> List[Request]:
        """The requests (to `path`, if given) once at least count have arrived; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.requests if path is None or r.path == path]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError("http sink: %d request(s) after %.1f s, wanted %d" % (len(found), timeout, count))
            time.sleep(0.01)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HttpSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # the drills' sink: python3 http_sink.py PORT LOG
    if len(sys.argv) != 3 or not sys.argv[1].isdigit():
        sys.exit("usage: http_sink.py PORT LOG")
    running = HttpSink("127.0.0.1", int(sys.argv[1]), log=sys.argv[2])
    print("http sink on %s:%d, logging to %s" % (running.host, running.port, sys.argv[2]), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        running.close()
