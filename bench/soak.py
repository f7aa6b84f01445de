#!/usr/bin/env python3
"""The hardening cases at full size: minutes, bigger numbers, figures printed.

    python3 bench/soak.py               # every case
    python3 bench/soak.py fuzz slow     # some of them

The cases are the functions test_chat.py runs small in CI (one definition each); here they run
with the sizes of the hardening issue, and each prints what it measured. A case that breaks a
guarantee raises and the run exits 1. Standard library only; Linux (/proc) for the figures.

Flood control is off (--rate-limit 0) in the cases that measure raw speed (RAW_SPEED_CASES, named
in the output's header): they send as fast as the server answers, thousands of lines a second per
connection, which the default limit of 10 a second would slow by design (fuzz's 25,000 lines per
client would take 40 minutes). The limit itself is tested in test_chat.py. The other cases run
with every default limit in force.
"""

import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import test_chat as t  # noqa: E402  (the cases live with the tests: its section 8, Hardening)
from chat_bench import default_server_args  # noqa: E402  (one place knows the option)

RAW_SPEED_CASES = ("fuzz", "slow", "flood", "exactly-once", "syslog", "sigterm")


def raw_speed():
    """The options of a raw-speed case: --rate-limit 0 where the server has flood control (one
    without it has none to turn off). Asked when a case runs, not at import."""
    return default_server_args(t.SERVER)


class Scope:
    """Stands in for a TestCase where a case wants addCleanup."""

    def __init__(self):
        self.cleanups = []

    def addCleanup(self, function, *args):
        self.cleanups.append((function, args))

    def close(self):
        while self.cleanups:
            function, args = self.cleanups.pop()
            function(*args)


def with_server(case, *options, raw_speed_case=False, **kwargs):
    def run(scope):
        extra = raw_speed() if raw_speed_case else []
        server = t.start_server(scope, *(list(options) + extra))
        return case(server, **kwargs)
    return run


def fuzz(scope):
    # The fuzz model knows no history (the quick test runs it so too): version 1's options.
    server = t.start_server(scope, *t.VERSION_1_OPTIONS)
    figures = {}
    for seed in (1, 2, 3):
        result = t.fuzz_case(server.port, clients=8, lines_per_client=25000, seed=seed)
        figures["seed %d" % seed] = result
    if server.proc.poll() is not None:
        raise AssertionError("the server died")
    return figures


def exactly_once(scope):
    server = t.start_server(scope, *raw_speed())
    return t.exactly_once_case(server.port, clients=50, messages=2000)


def descriptors(scope):
    return t.descriptor_case(scope, attempts=2000, limit=256)


def stalled_syslog(scope, messages=60000, rounds=3):
    """Case 7: delivery with a syslog socket that never reads, against one that does (alternated,
    medians of ``rounds``); then the dropped-records count logged once records flow again."""
    folder = tempfile.mkdtemp(prefix="chat-soak-syslog-")
    scope.addCleanup(t.shutil.rmtree, folder, True)
    rates = {}
    samples = {"syslog reading": [], "syslog never reading": []}
    for run, (name, reading) in enumerate(
            [("syslog reading", True), ("syslog never reading", False)] * rounds):
        path = os.path.join(folder, "%s-%d" % (name.replace(" ", "-"), run))
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        daemon.bind(path)
        daemon.setblocking(False)
        scope.addCleanup(daemon.close)
        server = t.start_server(scope, "--log", "syslog", "--syslog-address", path,
                                *raw_speed(), log_file=False)
        crowd = t.Crowd(server.port, ["s1", "s2", "s3", "s4"])
        scope.addCleanup(crowd.close)
        crowd.drain()
        loop = t.ClosedLoop(crowd)
        started = time.perf_counter()
        loop.start()
        while len(loop.latencies) < messages:
            crowd.pump(0.05)
            if reading:
                try:
                    while daemon.recv(65536):
                        pass
                except BlockingIOError:
                    pass
        samples[name].append(len(loop.latencies) / (time.perf_counter() - started))
        loop.sending = False
        crowd.drain()
        if not reading:
            # Let it read again: the next record says how many were dropped.
            drained = 0
            try:
                while daemon.recv(65536):
                    drained += 1
            except BlockingIOError:
                pass
            crowd.members[0].sock.send(b"after the stall\n")
            daemon.settimeout(10)
            note = daemon.recv(65536).decode()
            if "log records were dropped" not in note:
                raise AssertionError("no dropped-records note: %r" % note)
            rates["dropped note"] = note.split(": ", 1)[1]
    for name, values in samples.items():
        rates[name] = statistics.median(values)
        rates[name + " samples"] = [round(v) for v in values]
    rates["rate ratio (never reading / reading), medians of %d" % rounds] = round(
        rates["syslog never reading"] / rates["syslog reading"], 2)
    for key in ("syslog reading", "syslog never reading"):
        rates[key] = "%.0f messages/s" % rates[key]
    return rates


CASES = [
    ("fuzz", fuzz),
    ("slow", with_server(t.slow_reader_case, raw_speed_case=True, talkers=50, p99_limit=0.05)),
    ("flood", with_server(t.flood_case, raw_speed_case=True, stream_lines=2000000)),
    ("exactly-once", exactly_once),
    ("abrupt", with_server(t.abrupt_ends_case, each=300)),
    ("descriptors", descriptors),
    ("syslog", stalled_syslog),
    ("sigterm", with_server(t.sigterm_under_load_case, raw_speed_case=True, clients=100)),
    ("join-timeout", with_server(t.join_timeout_case, "--join-timeout", "2", silent=1000)),
]


def main(argv):
    chosen = [c for c in CASES if not argv or c[0] in argv]
    print("# soak: python3 bench/soak.py %s" % " ".join(argv))
    print("# machine: %d cores, %s, Python %s" % (os.cpu_count(), platform.platform(),
                                                 platform.python_version()))
    print("# raw speed, with %s: %s; every default limit in the others"
          % (" ".join(raw_speed()) or "no flood control in this server",
             ", ".join(RAW_SPEED_CASES)))
    failed = 0
    for name, case in chosen:
        scope = Scope()
        started = time.perf_counter()
        try:
            figures = case(scope)
            status = "ok"
        except AssertionError as exc:
            figures, status = {"error": str(exc)}, "FAILED"
            failed += 1
        finally:
            scope.close()
        print("%-13s %-6s %6.1f s  %s" % (name, status, time.perf_counter() - started,
                                         json.dumps(figures)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
