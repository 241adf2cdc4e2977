#!/usr/bin/env python3
"""notes: a small app of our own for the failure corpus (tests/corpus.py), written the way
small Python services are: stdlib HTTP on 127.0.0.1:$NOTES_PORT, its settings in an
environment file, its data in a SQLite file, Type=notify with a systemd watchdog, and a
MemoryMax= in its unit.

    GET /health   200 once a row count was read from the database, else 500
    GET /leak     its main loop allocates memory until MemoryMax= (the kernel) or LimitAS= (MemoryError)
                  ends it
    GET /freeze   stops the main loop: no request is served and no WATCHDOG=1 is sent
    GET /crash    the main loop raises RuntimeError (a bug): the traceback goes to the journal

At start it needs NOTES_SECRET (KeyError otherwise, as a Python app says it) and NOTES_DB
(an SQLite file it opens read-write: "unable to open database file", "file is not a
database"...). Stdlib only.
"""

import http.server
import os
import socket
import sqlite3
import time


def sd_notify(message):
    """One datagram to systemd's $NOTIFY_SOCKET (READY=1, WATCHDOG=1); nothing without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class Handler(http.server.BaseHTTPRequestHandler):
    db = None

    def do_GET(self):
        if self.path == "/leak":
            self.reply(200, "leaking\n")
            self.server.leak = True
            return
        if self.path == "/freeze":
            self.reply(200, "freezing\n")
            time.sleep(3600)
        if self.path == "/crash":
            self.reply(200, "crashing\n")
            self.server.crash = True
            return
        try:
            count = self.db.execute("SELECT count(*) FROM notes").fetchone()[0]
        except sqlite3.Error as exc:
            self.reply(500, "database: %s\n" % exc)
            return
        self.reply(200, "ok: %d notes\n" % count)

    def reply(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, *args):
        pass


def main():
    secret = os.environ["NOTES_SECRET"]  # KeyError: 'NOTES_SECRET' in the journal when it is missing
    del secret
    path = os.environ["NOTES_DB"]
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT)")
    db.execute("SELECT count(*) FROM notes").fetchone()
    Handler.db = db
    port = int(os.environ.get("NOTES_PORT", "5480"))
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    server.timeout = 0.5
    server.crash = server.leak = False
    hoard = []
    print("notes: serving %s on 127.0.0.1:%d" % (path, port), flush=True)
    sd_notify("READY=1")
    while True:
        server.handle_request()
        if server.crash:
            raise RuntimeError("notes: the search index is inconsistent, refusing to go on")
        while server.leak:  # a leak in its main loop, fed fast enough to outrun the watchdog
            hoard.append(bytearray(32 << 20))
        sd_notify("WATCHDOG=1")


if __name__ == "__main__":
    main()
