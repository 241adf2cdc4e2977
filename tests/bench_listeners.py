#!/usr/bin/env python3
"""Benchmark (not a test): the port probes on a busy host, the kernel's answer against /proc.

    python3 tests/bench_listeners.py [--connections 20000] [--runs 30]

Opens N established TCP connections on 127.0.0.1 (both ends held by worker processes, at most
10,000 connections each: 2N sockets, 2N lines in /proc/net/tcp), and one listener here, then times
`listening_ports()` and `listen_inodes(port)` as a heal and the watch call them: first as
they are (NETLINK_SOCK_DIAG, LISTEN state only), then with netlink refused, as in a sandbox
without AF_NETLINK, so the same calls read /proc/net/tcp and tcp6. Each call is one probe;
verify probes every 50 ms.

A worker needs 2 file descriptors per connection: RLIMIT_NOFILE is raised as far as allowed,
and a lower limit means more workers.
Prints p50 and p95 in ms per call and source, and how many sockets /proc/net lists.
"""

import argparse
import errno
import os
import resource
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import selfheal  # noqa: E402

PER_WORKER = 10000  # connections per process (and per listening port)


def raise_nofile(wanted):
    """Raise RLIMIT_NOFILE towards wanted (the hard limit too, given CAP_SYS_RESOURCE) -> the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((max(wanted, soft), max(wanted, hard)), (min(max(wanted, soft), hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return limits[0]
        except (ValueError, OSError):
            continue
    return soft


def hold_connections(count):
    """Fork a process holding count established loopback connections (both ends, on a listener
    of its own) -> (its pid, a pipe end that says when they are up; closing it ends the process)."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(ready_r), os.close(stop_w)
        code = 1
        try:
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(1024)
            held = []
            for _ in range(count):
                held.append(socket.create_connection(server.getsockname(), timeout=5))
                held.append(server.accept()[0])
            os.write(ready_w, b"up")
            os.read(stop_r, 1)  # until the benchmark closes its end
            code = 0
        except BaseException as exc:
            os.write(ready_w, ("error: %s" % exc).encode()[:200])
        finally:
            os._exit(code)
    os.close(ready_w), os.close(stop_r)
    said = os.read(ready_r, 256).decode()
    os.close(ready_r)
    if said != "up":
        sys.exit("bench_listeners: a worker could not connect: %s" % (said or "it died"))
    return pid, stop_w


def connect_all(count):
    """count established loopback connections, held by worker processes (each within this
    process's file descriptor limit) -> [(pid, stop pipe)]."""
    per_worker = max(1, min(PER_WORKER, (raise_nofile(2 * PER_WORKER + 64) - 64) // 2))
    return [hold_connections(min(per_worker, count - start)) for start in range(0, count, per_worker)]


def proc_lines():
    lines = 0
    for name in ("tcp", "tcp6"):
        try:
            with open("/proc/net/" + name) as handle:
                lines += sum(1 for _ in handle) - 1
        except FileNotFoundError:
            pass
    return lines


def timed(call, runs):
    call()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


def refused(timeout=None):
    raise PermissionError(errno.EPERM, "Operation not permitted")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20000, help="established connections (default 20000)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per figure (default 30)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workers = connect_all(args.connections)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    print("%d connections (%d sockets) in %.1f s by %d worker(s); /proc/net/tcp{,6} list %d sockets"
          % (args.connections, 2 * args.connections, time.monotonic() - started, len(workers), proc_lines()))
    try:
        figures = []
        for source in ("netlink", "proc"):
            if source == "proc":
                selfheal.sock_diag_listeners = refused  # as a sandbox without AF_NETLINK answers
            assert port in selfheal.listening_ports(), "%s missed the listener" % source
            assert selfheal.listen_inodes(port) == {str(os.fstat(listener.fileno()).st_ino)}, source
            figures.append((source, "listening_ports()", timed(selfheal.listening_ports, args.runs)))
            figures.append((source, "listen_inodes(port)", timed(lambda: selfheal.listen_inodes(port), args.runs)))
    finally:
        listener.close()
        for _, stop in workers:  # all first: a later worker inherited the earlier ones' pipes
            os.close(stop)
        for pid, _ in workers:
            os.waitpid(pid, 0)
    print("%-8s %-20s %9s %9s" % ("source", "call", "p50 ms", "p95 ms"))
    for source, call, (p50, p95) in figures:
        print("%-8s %-20s %9.2f %9.2f" % (source, call, p50, p95))
    return 0


if __name__ == "__main__":
    sys.exit(main())
