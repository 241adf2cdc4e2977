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

Prints "listening" once the socket is bound, so the journal shows it.
"""
import http.server
import os
import socket
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
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
    if config and "valid" not in open(config).read():
        sys.exit("config error in %s: unknown directive" % config)
    if env:
        os.environ[env]  # KeyError: 'NAME' in the journal, as a Python app would say it
    if data:
        open(data).close()  # FileNotFoundError: No such file or directory


def main(argv):
    port = int(argv[1])
    refuse_if_broken(argv)
    server = http.server.HTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.server_bind()
    server.server_activate()
    if "--fork-child" in argv and os.fork() == 0:
        while True:  # the child only holds the socket
            time.sleep(3600)
    print("listening on 127.0.0.1:%d" % port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
