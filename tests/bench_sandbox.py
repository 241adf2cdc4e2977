#!/usr/bin/env python3
"""Benchmark (not a test): what the sandbox of selfheal@.service costs per start, setting by
setting.

    sudo python3 tests/bench_sandbox.py [--suite trixie] [--runs 31]

Boots the drill container and times `systemd-run --wait /bin/true` with no sandbox, with every
setting of units/selfheal@.service (read from the file, so it measures what ships), and with
all but one, key by key. Prints the median of each; the difference to "all" is that key's cost.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import Container, skip_or_fail_reason  # noqa: E402

NOT_SANDBOX = {"Type", "ExecStart", "TimeoutStartSec"}


def sandbox_settings(unit: Path):
    """The unit's [Service] settings that make its sandbox: [(key, "Key=value"), ...]."""
    settings, section = [], ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0]
            if key not in NOT_SANDBOX:
                settings.append((key, line))
    return settings


def timed(box, props, runs):
    argv = ["systemd-run", "--wait", "--quiet", "-p", "Type=oneshot"]
    for prop in props:
        argv += ["-p", prop]
    times = []
    for _ in range(runs):
        started = time.monotonic()
        box.run(argv + ["/bin/true"])
        times.append(time.monotonic() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=None, help="bullseye (247), bookworm (252) or trixie (257)")
    parser.add_argument("--runs", type=int, default=31)
    args = parser.parse_args()
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    settings = sandbox_settings(TESTS.parent / "units" / "selfheal@.service")
    everything = [line for _, line in settings]
    with Container(suite=args.suite) as box:
        print(box.run(["systemctl", "--version"]).stdout.splitlines()[0])
        none, full = timed(box, [], args.runs), timed(box, everything, args.runs)
        print("%-28s %7.1f ms" % ("no sandbox", 1000 * none))
        print("%-28s %7.1f ms  (+%.1f ms)" % ("every setting", 1000 * full, 1000 * (full - none)))
        for key in dict.fromkeys(key for key, _ in settings):
            without = timed(box, [line for k, line in settings if k != key], args.runs)
            print("%-28s %7.1f ms  (%s costs %+.1f ms)" % ("all but " + key, 1000 * without, key,
                                                         1000 * (full - without)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
