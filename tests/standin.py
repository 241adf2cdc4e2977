#!/usr/bin/env python3
"""A stand-in web app for the drills: answers HTTP on 127.0.0.1:PORT.

    standin.py PORT                 serve GET / and /health with 200
    standin.py PORT --fork-child    also fork a child that keeps the listening socket
                                    (with KillMode=process it outlives a killed main
                                    process: a stale holder of the port, as after a crash)
    standin.py PORT --config FILE   refuse to start unless FILE says "valid" (a config error)
    standin.py PORT --require-env NAME   refuse to start without $NAME (like a Python KeyError)
    standin.py PORT --data PATH     refuse to start unless PATH can be opened (a database file,
                                    often reached through a symlink)
    standin.py PORT --needs-port N  refuse to start unless something answers on 127.0.0.1:N
                                    within 3 s (an app whose database is down)
    standin.py PORT --say TEXT      print TEXT on a line of its own first (into the journal)
    standin.py PORT --weird-reply   answer GET /health with no HTTP at all: a line and a body
                                    full of terminal escapes (clear screen, set the title, bell)
    standin.py PORT --crash-while FILE   serve, but die (SIGKILL itself) 2 s after it started
                                    while FILE exists: a crash loop whose cause can be removed

Prints "listening" once the socket is bound, so the journal shows it.
"""
import http.server
import os
import socket
import sys
import time


# What --weird-reply sends for /health instead of HTTP: a hostile service's answer that a
# root process must never paste raw into a terminal, a mail or a post.
WEIRD_REPLY = b"\x1b[2J\x1b]0;pwned\x07 200 OK \x1b[31mall good\x1b[0m\r\n\r\n\x1b[2J\x1b]0;pwned\x07body\n"


class Handler(http.server.BaseHTTPRequestHandler):
    weird = False

    def do_GET(self):
        if self.weird and self.path == "/health":
            self.wfile.write(WEIRD_REPLY)
            self.close_connection = True
            return
        body = ("ok %s pid %d\n" % (self.path, os.getpid())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def option(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def refuse_if_broken(argv):
    config, env, data = option(argv, "--config"), option(argv, "--require-env"), option(argv, "--data")
    needs = option(argv, "--needs-port")
    deadline = time.monotonic() + 3
    while needs:
        try:
            socket.create_connection(("127.0.0.1", int(needs)), timeout=1).close()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit("cannot reach what it needs on 127.0.0.1:%s: %s" % (needs, exc))
            time.sleep(0.1)
    if config and "valid" not in open(config).read():
        sys.exit("config error in %s: unknown directive" % config)
    if env:
        os.environ[env]  # KeyError: 'NAME' in the journal, as a Python app would say it
    if data:
        open(data).close()  # FileNotFoundError: No such file or directory


def main(argv):
    port = int(argv[1])
    if "--say" in argv:
        print(option(argv, "--say"), flush=True)
    refuse_if_broken(argv)
    Handler.weird = "--weird-reply" in argv
    server = http.server.HTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.server_bind()
    server.server_activate()
    if "--fork-child" in argv and os.fork() == 0:
        while True:  # the child only holds the socket
            time.sleep(3600)
    print("listening on 127.0.0.1:%d" % port, flush=True)
    cause = option(argv, "--crash-while")
    if cause and os.path.exists(cause):
        import signal
        import threading

        threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
