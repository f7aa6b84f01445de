#!/usr/bin/env python3
"""Benchmark of the chat server's fan-out against the C reference and miniircd; standard library.

    python3 bench/chat_bench.py                          # every scenario, 3 runs each
    python3 bench/chat_bench.py --vs "/tmp/limit_server {port}" \
        --peer miniircd --peer miniircd-nodelay            # with the C reference and miniircd
    python3 bench/chat_bench.py --only fanout-100-w1 --runs 5
    python3 bench/chat_bench.py --only fanout-10-w1 --runs 1 --duration 1 --warmup 0.3  # smoke

The server runs as users run it: a subprocess on a free port with its default options (history 20,
every limit in force), logging to a file (``--log file``), except ``--rate-limit 0``: the closed
loop below sends as fast as the server answers, which flood control would slow by design. Change
that with ``--server-args``; ``--server`` picks another chat_server.py. Each run starts a fresh
server. With ``--vs`` the scenarios also run against another server (the C reference: ``gcc -O2 -o
/tmp/limit_server bench/limit_server.c``) and with ``--peer miniircd`` against miniircd
2.3, a select-based Python IRC server (``pip install --user miniircd==2.3``, or a venv and
``--miniircd``; bench only), as shipped, or with TCP_NODELAY (``--peer miniircd-nodelay``; see the
comment at MINIIRCD_BACKLOG). The servers alternate run by run, the table shows the medians and
the ratios chat_server / other from the same run. A failed run is reported and left out, and the
command then exits 1. The servers' CPU time and RSS come from /proc (Linux); bench/RESULTS.md,
"Method for version 2", says how to read them.

Scenarios:
  fanout-N-wW        N clients joined; each keeps W messages in flight (closed loop: a message is
                     done when the sender's own "YOU SEND USERS" echo returns; on IRC, PRIVMSG then
                     PING, done at the PONG). Counts deliveries (the lines the others receive),
                     messages/s, the send-to-echo round trip, the server's CPU and RSS.
  ratelimit-100-w1   fanout-100-w1 with --rate-limit 1000000 (configured, never hit) against
                     --rate-limit 0 (off), same run.
  tls-fanout-100-w1  fanout-100-w1 over TLS against the same server in plain text, same run.
  tls-idle-2000      2,000 joined TLS clients against 2,000 plain ones: RSS, KiB per connection
                     (whole and marginal: the growth from the empty server), reach-all time.
  idle-10000         10,000 joined clients: server RSS, and the time one message takes to reach all.
  join-2000          2,000 clients connect at once and send a nickname: time until all have
                     "Server: ok!".
  join-2000-history  the same after 20 messages (a full default history): time until all have
                     their history too (the last history line), where the server sends one.

miniircd runs only in the fan-out scenarios: it waits in select(), which cannot watch descriptors
past FD_SETSIZE (1024), so 2,000 or 10,000 clients would crash it. TLS scenarios compare
chat_server with itself (the C reference has no TLS).
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import select
import selectors
import shlex
import shutil
import socket
import ssl
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

READY = "Server is ready for work!"
TEXT = b"the quick brown fox jumps over the lazy dog"  # 43 bytes, a typical chat line
MESSAGE = TEXT + b"\n"
START_DEADLINE = 30.0  # seconds a server may take to start listening


# ---------------------------------------------------------------------------------------------
# What the load generator says and looks for, per protocol. Lines are counted with bytes.count
# over whole chunks, so each marker must occur once in the line it marks and in no other line the
# scenario receives.
# ---------------------------------------------------------------------------------------------

class ChatDialect:
    """chat_server's line protocol (the C reference speaks its join and fan-out part)."""
    name = "chat"
    joined = b"Server: ok!"        # the newcomer's answer to an accepted nickname
    done = b"YOU SEND USERS"       # the sender's echo: its message has been fanned out
    delivery = b" sent "           # "{ts}: {nick} sent {message}", one per other member
    message = MESSAGE

    @staticmethod
    def hello(index):
        return b"u%d\n" % index


class IrcDialect:
    """IRC as miniircd 2.3 speaks it. IRC has no echo of one's own channel message, so a message
    is PRIVMSG followed by PING: the server handles a connection's lines in order, so its PONG
    comes once the PRIVMSG has been queued to every member, as "YOU SEND USERS" does."""
    name = "irc"
    joined = b" 366 "              # RPL_ENDOFNAMES: the JOIN is complete
    done = b" PONG "
    delivery = b" PRIVMSG #bench :"
    message = b"PRIVMSG #bench :" + TEXT + b"\r\nPING :bench\r\n"

    @staticmethod
    def hello(index):
        return b"NICK bench%d\r\nUSER bench%d 0 * :bench\r\nJOIN #bench\r\n" % (index, index)


CHAT = ChatDialect()
IRC = IrcDialect()


# ---------------------------------------------------------------------------------------------
# The servers under test.
# ---------------------------------------------------------------------------------------------

class Server:
    """A server subprocess on a free port, stopped and cleaned up by stop().

    ``command`` None is chat_server.py (``server_path``) with ``server_args`` after the options
    every run has; otherwise ``command`` is "COMMAND {port}" (or that as an argv list) for
    another server speaking ``dialect``. ``tls`` is the client-side SSLContext when the server
    speaks TLS. Joins connect ``join_batch`` clients at a time: past the server's listen backlog
    the kernel drops SYNs, which costs a connect a retransmission timeout (1 s, then 3 s, ...)."""

    def __init__(self, command=None, server_args=(), dialect=CHAT, tls=None,
                 server_path=SERVER, join_batch=500):
        self.dialect = dialect
        self.tls = tls
        self.join_batch = join_batch  # connections in flight while joining: under its backlog
        self.dir = tempfile.mkdtemp(prefix="chat-bench-")
        self.stderr = open(os.path.join(self.dir, "stderr"), "w+b")
        self._out = b""  # chat_server's stdout read so far
        try:
            if command is None:
                self._start_chat_server(server_path, list(server_args))
            else:
                self._start_command(command)
        except BaseException:
            self.stop()
            raise

    def _start_chat_server(self, server_path, server_args):
        argv = [sys.executable, server_path, "--port", "0", "--log", "file",
                "--log-file", os.path.join(self.dir, "chat.log")] + server_args
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL)
        # "Listening on HOST:PORT", with TLS the certificate's fingerprint, then READY.
        first = self._stdout_line()
        self.port = int(first.rsplit(":", 1)[1])
        while self._stdout_line() != READY:
            pass

    def _stdout_line(self):
        """One line of the server's stdout, waiting at most START_DEADLINE (raw reads: a
        buffered readline could hold the next line where select() does not see it)."""
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + START_DEADLINE
        while b"\n" not in self._out:
            if not select.select([fd], [], [], max(end - time.monotonic(), 0))[0]:
                raise RuntimeError("the server said nothing; stderr: %s" % self.stderr_text())
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the server exited (%s); stderr: %s"
                                   % (self.proc.wait(), self.stderr_text()))
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        return line.decode()

    def _start_command(self, command):
        self.port = free_port()
        if isinstance(command, str):
            command = shlex.split(command)
        argv = [word.replace("{port}", str(self.port)) for word in command]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL)
        end = time.monotonic() + START_DEADLINE
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("%s did not listen on port %d (exit %s); stderr: %s"
                                       % (describe(argv), self.port, self.proc.poll(),
                                          self.stderr_text()))
                time.sleep(0.05)

    def stderr_text(self):
        self.stderr.flush()
        with open(self.stderr.name, "rb") as f:
            return f.read().decode("utf-8", "replace").strip()[-2000:] or "(empty)"

    def cpu_seconds(self):
        return proc_cpu(self.proc.pid)

    def rss_bytes(self):
        return proc_rss(self.proc.pid)

    def stop(self):
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)  # the log of a run can be tens of MiB


_help_texts = {}


def server_knows(option, server_path=SERVER):
    """Whether chat_server.py's --help lists ``option`` (options land on main over time)."""
    if server_path not in _help_texts:
        _help_texts[server_path] = subprocess.run(
            [sys.executable, server_path, "--help"], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, timeout=60).stdout.decode()
    # The option as a word of its own: "--rate-limit N", "--rate-limit," (aliases); not a prefix.
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option),
                     _help_texts[server_path]) is not None


def default_server_args(server_path=SERVER):
    """``--rate-limit 0`` where the server has flood control (a server without the option has
    none to turn off): the closed loop sends as fast as it is answered, by design."""
    return ["--rate-limit", "0"] if server_knows("--rate-limit", server_path) else []


def make_certificate(folder, key_type="ec"):
    """A self-signed certificate for localhost and 127.0.0.1; returns (cert, key) paths."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    new_key = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key_type == "ec"
               else ["-newkey", "rsa:2048"])
    subprocess.run(["openssl", "req", "-x509"] + new_key +
                   ["-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return cert, key


def client_tls_context(cert):
    """What a careful client does: verify the server's certificate and name."""
    return ssl.create_default_context(cafile=cert)


# ---------------------------------------------------------------------------------------------
# The load generator: many non-blocking sockets (plain or TLS) in one selectors loop.
# ---------------------------------------------------------------------------------------------

class Client:
    __slots__ = ("sock", "hello", "tail", "out", "handshaking", "inflight", "joined",
                 "received_sent")

    def __init__(self, sock, hello):
        self.sock = sock
        self.hello = hello          # the lines that join, sent once connected (TLS: handshaken)
        self.tail = b""             # an incomplete last line
        self.out = b""              # what the socket did not take yet
        self.handshaking = False
        self.inflight = deque()     # send times of the messages awaiting their echo
        self.joined = False
        self.received_sent = 0

    def complete_lines(self, data):
        """The chunk's complete lines (one bytes object); keeps the incomplete tail."""
        buf = self.tail + data if self.tail else data
        cut = buf.rfind(b"\n") + 1
        self.tail = buf[cut:]
        return buf[:cut]


# A non-blocking send or receive that cannot go on now; TLS may want either direction for both.
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class LoadGen:
    """Clients of one server; ``first_index`` numbers their nicknames (u0, u1, ... or bench0...)."""

    def __init__(self, server, first_index=0):
        self.port = server.port
        self.dialect = server.dialect
        self.tls = server.tls
        self.join_batch = server.join_batch
        self.first_index = first_index
        self.selector = selectors.DefaultSelector()
        self.clients = []
        self.last_joined = None   # when the latest client completed its join

    def close(self):
        for c in self.clients:
            c.sock.close()
        self.selector.close()

    def connect(self, count):
        """Connect ``count`` sockets; each says its hello at once (after its TLS handshake)."""
        fresh = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(("127.0.0.1", self.port))
            sock.setblocking(False)
            if self.tls:
                sock = self.tls.wrap_socket(sock, server_hostname="localhost",
                                            do_handshake_on_connect=False)
            client = Client(sock, self.dialect.hello(self.first_index + len(self.clients)))
            self.selector.register(sock, selectors.EVENT_READ, client)
            self.clients.append(client)
            fresh.append(client)
        for client in fresh:
            if self.tls:
                client.handshaking = True
                self._handshake(client)
            else:
                self.send(client, client.hello)
        return fresh

    def _handshake(self, client):
        """One step of a TLS handshake, driven by the selector like the rest of the traffic."""
        try:
            client.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(client.sock, selectors.EVENT_READ, client)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(client.sock, selectors.EVENT_WRITE, client)
            return
        client.handshaking = False
        self.selector.modify(client.sock, selectors.EVENT_READ, client)
        self.send(client, client.hello)

    def send(self, client, data):
        """Send now what the socket takes; keep the rest for when it is writable. (A TLS send
        that would block is retried with the same bytes first, as OpenSSL requires.)"""
        if client.out:
            client.out += data
            return
        try:
            sent = client.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        if sent < len(data):
            client.out = data[sent:]
            self.selector.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 client)

    def _flush(self, client):
        try:
            sent = client.sock.send(client.out)
        except WOULD_BLOCK:
            return
        client.out = client.out[sent:]
        if not client.out:
            self.selector.modify(client.sock, selectors.EVENT_READ, client)

    def pump(self, timeout, on_lines):
        """One select; calls on_lines(client, lines) per client that received complete lines.
        Returns the number of ready sockets. (The hot loop of every scenario: one attribute test
        per event for the rare cases, the read inline.)"""
        events = self.selector.select(timeout)
        tls = self.tls
        for key, mask in events:
            client = key.data
            if client.handshaking:
                self._handshake(client)
                continue
            if mask & selectors.EVENT_WRITE:
                self._flush(client)
                if not mask & selectors.EVENT_READ:
                    continue
            sock = client.sock
            try:
                data = sock.recv(262144)
                # TLS: take the records OpenSSL has already decrypted too; select() cannot see
                # them, they are no longer in the kernel.
                while tls and data and sock.pending():
                    data += sock.recv(sock.pending())
            except WOULD_BLOCK:
                continue
            if not data:
                raise RuntimeError("the server closed a client's connection")
            lines = client.complete_lines(data)
            if lines:
                on_lines(client, lines)
        return len(events)

    def join(self, count, batch=None, deadline=300.0, marker=None):
        """Join ``count`` more clients, ``batch`` (default: the server's) at a time, reading
        everything as it comes. A client has joined when ``marker`` (default: the dialect's)
        arrives."""
        batch = batch or self.join_batch
        marker = marker or self.dialect.joined
        end = time.monotonic() + deadline
        waiting = [0]

        def on_lines(client, lines):
            if not client.joined and marker in lines:
                client.joined = True
                waiting[0] -= 1
                self.last_joined = time.perf_counter()

        target = len(self.clients) + count
        while len(self.clients) < target:
            size = min(batch, target - len(self.clients))
            waiting[0] += size
            self.connect(size)
            while waiting[0]:
                self.pump(0.5, on_lines)
                if time.monotonic() > end:
                    raise RuntimeError("joining took too long (%d of %d not joined)"
                                       % (waiting[0], count))
        self.drain()

    def drain(self, quiet=0.3):
        """Read until nothing has arrived for ``quiet`` seconds."""
        while self.pump(quiet, lambda c, l: None):
            pass


# ---------------------------------------------------------------------------------------------
# The scenarios: each takes a running server and returns its metrics.
# ---------------------------------------------------------------------------------------------

def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def scenario_fanout(server, clients, window, warmup=1.0, duration=4.0):
    load = LoadGen(server)
    dialect = server.dialect
    done, delivery, message = dialect.done, dialect.delivery, dialect.message
    try:
        load.join(clients)
        counts = {"deliveries": 0, "messages": 0}
        latencies = []
        measuring = [False]

        def on_lines(client, lines):
            now = time.perf_counter()
            if measuring[0]:
                counts["deliveries"] += lines.count(delivery)
            echoes = lines.count(done)
            if echoes:
                for _ in range(echoes):
                    started = client.inflight.popleft()
                    if measuring[0]:
                        latencies.append(now - started)
                if measuring[0]:
                    counts["messages"] += echoes
                load.send(client, message * echoes)
                client.inflight.extend([now] * echoes)

        start = time.perf_counter()
        for client in load.clients:
            load.send(client, message * window)
            client.inflight.extend([start] * window)
        while time.perf_counter() < start + warmup:
            load.pump(0.1, on_lines)
        measuring[0] = True
        cpu0, own0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        while time.perf_counter() < t0 + duration:
            load.pump(0.1, on_lines)
        elapsed = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        own = time.process_time() - own0
        deliveries = counts["deliveries"]
        return {
            "deliveries_per_s": deliveries / elapsed,
            "messages_per_s": counts["messages"] / elapsed,
            "rtt_p50_ms": percentile(latencies, 0.50) * 1000,
            "rtt_p99_ms": percentile(latencies, 0.99) * 1000,
            "cpu_us_per_delivery": cpu / deliveries * 1e6 if deliveries else float("nan"),
            "server_cpu_share": cpu / elapsed,
            # Near 1.0 the load generator (one core) limits the rate, not the server: with TLS
            # it decrypts every delivery.
            "loadgen_cpu_share": own / elapsed,
            "rss_mib": server.rss_bytes() / 2**20,
        }
    finally:
        load.close()


def scenario_idle(server, clients=10000):
    empty = server.rss_bytes()
    load = LoadGen(server)
    try:
        load.join(clients)
        rss = server.rss_bytes()
        sender = load.clients[0]
        others = len(load.clients) - 1
        delivery = server.dialect.delivery
        got = [0]

        def on_lines(client, lines):
            if delivery in lines and not client.received_sent:
                client.received_sent = 1
                got[0] += 1

        start = time.perf_counter()
        load.send(sender, b"hello, everybody\n")
        end = start + 30
        while got[0] < others and time.perf_counter() < end:
            load.pump(1.0, on_lines)
        reach = time.perf_counter() - start
        return {"rss_mib": rss / 2**20, "kib_per_client": rss / clients / 1024,
                "kib_per_client_marginal": (rss - empty) / clients / 1024,
                "reach_all_ms": reach * 1000 if got[0] == others else float("inf")}
    finally:
        load.close()


def scenario_join_storm(server, clients=2000):
    load = LoadGen(server)
    try:
        start = time.perf_counter()
        load.join(clients, batch=clients)
        return {"all_joined_s": load.last_joined - start}
    finally:
        load.close()


HISTORY_MESSAGES = 20   # chat_server's default --history: the storm finds it full


def fill_history(server, messages=HISTORY_MESSAGES):
    """Send ``messages`` room messages (a listener is there, so they are delivered and kept),
    then one more that a newcomer sees live: the lines the newcomer got before it are its
    history. Returns (history lines a newcomer gets, the marker of the last history line)."""
    setup = LoadGen(server, first_index=1000000)  # nicknames the storm does not use
    try:
        setup.join(2)
        sender = setup.clients[0]
        echoes = [0]

        def count_echoes(client, lines):
            echoes[0] += lines.count(CHAT.done)

        def wait_echoes(count, deadline=30.0):
            end = time.monotonic() + deadline
            while echoes[0] < count:
                setup.pump(0.5, count_echoes)
                if time.monotonic() > end:
                    raise RuntimeError("the history messages were not answered")

        for i in range(messages):
            setup.send(sender, b"history %d\n" % i)
        wait_echoes(messages)
        # The newcomer is read from its first byte: its history comes with its "Server: ok!".
        newcomer = setup.connect(1)[0]
        seen = []
        live = b" sent history %d\n" % messages

        def collect(client, lines):
            count_echoes(client, lines)
            if client is newcomer:
                seen.append(lines)
        end = time.monotonic() + 30
        while CHAT.joined not in b"".join(seen):
            setup.pump(0.5, collect)
            if time.monotonic() > end:
                raise RuntimeError("the newcomer did not join")
        # Sent once the newcomer is a member: it arrives live, after any history.
        setup.send(sender, b"history %d\n" % messages)
        while live not in b"".join(seen):
            setup.pump(0.5, collect)
            if time.monotonic() > end:
                raise RuntimeError("the newcomer never saw the live message")
        history = b"".join(seen).count(b" sent history ") - 1
        return history, live
    finally:
        setup.close()


def scenario_join_storm_history(server, clients=2000):
    """The join storm into a room with a full history: a newcomer has joined when its last
    history line has arrived (or its "Server: ok!" where the server keeps no history)."""
    history, last_line = fill_history(server)
    load = LoadGen(server)
    try:
        start = time.perf_counter()
        load.join(clients, batch=clients, marker=last_line if history else None)
        return {"all_joined_s": load.last_joined - start, "history_lines": history}
    finally:
        load.close()


class Scenario:
    """A measurement and whom it compares: ``kind`` "peers" (chat_server, --vs, miniircd),
    "large" (chat_server, --vs: too many descriptors for miniircd), "rate-limit" or "tls"
    (chat_server against itself). ``needs``: chat_server options it cannot do without."""

    def __init__(self, name, measure, kind, needs=()):
        self.name, self.measure, self.kind, self.needs = name, measure, kind, needs


def scenarios(warmup=1.0, duration=4.0):
    def fanout(n, w):
        return lambda server: scenario_fanout(server, n, w, warmup, duration)
    table = []
    for n in (10, 100, 1000):
        for w in (1, 8):
            table.append(Scenario("fanout-%d-w%d" % (n, w), fanout(n, w), "peers"))
    table += [
        Scenario("ratelimit-100-w1", fanout(100, 1), "rate-limit", needs=("--rate-limit",)),
        Scenario("tls-fanout-100-w1", fanout(100, 1), "tls", needs=("--tls-cert",)),
        Scenario("tls-idle-2000", lambda server: scenario_idle(server, 2000), "tls",
                 needs=("--tls-cert",)),
        Scenario("idle-10000", scenario_idle, "large"),
        Scenario("join-2000", scenario_join_storm, "large"),
        Scenario("join-2000-history", scenario_join_storm_history, "large"),
    ]
    return {s.name: s for s in table}


SCENARIOS = scenarios()


# ---------------------------------------------------------------------------------------------
# Whom each scenario compares, and the runner.
# ---------------------------------------------------------------------------------------------

class Contender:
    """One server of a comparison: ``label`` in the table, ``start()`` a fresh running Server."""

    def __init__(self, label, start, description):
        self.label, self.start, self.description = label, start, description


class Setup:
    """The command line's choices, turned into contenders per scenario."""

    def __init__(self, args):
        self.server_path = os.path.abspath(args.server)
        self.server_args = (shlex.split(args.server_args) if args.server_args is not None
                            else default_server_args(self.server_path))
        self.vs = args.vs
        self.peers = []   # (label, argv) of the IRC peers
        for peer in dict.fromkeys(args.peer or []):  # each once, in the order given
            python = miniircd_python(args.miniircd)
            code = MINIIRCD_NODELAY if peer == "miniircd-nodelay" else MINIIRCD_STOCK
            self.peers.append((peer, miniircd_argv(python, code)))
        self.miniircd_python = python if self.peers else None
        self.key_type = args.tls_key_type
        self._tls = None
        self.folder = tempfile.mkdtemp(prefix="chat-bench-setup-")

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def tls_files(self):
        """(cert, key, client context), made once per command."""
        if self._tls is None:
            cert, key = make_certificate(self.folder, self.key_type)
            self._tls = (cert, key, client_tls_context(cert))
        return self._tls

    def chat_server(self, label, extra=(), tls=False):
        args = self.server_args + list(extra)
        context = None
        if tls:
            cert, key, context = self.tls_files()
            args += ["--tls-cert", cert, "--tls-key", key]
        shown = os.path.relpath(self.server_path)
        if shown.startswith(os.pardir):
            shown = self.server_path
        description = " ".join(["python3", shown] + args)
        return Contender(label, lambda: Server(server_args=args, tls=context,
                                               server_path=self.server_path), description)

    def missing_options(self, scenario):
        return [o for o in scenario.needs if not server_knows(o, self.server_path)]

    def contenders(self, scenario):
        missing = self.missing_options(scenario)
        if missing:
            raise SystemExit("%s needs chat_server %s, which %s does not have yet (git merge "
                             "main?)" % (scenario.name, " ".join(missing), self.server_path))
        if scenario.kind == "rate-limit":
            return [self.chat_server("rate-limit 1000000", ["--rate-limit", "1000000"]),
                    self.chat_server("rate-limit 0", ["--rate-limit", "0"])]
        if scenario.kind == "tls":
            return [self.chat_server("TLS", tls=True), self.chat_server("plain")]
        chosen = [self.chat_server("chat_server")]
        if self.vs:
            chosen.append(Contender("vs", lambda: Server(self.vs), self.vs))
        if scenario.kind == "peers":
            for label, argv in self.peers:
                chosen.append(Contender(label, lambda argv=argv: Server(
                    argv, dialect=IRC, join_batch=MINIIRCD_BACKLOG), describe(argv)))
        return chosen


def describe(argv):
    """An argv as one line, a -c program shortened to its name."""
    words = []
    for word in argv:
        if word == MINIIRCD_NODELAY:
            word = "MINIIRCD_NODELAY"
        elif word == MINIIRCD_STOCK:
            word = "MINIIRCD_STOCK"
        words.append(shlex.quote(word))
    return " ".join(words)


# miniircd 2.3, read for what could make the comparison unfair (miniircd.py, 1,282 lines):
# - no flood control and no write-queue limit: nothing slows the closed loop or cuts a client;
# - it reads at most 1 KiB per client per loop turn (recv(2**10)); a W=8 window is 8 x 74 = 592
#   bytes, so every window is read in one turn, as by the others;
# - it waits in select() on every socket each turn (O(clients) per turn: its design, measured as
#   is) and so cannot watch descriptors past FD_SETSIZE (1024): only the fan-out scenarios, at
#   most 1,000 clients;
# - a client's output queue is a bytes object grown with +=, copied whole at each line: with
#   1,000 clients and W=8 one loop turn queues 8,000 lines for each and takes many seconds
#   (quadratic); measured as is, it is miniircd as users run it;
# - it does not set TCP_NODELAY (chat_server and the C reference do). In a closed loop of small
#   lines, Nagle's algorithm then waits for the client's delayed ACK (40 ms) now and then: in
#   fanout-10-w1, 160 of 18,674 round trips took over 10 ms (up to 44 ms), the server idled half
#   the time and delivered 2.8x less than with TCP_NODELAY; at 100 clients Nagle's coalescing
#   made it 1.3x faster instead. Neither is its best case everywhere, so the table can hold both:
#   "miniircd" as shipped and "miniircd-nodelay" with TCP_NODELAY set on each accepted socket by
#   MINIIRCD_NODELAY (nothing else changed); a fair ratio takes the better of the two;
# - its channel log (--channel-log-dir) opens and closes the file for every message; it is off,
#   which favours miniircd (chat_server logs every message to a file); no --log-file, no --verbose;
# - listen(5): joins connect MINIIRCD_BACKLOG clients at a time (the kernel drops SYNs past the
#   backlog); joins are not measured with miniircd;
# - as root it refuses to start without --setuid, hence "--setuid root" for root.
MINIIRCD_BACKLOG = 5
MINIIRCD_STOCK = "import miniircd; miniircd.main()"
MINIIRCD_NODELAY = """import socket, miniircd
accepted = miniircd.Client.__init__
def with_nodelay(self, server, sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    accepted(self, server, sock)
miniircd.Client.__init__ = with_nodelay
miniircd.main()
"""


def miniircd_python(given):
    """The Python that imports miniircd: this one (pip install --user), else the one named by
    the first line of the ``miniircd`` script (a venv's); ``given`` is either kind of path."""
    if given is None:
        if importlib.util.find_spec("miniircd") is not None:
            return sys.executable
        given = shutil.which("miniircd")
        if given is None:
            raise SystemExit("miniircd not found: pip install --user miniircd==2.3 (bench only), "
                             "or give --miniircd PATH (its script or a Python that has it)")
    with open(given, "rb") as f:
        first = f.readline()
    if first.startswith(b"#!"):
        words = shlex.split(first[2:].decode())
        return words[1] if os.path.basename(words[0]) == "env" else words[0]
    return given


def miniircd_argv(python, code):
    """miniircd on 127.0.0.1 only, in the foreground (no --daemon), logging nowhere."""
    argv = [python, "-c", code, "--listen", "127.0.0.1", "--ports", "{port}"]
    if os.getuid() == 0 or os.getgid() == 0:
        argv += ["--setuid", "root"]
    return argv


def miniircd_version(python):
    try:
        return subprocess.run(
            [python, "-c", "import sys, miniircd; print(miniircd.VERSION, 'on Python', "
                           "sys.version.split()[0])"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30).stdout.decode().strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "unknown (%s)" % exc


def run(names, runs, setup, max_steal=None, retries=3):
    """Every scenario ``runs`` times per contender, a fresh server each run; the contenders
    alternate run by run, starting one further each round so none always goes first. A run that
    fails is reported and left out; the others go on (a full run takes many minutes). With
    ``max_steal``, a run during which the hypervisor stole more than that share of the machine's
    CPU is reported, left out and done again, up to ``retries`` times.
    Returns ({scenario: {label: [metrics]}}, {scenario: {label: [errors]}})."""
    results, failures = {}, {}
    plan = [(name, setup.contenders(SCENARIOS[name])) for name in names]  # fail before running
    for name, contenders in plan:
        by_label = results.setdefault(name, {c.label: [] for c in contenders})
        for attempt in range(runs):
            turn = attempt % len(contenders)
            for contender in contenders[turn:] + contenders[:turn]:
                try:
                    metrics = measure_once(SCENARIOS[name], contender)
                    for _ in range(retries):
                        stolen = metrics.get("machine_steal_share", 0.0)
                        if max_steal is None or stolen <= max_steal:
                            break
                        print("  %s run %d %s: %.1f%% of the CPU stolen, done again"
                              % (name, attempt + 1, contender.label, stolen * 100),
                              file=sys.stderr, flush=True)
                        metrics = measure_once(SCENARIOS[name], contender)
                except (RuntimeError, OSError, ssl.SSLError) as exc:
                    error = "%s: %s" % (type(exc).__name__, exc)
                    failures.setdefault(name, {}).setdefault(contender.label, []).append(error)
                    print("  %s run %d %s: FAILED %s" % (name, attempt + 1, contender.label,
                                                        error), file=sys.stderr, flush=True)
                    continue
                by_label[contender.label].append(metrics)
                print("  %s run %d %s: %s" % (name, attempt + 1, contender.label, json.dumps(
                    {k: round(v, 3) for k, v in metrics.items()})), file=sys.stderr, flush=True)
    return results, failures


def cpu_times():
    """The machine's CPU time so far, in clock ticks: (all of it, the part stolen by the
    hypervisor), from /proc/stat; None where there is no such file (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:8]), steal


def measure_once(scenario, contender):
    """One run of a scenario on a fresh server. On a virtual machine another tenant can take the
    CPU away (steal time): the share it took during the run is reported with the run's figures,
    so that a bad run can be told from a slow server."""
    server = contender.start()
    try:
        before = cpu_times()
        metrics = scenario.measure(server)
        after = cpu_times()
        if before and after and after[0] > before[0]:
            metrics["machine_steal_share"] = (after[1] - before[1]) / (after[0] - before[0])
        return metrics
    finally:
        server.stop()


def medians(samples):
    if not samples:
        return {}
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def ratio(ours, theirs):
    return ours / theirs if theirs else float("nan")


def report(results, failures, runs, setup, command_line):
    print("# chat_bench: %s" % command_line)
    print("# machine: %d cores, %s, Python %s; medians of %d runs"
          % (os.cpu_count(), platform.platform(), platform.python_version(), runs))
    print("# chat_server: %s" % setup.chat_server("").description)
    if setup.vs:
        print("# vs: %s" % setup.vs)
    if setup.peers:
        print("# miniircd %s" % miniircd_version(setup.miniircd_python))
        for label, argv in setup.peers:
            print("# %s: %s" % (label, describe(argv)))
    print("# ratio = first column / that column, from the medians of the same run")
    nan = float("nan")
    for name, by_label in results.items():
        labels = list(by_label)
        table = {label: medians(samples) for label, samples in by_label.items()}
        keys = list(next((t for t in table.values() if t), {}))
        first = table[labels[0]]
        print("\n%-24s %14s" % (name, labels[0])
              + "".join("   %14s  ratio" % label for label in labels[1:]))
        for key in keys:
            value = first.get(key, nan)
            line = "  %-22s %14.3f" % (key, value)
            for label in labels[1:]:
                theirs = table[label].get(key, nan)
                line += "   %14.3f %6.2f" % (theirs, ratio(value, theirs))
            print(line)
        for label, errors in failures.get(name, {}).items():
            print("  FAILED %s: %d of %d runs; first: %s" % (label, len(errors), runs, errors[0]))
        record = {"scenario": name, "runs": runs, "order": labels}
        record.update(table)
        record["ratios"] = {label: {key: ratio(first.get(key, nan), table[label].get(key, nan))
                                    for key in keys} for label in labels[1:]}
        if name in failures:
            record["failed"] = failures[name]
        if "vs" in table:
            record["vs_command"] = setup.vs
        print("JSON " + json.dumps(record, sort_keys=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", metavar='"COMMAND {port}"',
                        help="another server speaking the chat protocol (the C reference)")
    parser.add_argument("--peer", action="append", choices=["miniircd", "miniircd-nodelay"],
                        help="a peer in the fan-out scenarios, over IRC: miniircd 2.3 as "
                             "shipped, or with TCP_NODELAY as the others have (repeatable)")
    parser.add_argument("--miniircd", metavar="PATH",
                        help="miniircd's script or a Python that imports it (default: this "
                             "Python if it has miniircd, else miniircd on the PATH)")
    parser.add_argument("--server", default=SERVER, metavar="PATH",
                        help="the chat_server.py to measure (default: this checkout's)")
    parser.add_argument("--server-args", metavar='"OPTIONS"',
                        help='chat_server options after the port and log ones (default: '
                             '"--rate-limit 0" where the server has flood control)')
    parser.add_argument("--tls-key-type", choices=["ec", "rsa"], default="ec",
                        help="the TLS scenarios' self-signed key: EC P-256 or RSA 2048 "
                             "(default ec)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--max-steal", type=float, metavar="SHARE",
                        help="on a shared virtual machine: do a run again (up to 3 times) when"
                             " the hypervisor stole more than this share of the CPU during it"
                             " (0.01 = 1%%); the stolen share is reported either way")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="fan-out seconds before measuring (default 1)")
    parser.add_argument("--duration", type=float, default=4.0,
                        help="fan-out seconds measured (default 4)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    SCENARIOS.update(scenarios(args.warmup, args.duration))
    setup = Setup(args)
    names = args.only
    if not names:  # all of them, but say which this server cannot run yet
        names = []
        for name, scenario in SCENARIOS.items():
            missing = setup.missing_options(scenario)
            if missing:
                print("# skipped %s: chat_server has no %s yet" % (name, " ".join(missing)))
            else:
                names.append(name)
    try:
        results, failures = run(names, args.runs, setup, max_steal=args.max_steal)
        report(results, failures, args.runs, setup, " ".join(
            ["python3", "bench/chat_bench.py"]
            + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]))
    finally:
        setup.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
