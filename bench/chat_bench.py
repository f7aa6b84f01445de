#!/usr/bin/env python3
"""Benchmark of the chat server's fan-out, standard library only.

    python3 bench/chat_bench.py                          # every scenario, 3 runs each
    python3 bench/chat_bench.py --vs "/tmp/limit_server {port}"
    python3 bench/chat_bench.py --only fanout-100-w1 --runs 5

The server runs as users run it: a subprocess with default options, on a free port, logging to a
file (``--log file``). Each scenario starts a fresh server. With ``--vs`` the same scenarios run
against another server too (the C reference: ``gcc -O2 -o /tmp/limit_server
../shared/bench/limit_server.c``), alternating run by run, and the table shows the ratios of the
medians. The server's CPU time and RSS come from /proc (Linux).

Scenarios:
  fanout-N-wW  N clients joined; each keeps W messages in flight (closed loop: a message is done
               when the sender's own "YOU SEND USERS" echo returns). Counts deliveries ("... sent
               ..." lines the others receive), messages/s and the send-to-echo round trip.
  idle-10000   10,000 joined clients: server RSS, and the time one message takes to reach all.
  join-2000    2,000 clients connect at once and send a nickname: time until all have
               "Server: ok!".
"""

import argparse
import json
import os
import platform
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(os.path.dirname(HERE), "chat_server.py")
sys.path.insert(0, os.path.dirname(HERE))
from test_chat import free_port, proc_cpu, proc_rss  # noqa: E402  (one copy of the helpers)

SENT = b" sent "
ECHO = b"YOU SEND USERS"
OK = b"Server: ok!"
MESSAGE = b"the quick brown fox jumps over the lazy dog\n"  # 44 bytes, a typical chat line


# ---------------------------------------------------------------------------------------------
# The server under test.
# ---------------------------------------------------------------------------------------------

class Server:
    """A server subprocess: ours (``command`` None) or another, given as "COMMAND {port}"."""

    def __init__(self, command=None):
        self.dir = tempfile.mkdtemp(prefix="chat-bench-")
        if command is None:
            argv = [sys.executable, SERVER, "--port", "0", "--log", "file",
                    "--log-file", os.path.join(self.dir, "chat.log")]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            first = self.proc.stdout.readline().decode()
            self.port = int(first.rsplit(":", 1)[1])
            self.proc.stdout.readline()  # Server is ready for work!
        else:
            self.port = free_port()
            argv = shlex.split(command.replace("{port}", str(self.port)))
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self._wait_listening()

    def _wait_listening(self, deadline=10.0):
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not listen on port %d" % self.port)

    def cpu_seconds(self):
        return proc_cpu(self.proc.pid)

    def rss_bytes(self):
        return proc_rss(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# The load generator: many non-blocking sockets in one selectors loop; lines are counted with
# bytes.count over whole chunks, so the Python work is per recv, not per line.
# ---------------------------------------------------------------------------------------------

class Client:
    __slots__ = ("sock", "tail", "inflight", "joined", "received_sent")

    def __init__(self, sock):
        self.sock = sock
        self.tail = b""
        self.inflight = deque()
        self.joined = False
        self.received_sent = 0

    def complete_lines(self, data):
        """The chunk's complete lines (one bytes object); keeps the incomplete tail."""
        buf = self.tail + data if self.tail else data
        cut = buf.rfind(b"\n") + 1
        self.tail = buf[cut:]
        return buf[:cut]


class LoadGen:
    def __init__(self, port):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients = []
        self.last_ok = None   # when the latest "Server: ok!" arrived

    def close(self):
        for c in self.clients:
            c.sock.close()
        self.selector.close()

    def _connect(self, count, first_index):
        """Connect ``count`` sockets and send each a nickname at once."""
        fresh = []
        for i in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(("127.0.0.1", self.port))
            sock.setblocking(False)
            client = Client(sock)
            self.selector.register(sock, selectors.EVENT_READ, client)
            self.clients.append(client)
            fresh.append(client)
        for i, client in enumerate(fresh):
            client.sock.send(b"u%d\n" % (first_index + i))
        return fresh

    def pump(self, timeout, on_lines):
        """One select; calls on_lines(client, lines) per readable client. Returns the count."""
        events = self.selector.select(timeout)
        for key, _ in events:
            client = key.data
            try:
                data = client.sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError("the server closed a client's connection")
            lines = client.complete_lines(data)
            if lines:
                on_lines(client, lines)
        return len(events)

    def join(self, count, batch=500, deadline=300.0):
        """Join ``count`` clients, a batch at a time, reading everything as it comes."""
        end = time.monotonic() + deadline
        waiting = [0]

        def on_lines(client, lines):
            if not client.joined and OK in lines:
                client.joined = True
                waiting[0] -= 1
                self.last_ok = time.perf_counter()

        while len(self.clients) < count:
            size = min(batch, count - len(self.clients))
            waiting[0] += size
            self._connect(size, len(self.clients))
            while waiting[0]:
                self.pump(0.5, on_lines)
                if time.monotonic() > end:
                    raise RuntimeError("joining took too long")
        self.drain()

    def drain(self, quiet=0.3):
        """Read until nothing has arrived for ``quiet`` seconds."""
        while self.pump(quiet, lambda c, l: None):
            pass


def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def scenario_fanout(server, clients, window, warmup=1.0, duration=4.0):
    load = LoadGen(server.port)
    try:
        load.join(clients)
        counts = {"deliveries": 0, "messages": 0}
        latencies = []
        measuring = [False]

        def on_lines(client, lines):
            now = time.perf_counter()
            if measuring[0]:
                counts["deliveries"] += lines.count(SENT)
            echoes = lines.count(ECHO)
            if echoes:
                for _ in range(echoes):
                    started = client.inflight.popleft()
                    if measuring[0]:
                        latencies.append(now - started)
                if measuring[0]:
                    counts["messages"] += echoes
                client.sock.send(MESSAGE * echoes)
                client.inflight.extend([now] * echoes)

        start = time.perf_counter()
        for client in load.clients:
            client.sock.send(MESSAGE * window)
            client.inflight.extend([start] * window)
        while time.perf_counter() < start + warmup:
            load.pump(0.1, on_lines)
        measuring[0] = True
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        while time.perf_counter() < t0 + duration:
            load.pump(0.1, on_lines)
        elapsed = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        deliveries = counts["deliveries"]
        return {
            "deliveries_per_s": deliveries / elapsed,
            "messages_per_s": counts["messages"] / elapsed,
            "rtt_p50_ms": percentile(latencies, 0.50) * 1000,
            "rtt_p99_ms": percentile(latencies, 0.99) * 1000,
            "cpu_us_per_delivery": cpu / deliveries * 1e6 if deliveries else float("nan"),
            "server_cpu_share": cpu / elapsed,
            "rss_mib": server.rss_bytes() / 2**20,
        }
    finally:
        load.close()


def scenario_idle(server, clients=10000):
    load = LoadGen(server.port)
    try:
        load.join(clients)
        rss = server.rss_bytes()
        sender = load.clients[0]
        others = len(load.clients) - 1
        got = [0]

        def on_lines(client, lines):
            if SENT in lines and not client.received_sent:
                client.received_sent = 1
                got[0] += 1

        start = time.perf_counter()
        sender.sock.send(b"hello, everybody\n")
        end = start + 30
        while got[0] < others and time.perf_counter() < end:
            load.pump(1.0, on_lines)
        reach = time.perf_counter() - start
        return {"rss_mib": rss / 2**20, "kib_per_client": rss / clients / 1024,
                "reach_all_ms": reach * 1000 if got[0] == others else float("inf")}
    finally:
        load.close()


def scenario_join_storm(server, clients=2000):
    load = LoadGen(server.port)
    try:
        start = time.perf_counter()
        load.join(clients, batch=clients)
        return {"all_joined_s": load.last_ok - start}
    finally:
        load.close()


SCENARIOS = {}
for _n in (10, 100, 1000):
    for _w in (1, 8):
        SCENARIOS["fanout-%d-w%d" % (_n, _w)] = (
            lambda server, n=_n, w=_w: scenario_fanout(server, n, w))
SCENARIOS["idle-10000"] = scenario_idle
SCENARIOS["join-2000"] = scenario_join_storm


# ---------------------------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------------------------

def run(names, runs, vs):
    results = {}
    for name in names:
        for attempt in range(runs):
            for label, command in [("chat_server", None)] + ([("vs", vs)] if vs else []):
                server = Server(command)
                try:
                    metrics = SCENARIOS[name](server)
                finally:
                    server.stop()
                results.setdefault(name, {}).setdefault(label, []).append(metrics)
                print("  %s run %d %s: %s" % (name, attempt + 1, label, json.dumps(
                    {k: round(v, 3) for k, v in metrics.items()})), file=sys.stderr, flush=True)
    return results


def medians(samples):
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def report(results, runs, vs, command_line):
    print("# chat_bench: %s" % command_line)
    print("# machine: %d cores, %s, Python %s; medians of %d runs"
          % (os.cpu_count(), platform.platform(), platform.python_version(), runs))
    if vs:
        print("# vs: %s (ratio = chat_server / vs, from the medians of the same run)" % vs)
    for name, by_server in results.items():
        ours = medians(by_server["chat_server"])
        theirs = medians(by_server["vs"]) if "vs" in by_server else None
        print("\n%s" % name)
        for key, value in ours.items():
            line = "  %-22s %12.3f" % (key, value)
            if theirs:
                ratio = value / theirs[key] if theirs[key] else float("nan")
                line += "   vs %12.3f   ratio %6.2f" % (theirs[key], ratio)
            print(line)
        record = {"scenario": name, "runs": runs, "chat_server": ours}
        if theirs:
            record["vs"] = theirs
            record["vs_command"] = vs
        print("JSON " + json.dumps(record, sort_keys=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", metavar='"COMMAND {port}"',
                        help="another server to run the same scenarios against")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    names = args.only or list(SCENARIOS)
    results = run(names, args.runs, args.vs)
    report(results, args.runs, args.vs, " ".join(["python3", "bench/chat_bench.py"]
                                                 + (argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()
