"""A tiny SMTP server for the fast tests: it accepts mail on 127.0.0.1 and keeps it.

    with SmtpSink() as sink:                 # listens on 127.0.0.1, a free port
        ...send to sink.host, sink.port...
        sink.messages[0]["Subject"]          # email.message.EmailMessage (policy.default)

Speaks EHLO/HELO, MAIL, RCPT, DATA (with dot-unstuffing), RSET, NOOP, QUIT and AUTH.
`mode` (changeable while running; read at each new connection) makes it misbehave:

    "ok"         accept everything (AUTH too)
    "close"      close the connection before the greeting
    "554"        greet with 554 (service refused) and close
    "auth-fail"  answer every AUTH with 535
    "rcpt-550"   refuse every recipient for good (550)
    "rcpt-450"   refuse every recipient for now (450)

Standard library only; Python 3.9+.
"""

import email
import email.message
import email.policy
import socketserver
import threading
import time
from typing import List, NamedTuple, Optional, Tuple


class Received(NamedTuple):
    mail_from: str
    rcpt_to: Tuple[str, ...]
    data: bytes  # the message as received, dot-unstuffed, CRLF line ends
    message: email.message.EmailMessage  # parsed with LF line ends, like a mailbox


def _address(arg: str) -> str:
    """'FROM:<a@b> SIZE=10' -> 'a@b'."""
    value = arg.split(":", 1)[1].strip() if ":" in arg else ""
    if value.startswith("<"):
        return value[1:value.find(">")] if ">" in value else value[1:]
    return value.split(" ")[0]


class _Handler(socketserver.StreamRequestHandler):
    timeout = 30  # a test that forgets to QUIT must not hang the server thread forever

    def reply(self, *lines: str) -> None:
        self.wfile.write("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def handle(self) -> None:
        sink: "SmtpSink" = self.server.sink  # type: ignore[attr-defined]
        mode = sink.mode
        with sink.lock:
            sink.connections += 1
        if mode == "close":
            return
        if mode == "554":
            self.reply("554 5.3.2 sink.test refuses service")
            return
        self.reply("220 sink.test ESMTP test sink")
        mail_from: Optional[str] = None
        rcpts: List[str] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with sink.lock:
                sink.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.reply("250-sink.test", "250-8BITMIME", "250-AUTH PLAIN LOGIN", "250 HELP")
            elif verb == "HELO":
                self.reply("250 sink.test")
            elif verb == "MAIL":
                if not arg.upper().startswith("FROM:"):
                    self.reply("501 5.5.4 syntax: MAIL FROM:<address>")
                    continue
                mail_from, rcpts = _address(arg), []
                self.reply("250 2.1.0 ok")
            elif verb == "RCPT":
                if mail_from is None:
                    self.reply("503 5.5.1 MAIL first")
                elif not arg.upper().startswith("TO:"):
                    self.reply("501 5.5.4 syntax: RCPT TO:<address>")
                elif sink.mode in ("rcpt-550", "rcpt-450"):
                    code = sink.mode[-3:]
                    self.reply("%s %s.1.1 <%s>: recipient refused" % (code, code[0], _address(arg)))
                else:
                    rcpts.append(_address(arg))
                    self.reply("250 2.1.5 ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 end data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                parsed = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
                sink._store(Received(mail_from, tuple(rcpts), data, parsed))
                mail_from, rcpts = None, []
                self.reply("250 2.0.0 ok: queued")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self.reply("250 2.0.0 ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 ok")
            elif verb == "AUTH":
                with sink.lock:
                    sink.auth_attempts += 1
                if sink.mode == "auth-fail":
                    self.reply("535 5.7.8 authentication credentials invalid")
                else:
                    self.reply("235 2.7.0 authentication successful")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.2 command not implemented")

    def _read_data(self) -> Optional[bytes]:
        lines = []
        while True:
            raw = self.rfile.readline(1 << 20)
            if not raw:
                return None  # the client went away mid-message: nothing is stored
            if raw in (b".\r\n", b".\n"):
                return b"".join(lines)
            if raw.startswith(b".."):
                raw = raw[1:]
            lines.append(raw)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class SmtpSink:
    """A running SMTP sink on 127.0.0.1 (port chosen by the kernel)."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.lock = threading.Lock()
        self.received: List[Received] = []
        self.commands: List[str] = []
        self.connections = 0
        self.auth_attempts = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.sink = self  # type: ignore[attr-defined]
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="smtp-sink", daemon=True)
        self._thread.start()

    @property
    def messages(self) -> List[email.message.EmailMessage]:
        with self.lock:
            return [r.message for r in self.received]

    def _store(self, received: Received) -> None:
        with self.lock:
            self.received.append(received)

    def wait(self, count: int = 1, timeout: float = 5.0) -> List[email.message.EmailMessage]:
        """The messages once at least count have arrived; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError("smtp sink: %d message(s) after %.1f s, wanted %d"
                                     % (len(self.messages), timeout, count))
            time.sleep(0.01)
        return self.messages

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "SmtpSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # manual use: python3 tests/smtp_sink.py, then mail the port shown
    with SmtpSink() as running:
        print("smtp sink on %s:%d; Ctrl-C to stop" % (running.host, running.port), flush=True)
        shown = 0
        try:
            while True:
                time.sleep(0.5)
                with running.lock:
                    new = running.received[shown:]
                shown += len(new)
                for item in new:
                    print("from %s to %s: %s" % (item.mail_from, ", ".join(item.rcpt_to), item.message["Subject"]),
                          flush=True)
        except KeyboardInterrupt:
            pass
