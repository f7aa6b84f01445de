#!/usr/bin/env python3
"""Fan-out benchmark of the chat server against a C reference and IRC servers; standard library.

    python3 bench/chat_bench.py                          # every scenario, 3 runs each
    python3 bench/chat_bench.py --vs "/tmp/limit_server {port}" --peer ngircd \
        --peer inspircd --max-steal 0.05 --max-others 0.05  # with the C reference and C IRC servers
    python3 bench/chat_bench.py --only fanout-100-w1 --runs 5
    python3 bench/chat_bench.py --only fanout-10-w1 --runs 1 --duration 1 --warmup 0.3  # smoke

The server runs as users run it: a subprocess on a free port with its default options (history 20,
every limit in force), logging to a file (``--log file``), except ``--rate-limit 0``: the closed
loop below sends as fast as the server answers, which flood control would slow by design. Change
that with ``--server-args``; ``--server`` picks another chat_server.py. Each run starts a fresh
server. With ``--vs`` the scenarios also run against another server (the C reference: ``gcc -O2 -o
/tmp/limit_server bench/limit_server.c``), and with ``--peer`` against IRC servers: ngIRCd
(``ngircd``, as shipped, or ``ngircd-nopenalty`` without its per-client throttle) and InspIRCd
(``inspircd``, its limits lifted), Debian's packages, each started in the foreground with a
configuration this file writes into a temporary folder (see the comments at NGIRCD_CONFIG and
INSPIRCD_CONFIG); and miniircd 2.3, a select-based Python IRC server (``pip install --user
miniircd==2.3``, or a venv and ``--miniircd``), as shipped or with TCP_NODELAY
(``miniircd-nodelay``; see the comment at MINIIRCD_BACKLOG). All of them bench only. The servers
alternate run by run, the table shows the medians and the ratios chat_server / other from the same
run. A failed run is reported and left out, and the command then exits 1. The servers' CPU time
and RSS come from /proc (Linux); bench/RESULTS.md, "Method", says how to read them.

The load generator of the plain fan-out scenarios is bench/chatload.c (C, epoll), built with
``gcc -O2`` into a temporary folder by each command: the Python one runs near one core against the
C reference and so caps it. ``--generator python`` (and a machine without gcc, with a note) uses
the Python one; it always drives TLS, joins and idle clients. Every fan-out row reports the
generator's CPU (``loadgen_cpu_share``). On a shared machine every run also reports the CPU others
took during it: the hypervisor (``machine_steal_share``) and other processes
(``machine_others_share``: /proc/stat's busy time minus the server's and the generator's);
``--max-steal`` and ``--max-others`` do a run again above a share, and ``--max-others`` first waits
(``--calm-wait``) for a calm machine.

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

The IRC peers run only in the fan-out scenarios (the others measure chat_server's own protocol:
history, nicknames); miniircd could not do more anyway: it waits in select(), which cannot watch
descriptors past FD_SETSIZE (1024). TLS scenarios compare chat_server with itself (the C reference
has no TLS).
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
    welcome = None                 # the nickname line joins: nothing to wait for before it
    join_line = b""
    joined = b"Server: ok!"        # the newcomer's answer to an accepted nickname
    done = b"YOU SEND USERS"       # the sender's echo: its message has been fanned out
    delivery = b" sent "           # "{ts}: {nick} sent {message}", one per other member
    message = MESSAGE

    @staticmethod
    def hello(index):
        return b"u%d\n" % index


class IrcDialect:
    """IRC as miniircd 2.3, ngIRCd and InspIRCd speak it. IRC has no echo of one's own channel
    message, so a message is PRIVMSG followed by PING: the server handles a connection's lines in
    order, so its PONG comes once the PRIVMSG has been queued to every member, as "YOU SEND USERS"
    does. JOIN goes out only after the welcome (001): InspIRCd ignores a JOIN sent before it."""
    name = "irc"
    welcome = b" 001 "             # RPL_WELCOME: registered, JOIN may follow
    join_line = b"JOIN #bench\r\n"
    joined = b" 366 "              # RPL_ENDOFNAMES: the JOIN is complete
    done = b" PONG "
    delivery = b" PRIVMSG #bench :"
    message = b"PRIVMSG #bench :" + TEXT + b"\r\nPING :bench\r\n"

    @staticmethod
    def hello(index):
        return b"NICK bench%d\r\nUSER bench%d 0 * :bench\r\n" % (index, index)


CHAT = ChatDialect()
IRC = IrcDialect()


# ---------------------------------------------------------------------------------------------
# The servers under test.
# ---------------------------------------------------------------------------------------------

class Server:
    """A server subprocess on a free port, stopped and cleaned up by stop().

    ``command`` None is chat_server.py (``server_path``) with ``server_args`` after the options
    every run has; otherwise ``command`` is "COMMAND {port}" (or that as an argv list) for
    another server speaking ``dialect``, where "{dir}" is the run's temporary folder and
    ``files`` ({name: text}) are written there first, with {port} and {dir} filled in (the IRC
    peers' configuration files). ``tls`` is the client-side SSLContext when the server speaks
    TLS. Joins connect ``join_batch`` clients at a time: past the server's listen backlog the
    kernel drops SYNs, which costs a connect a retransmission timeout (1 s, then 3 s, ...);
    ``join_deadline`` is how long all of them may take to join."""

    def __init__(self, command=None, server_args=(), dialect=CHAT, tls=None,
                 server_path=SERVER, join_batch=500, files=None, join_deadline=300.0):
        self.dialect = dialect
        self.tls = tls
        self.join_batch = join_batch  # connections in flight while joining: under its backlog
        self.join_deadline = join_deadline
        self.files = files or {}
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
        # In the run's own folder: its default data file (chat.db) is made there, new each run,
        # as a server started in an empty folder would make it.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, cwd=self.dir)
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

    def _fill_in(self, text):
        return text.replace("{port}", str(self.port)).replace("{dir}", self.dir)

    def _start_command(self, command):
        self.port = free_port()
        if isinstance(command, str):
            command = shlex.split(command)
        for name, text in self.files.items():
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(self._fill_in(text))
        argv = [self._fill_in(word) for word in command]
        # Its stdout too goes to the stderr file: ngIRCd in the foreground logs there, and a
        # server that fails to start says why in either.
        self.proc = subprocess.Popen(argv, stdout=self.stderr, stderr=self.stderr,
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
    __slots__ = ("sock", "hello", "tail", "out", "handshaking", "inflight", "welcomed", "joined",
                 "received_sent")

    def __init__(self, sock, hello):
        self.sock = sock
        self.hello = hello          # the lines that join, sent once connected (TLS: handshaken)
        self.tail = b""             # an incomplete last line
        self.out = b""              # what the socket did not take yet
        self.handshaking = False
        self.inflight = deque()     # send times of the messages awaiting their echo
        self.welcomed = False       # IRC: 001 seen and JOIN sent
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

        welcome, join_line = self.dialect.welcome, self.dialect.join_line

        def on_lines(client, lines):
            if welcome and not client.welcomed and welcome in lines:
                client.welcomed = True
                self.send(client, join_line)
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
        ticks0 = machine_ticks()
        cpu0, own0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        while time.perf_counter() < t0 + duration:
            load.pump(0.1, on_lines)
        elapsed = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        own = time.process_time() - own0
        ticks1 = machine_ticks()
        deliveries = counts["deliveries"]
        metrics = {
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
        metrics.update(machine_shares(ticks0, ticks1, cpu + own))
        return metrics
    finally:
        load.close()


def scenario_fanout_c(server, clients, window, warmup, duration, chatload):
    """scenario_fanout driven by bench/chatload.c (``chatload``: its binary): the same dialect
    bytes, markers and closed loop, at a fraction of the Python generator's CPU. chatload samples
    the server's CPU and /proc/stat itself at the two ends of its measured window."""
    argv = [chatload, "-d", server.dialect.name, "-b", str(server.join_batch),
            "-j", str(server.join_deadline), "-p", str(server.proc.pid), str(server.port),
            str(clients), str(window), str(duration), str(warmup)]
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL,
                              timeout=server.join_deadline + warmup + duration + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError("chatload did not finish: %s" % describe(argv)) from None
    if done.returncode != 0:
        raise RuntimeError("chatload exited %d: %s; server: %s" % (
            done.returncode, done.stderr.decode("utf-8", "replace").strip() or "(no message)",
            server.stderr_text()[-300:]))
    out = json.loads(done.stdout)
    elapsed, deliveries = out["elapsed_s"], out["deliveries"]
    cpu = out.get("server_cpu_s", float("nan"))  # absent: the server's /proc entry unreadable
    own = out["loadgen_cpu_s"]
    nan = float("nan")
    metrics = chatload_rates(out)
    metrics.update({
        "cpu_us_per_delivery": cpu / deliveries * 1e6 if deliveries else nan,
        "server_cpu_share": cpu / elapsed,
        "loadgen_cpu_share": own / elapsed,
        "rss_mib": out.get("server_rss_kib", nan) / 1024,
    })
    metrics.update(machine_shares(out["stat_before"], out["stat_after"], cpu + own,
                                  out["clk_tck"]))
    return metrics


def chatload_rates(out):
    """What every fan-out table shows of chatload's JSON line: deliveries and messages a second,
    and the round trip's p50 and p99 (NaN where chatload had none: it says -1)."""
    elapsed, nan = out["elapsed_s"], float("nan")
    return {
        "deliveries_per_s": out["deliveries"] / elapsed,
        "messages_per_s": out["messages"] / elapsed,
        "rtt_p50_ms": out["rtt_p50_ms"] if out["rtt_p50_ms"] >= 0 else nan,
        "rtt_p99_ms": out["rtt_p99_ms"] if out["rtt_p99_ms"] >= 0 else nan,
    }


CHATLOAD_SOURCE = os.path.join(HERE, "chatload.c")


def build_chatload(folder):
    """bench/chatload.c compiled with ``gcc -O2`` into ``folder`` (once per command: it takes a
    fraction of a second, and a binary built now can never be older than its source). Returns
    (path, None), or (None, why not) where there is no C compiler."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "no gcc (or cc) on the PATH"
    binary = os.path.join(folder, "chatload")
    built = subprocess.run([compiler, "-O2", "-o", binary, CHATLOAD_SOURCE],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if built.returncode != 0:
        raise SystemExit("bench/chatload.c did not compile with %s -O2:\n%s"
                         % (compiler, built.stdout.decode("utf-8", "replace")))
    return binary, None


def scenario_idle(server, clients=10000):
    empty = server.rss_bytes()
    load = LoadGen(server)
    try:
        load.join(clients)
        rss = server.rss_bytes()
        # At rest: once the join storm is over the server may give memory back (version 3 does
        # a second after the last connection came or went): the RSS 3 s on.
        load.drain(3.0)
        rss_idle = server.rss_bytes()
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
        return {"rss_mib": rss / 2**20, "rss_mib_at_rest": rss_idle / 2**20,
                "kib_per_client": rss / clients / 1024,
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


def scenarios(warmup=1.0, duration=4.0, chatload=None):
    """The scenarios by name; ``chatload``: the C generator's binary, which then drives the
    plain-text fan-out (it speaks no TLS: the TLS scenario keeps the Python generator)."""
    def python_fanout(n, w):
        return lambda server: scenario_fanout(server, n, w, warmup, duration)

    def fanout(n, w):
        if chatload is None:
            return python_fanout(n, w)
        return lambda server: scenario_fanout_c(server, n, w, warmup, duration, chatload)
    table = []
    for n in (10, 100, 1000):
        for w in (1, 8):
            table.append(Scenario("fanout-%d-w%d" % (n, w), fanout(n, w), "peers"))
    table += [
        Scenario("ratelimit-100-w1", fanout(100, 1), "rate-limit", needs=("--rate-limit",)),
        Scenario("tls-fanout-100-w1", python_fanout(100, 1), "tls", needs=("--tls-cert",)),
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
        # The IRC peers, each once, in the order given.
        self.peers = [PEERS[label](args) for label in dict.fromkeys(args.peer or [])]
        self.key_type = args.tls_key_type
        self._tls = None
        self.folder = tempfile.mkdtemp(prefix="chat-bench-setup-")
        self.chatload, self.generator_note = self.choose_generator(args.generator)

    def choose_generator(self, wanted):
        """(chatload's binary or None, what the report says about the generator)."""
        python = ("Python (chat_bench.py itself): near one core at 10 and 100 clients, which "
                  "caps what it measures")
        if wanted == "python":
            return None, python
        binary, why_not = build_chatload(self.folder)
        if binary is None:
            note = "%s. NOT the C generator: %s, so bench/chatload.c was not built" % (
                python, why_not)
            print("# note: %s" % note, file=sys.stderr, flush=True)
            return None, note
        return binary, ("C, bench/chatload.c built with gcc -O2, for the plain fan-out; the "
                        "Python one for TLS, joins and idle clients")

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
            chosen += [peer.contender() for peer in self.peers]
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


# ---------------------------------------------------------------------------------------------
# C IRC servers as peers: ngIRCd and InspIRCd, Debian's packages (apt-get install ngircd inspircd;
# bench only, never a dependency). Each runs in the foreground on a free port with a
# configuration file written into the run's temporary folder; nothing of /etc is read.
# ---------------------------------------------------------------------------------------------

class Peer:
    """An IRC server of the fan-out table: ``argv`` and ``files`` as Server takes them (with
    {port} and {dir}), how many clients may join at once and how long joining may take, and a
    line saying which version runs."""

    def __init__(self, label, argv, files=None, join_batch=500, join_deadline=300.0,
                 version="", config_note=""):
        self.label, self.argv, self.files = label, argv, files or {}
        self.join_batch, self.join_deadline = join_batch, join_deadline
        self.version, self.config_note = version, config_note

    def contender(self):
        return Contender(self.label, lambda: Server(
            self.argv, dialect=IRC, files=self.files, join_batch=self.join_batch,
            join_deadline=self.join_deadline), describe(self.argv))


def find_program(name):
    """``name`` on the PATH, or in /usr/sbin and /sbin, where Debian puts servers (and which a
    user's PATH often leaves out)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def program_version(argv):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, timeout=30).stdout.decode()
        return out.strip().splitlines()[0] if out.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "unknown (%s)" % exc


# ngIRCd (26.1 in Debian 12), read in its source (src/ngircd/conn.c, conn-func.c, parse.c) for
# what could make the comparison unfair:
# - every user connection is throttled: more than 256 bytes read from it in a second
#   (COMMAND_LEN / 2), or more than 3 commands waiting after a read (MAX_COMMANDS), or a
#   registration, adds a "penalty time" of a second during which it is neither read nor its
#   commands handled (its loop wakes once a second to check). A message of the benchmark is
#   PRIVMSG + PING, 76 bytes: a client gets 3 or 4 through, then waits a second. Measured: 50
#   messages/s in all at 10 clients, p99 1.1 s; a join of 1,000 clients takes about 70 s. Only
#   an IRC operator's user mode +F is exempt. The configuration knob MaxPenaltyTime (ngIRCd 26+;
#   "-1" unlimited, the default) caps each penalty, and 0 lifts it: "ngircd-nopenalty" below,
#   with the warning ngIRCd logs that this is not recommended;
# - it never sets TCP_NODELAY (only IPTOS_LOWDELAY) and has no option for it: in a closed loop of
#   short lines Nagle's algorithm holds a reply until the client's delayed ACK (up to 40 ms);
#   measured as shipped (p99 about 42 ms at 10 clients);
# - listen(10): joins connect NGIRCD_JOIN_BATCH clients at a time. Its accept queue holds 10,
#   but it accepts promptly and registration is what waits (the penalty), so 100 in flight join
#   1,000 clients faster (70 s) than 10 (over 100 s); a dropped SYN costs one connect a second;
# - a client's write buffer may hold 32 KiB beyond what the kernel took (WRITEBUFFER_MAX_LEN),
#   else the client is disconnected ("Write buffer space exhausted"): the kernel's loopback
#   buffers absorb a W=1 round; the generator reports a client cut off with its last line;
# - it reads 2 KiB per client per turn, more than a W=8 window (608 bytes);
# - as root it drops to "nobody" (ServerUID); it then cannot write a PID file in the run's
#   folder, so the configuration has none.
NGIRCD_JOIN_BATCH = 100
NGIRCD_CONFIG = """\
# Written by bench/chat_bench.py for one run: ngIRCd's defaults but for what 1,000 clients of a
# benchmark on 127.0.0.1 need. A benchmark peer, never the product's.
[Global]
\tName = bench.ngircd
\tInfo = chat_bench peer
\tAdminInfo1 = chat_bench
\tAdminInfo2 = localhost
\tAdminEMail = bench@localhost
\tListen = 127.0.0.1
\tPorts = {port}
\tPidFile =
\tMotdPhrase = chat_bench
[Limits]
\t# no limit on connections, in total or per IP address (defaults 0 and 5), nor on channels
\tMaxConnections = 0
\tMaxConnectionsIP = 0
\tMaxJoins = 0
\tMaxNickLength = 30
{penalty}[Options]
\t# includes from this run's folder (which has no *.conf), not /etc/ngircd/ngircd.conf.d
\tIncludeDir = {dir}
\t# no lookups at connection (Debian's build would require PAM authentication of every user)
\tDNS = no
\tIdent = no
\tPAM = no
"""
NGIRCD_NO_PENALTY = """\
\t# ngircd-nopenalty: no penalty time (the default, -1, throttles every client; see above)
\tMaxPenaltyTime = 0
"""


def ngircd_peer(no_penalty):
    program = find_program("ngircd")
    if program is None:
        raise SystemExit("ngircd not found: apt-get install ngircd (bench only)")
    label = "ngircd-nopenalty" if no_penalty else "ngircd"
    config = NGIRCD_CONFIG.replace("{penalty}", NGIRCD_NO_PENALTY if no_penalty else "")
    return Peer(label, [program, "--nodaemon", "--config", "{dir}/ngircd.cfg"],
                files={"ngircd.cfg": config}, join_batch=NGIRCD_JOIN_BATCH,
                version=program_version([program, "--version"]),
                config_note="NGIRCD_CONFIG%s in bench/chat_bench.py"
                            % (" with NGIRCD_NO_PENALTY" if no_penalty else ""))


# InspIRCd (3.15 in Debian 12; InspIRCd 3 configuration syntax, docs.inspircd.org/3/): its
# limits live in the <connect> class, and every one a closed loop of 1,000 clients from one
# address would trip is lifted in INSPIRCD_CONFIG (the comments there say which). Found by
# running it:
# - it ignores a JOIN that arrives before its welcome (001): both generators wait for it;
# - it registers a client on its once-a-second timer, so a join takes up to 1 s (not measured);
# - like ngIRCd it never sets TCP_NODELAY: Nagle's algorithm shows at 10 clients (p99 42 ms);
# - only its core modules load (no <module> tags): no cloaking, DNS blacklist or connect throttle;
# - as root it starts only with --runasroot.
INSPIRCD_CONFIG = """\
# Written by bench/chat_bench.py for one run: a benchmark peer, never the product's.
<server name="bench.inspircd" description="chat_bench peer" network="bench">
<admin name="chat_bench" nick="bench" email="bench@localhost">
<bind address="127.0.0.1" port="{port}" type="clients">
# The limits a closed loop of 1,000 clients from 127.0.0.1 would trip, lifted (the shipped
# example's values in brackets):
#   localmax, globalmax, limit: clients per address, and in this class [3, 3, 5000];
#   threshold, commandrate, fakelag: a command adds 1 to a client's penalty and the penalty drains
#     by commandrate/1000 a second [10, 1000: one line a second]; past the threshold its commands
#     wait (fakelag) or it is disconnected. Here a client may be a million commands ahead, the
#     penalty drains at four million a second, and fakelag is off (nothing is delayed);
#   softsendq: a client's commands are not read while its send queue holds more [10K];
#     hardsendq: more disconnects it [1M]. A W=8 round at 1,000 clients queues about 600 KiB;
#   recvq: unprocessed input [10K]; pingfreq: no keep-alive PING during a run [2m];
#   resolvehostnames, useident: no lookups at connection.
<connect name="bench" allow="127.0.0.1" maxchans="20" timeout="60" pingfreq="10m"
         localmax="100000" globalmax="100000" limit="100000" maxconnwarn="no"
         threshold="1000000" commandrate="4000000000" fakelag="off"
         softsendq="64M" hardsendq="64M" recvq="1M"
         resolvehostnames="no" useident="no">
<cidr ipv4clone="32" ipv6clone="128">
# somaxconn: its listen backlog, above the 500 clients the generator connects at once [128];
# no clone check at connection. The clients it holds are bounded by the file-descriptor limit,
# which it inherits from the benchmark (raised to the hard limit).
<performance somaxconn="1024" clonesonconnect="no" quietbursts="yes">
<pid file="{dir}/inspircd.pid">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="{dir}/inspircd.log">
"""


def inspircd_peer():
    program = find_program("inspircd")
    if program is None:
        raise SystemExit("inspircd not found: apt-get install inspircd (bench only)")
    argv = [program, "--nofork", "--config={dir}/inspircd.conf"]
    if os.getuid() == 0:
        argv.append("--runasroot")  # it refuses to run as root otherwise
    return Peer("inspircd", argv, files={"inspircd.conf": INSPIRCD_CONFIG},
                version=program_version([program, "--version"]),
                config_note="INSPIRCD_CONFIG in bench/chat_bench.py")


def miniircd_peer(label, given):
    python = miniircd_python(given)
    code = MINIIRCD_NODELAY if label == "miniircd-nodelay" else MINIIRCD_STOCK
    return Peer(label, miniircd_argv(python, code), join_batch=MINIIRCD_BACKLOG,
                version="miniircd %s" % miniircd_version(python))


PEERS = {
    "miniircd": lambda args: miniircd_peer("miniircd", args.miniircd),
    "miniircd-nodelay": lambda args: miniircd_peer("miniircd-nodelay", args.miniircd),
    "ngircd": lambda args: ngircd_peer(no_penalty=False),
    "ngircd-nopenalty": lambda args: ngircd_peer(no_penalty=True),
    "inspircd": lambda args: inspircd_peer(),
}


class Limits:
    """When a run counts as disturbed by the rest of the machine, and what is done about it:
    ``max_steal`` and ``max_others`` (shares of the machine's CPU: taken by the hypervisor, used
    by other processes), ``retries`` (runs done again at most), ``calm_wait`` (seconds to wait
    before a run for the machine to calm down, with ``max_others``)."""

    def __init__(self, max_steal=None, max_others=None, retries=3, calm_wait=60.0):
        self.max_steal, self.max_others = max_steal, max_others
        self.retries, self.calm_wait = retries, calm_wait

    def exceeded(self, metrics):
        """Why a run's figures cannot be trusted (empty: they can)."""
        reasons = []
        steal = metrics.get("machine_steal_share", 0.0)
        if self.max_steal is not None and steal > self.max_steal:
            reasons.append("%.1f%% of the CPU stolen by the hypervisor" % (steal * 100))
        others = metrics.get("machine_others_share", 0.0)
        if self.max_others is not None and others > self.max_others:
            reasons.append("other processes used %.1f%% of the machine" % (others * 100))
        return reasons

    @staticmethod
    def disturbance(metrics):
        return metrics.get("machine_steal_share", 0.0) + metrics.get("machine_others_share", 0.0)


def wait_for_calm(max_share, max_wait, what, sample=0.5):
    """Before a run: wait, at most ``max_wait`` seconds, until other processes use at most
    ``max_share`` of the machine over ``sample`` seconds (between runs nothing of ours runs: the
    last server has stopped, so the busy time is others'). Another helper's test suite comes and
    goes in bursts; a run started inside one would only be done again."""
    start = time.monotonic()
    while True:
        before = machine_ticks()
        time.sleep(sample)
        busy = machine_shares(before, machine_ticks(), 0.0).get("machine_others_share", 0.0)
        waited = time.monotonic() - start
        if busy <= max_share or waited >= max_wait:
            break
    if waited > sample * 1.5:
        print("  %s: waited %.0f s for a calm machine (others at %.0f%%%s)"
              % (what, waited, busy * 100, "" if busy <= max_share else ", measuring anyway"),
              file=sys.stderr, flush=True)


def measure_calmly(scenario, contender, limits, what):
    """One run, done again (up to ``limits.retries`` times) while the machine disturbs it.
    Returns (metrics, still disturbed): when every attempt was disturbed, the least disturbed
    one, flagged."""
    tried = []
    for attempt in range(limits.retries + 1):
        if limits.max_others is not None:
            wait_for_calm(limits.max_others, limits.calm_wait, what)
        metrics = measure_once(scenario, contender)
        reasons = limits.exceeded(metrics)
        if not reasons:
            return metrics, False
        tried.append(metrics)
        print("  %s: %s; done again" % (what, ", ".join(reasons)) if attempt < limits.retries
              else "  %s: %s" % (what, ", ".join(reasons)), file=sys.stderr, flush=True)
    kept = min(tried, key=Limits.disturbance)
    print("  %s: every attempt disturbed; kept the least disturbed of %d (others %.1f%%, steal "
          "%.1f%%)" % (what, len(tried), kept.get("machine_others_share", 0.0) * 100,
                       kept.get("machine_steal_share", 0.0) * 100), file=sys.stderr, flush=True)
    return kept, True


def run(names, runs, setup, limits):
    """Every scenario ``runs`` times per contender, a fresh server each run; the contenders
    alternate run by run, starting one further each round so none always goes first. A run that
    fails is reported and left out; the others go on (a full run takes many minutes). A run the
    machine disturbed beyond ``limits`` is done again (measure_calmly).
    Returns ({scenario: {label: [metrics]}}, {scenario: {label: [errors]}},
    {scenario: {label: runs kept though disturbed}})."""
    results, failures, disturbed = {}, {}, {}
    plan = [(name, setup.contenders(SCENARIOS[name])) for name in names]  # fail before running
    for name, contenders in plan:
        by_label = results.setdefault(name, {c.label: [] for c in contenders})
        for attempt in range(runs):
            turn = attempt % len(contenders)
            for contender in contenders[turn:] + contenders[:turn]:
                what = "%s run %d %s" % (name, attempt + 1, contender.label)
                try:
                    metrics, still = measure_calmly(SCENARIOS[name], contender, limits, what)
                except (RuntimeError, OSError, ssl.SSLError) as exc:
                    error = "%s: %s" % (type(exc).__name__, exc)
                    failures.setdefault(name, {}).setdefault(contender.label, []).append(error)
                    print("  %s: FAILED %s" % (what, error), file=sys.stderr, flush=True)
                    continue
                if still:
                    counts = disturbed.setdefault(name, {})
                    counts[contender.label] = counts.get(contender.label, 0) + 1
                by_label[contender.label].append(metrics)
                print("  %s: %s" % (what, json.dumps(
                    {k: round(v, 3) for k, v in metrics.items()})), file=sys.stderr, flush=True)
    return results, failures, disturbed


def machine_ticks():
    """The machine's CPU time so far, all CPUs together, in clock ticks: the fields of the "cpu"
    line of /proc/stat (user nice system idle iowait irq softirq steal ...); None where there is
    no such file (not Linux)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_shares(before, after, ours_seconds, ticks_per_s=CLOCK_TICKS):
    """What the rest of the machine did between two machine_ticks(): the share of all its CPU
    time the hypervisor stole (another tenant), and the share OTHER processes of this machine
    used: the busy time (user, nice, system, irq, softirq) minus ``ours_seconds``, the CPU time
    of the server and the load generator. On these shared 2-core machines the server and the
    generator need about a core each, so whatever others use is taken from one of them.
    (The kernel charges the softirq work of loopback TCP to the process that sends, so it is in
    ours; a small difference between the two clocks remains, hence the floor at 0.)"""
    if not before or not after:
        return {}
    delta = [b - a for a, b in zip(before, after)]
    delta += [0] * (8 - len(delta))
    total = sum(delta[:8])
    if total <= 0:
        return {}
    busy = delta[0] + delta[1] + delta[2] + delta[5] + delta[6]
    others = max(busy / ticks_per_s - ours_seconds, 0.0)
    return {"machine_steal_share": delta[7] / total,
            "machine_others_share": others * ticks_per_s / total}


def own_cpu_seconds():
    """This process's CPU time and that of its children waited for (chatload)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def measure_once(scenario, contender):
    """One run of a scenario on a fresh server. On a virtual machine another tenant can take the
    CPU away (steal time), and on a shared machine other processes can: the shares they took
    during the run are reported with the run's figures, so that a bad run can be told from a
    slow server. The fan-out scenarios measure them over their measured window; the others over
    the whole scenario."""
    server = contender.start()
    try:
        before, ours_before = machine_ticks(), server.cpu_seconds() + own_cpu_seconds()
        metrics = scenario.measure(server)
        after, ours_after = machine_ticks(), server.cpu_seconds() + own_cpu_seconds()
        if "machine_others_share" not in metrics:
            metrics.update(machine_shares(before, after, ours_after - ours_before))
        return metrics
    finally:
        server.stop()


def medians(samples):
    if not samples:
        return {}
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def ratio(ours, theirs):
    return ours / theirs if theirs else float("nan")


def report(results, failures, disturbed, runs, setup, limits, command_line):
    print("# chat_bench: %s" % command_line)
    print("# machine: %d cores, %s, Python %s; medians of %d runs"
          % (os.cpu_count(), platform.platform(), platform.python_version(), runs))
    print("# generator: %s" % setup.generator_note)
    print("# chat_server: %s" % setup.chat_server("").description)
    if setup.vs:
        print("# vs: %s" % setup.vs)
    for peer in setup.peers:
        print("# %s: %s (%s%s)" % (peer.label, describe(peer.argv), peer.version,
                                   "; configuration: " + peer.config_note
                                   if peer.config_note else ""))
    print("# machine_steal_share, machine_others_share: the machine's CPU taken by the "
          "hypervisor and used by other processes during a run%s"
          % "".join(", at most %s %s (runs done again up to %d times)"
                    % (option, value, limits.retries)
                    for option, value in (("--max-steal", limits.max_steal),
                                          ("--max-others", limits.max_others))
                    if value is not None))
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
        for label, count in disturbed.get(name, {}).items():
            print("  DISTURBED %s: %d of %d runs kept over the limits after %d retries"
                  % (label, count, runs, limits.retries))
        record = {"scenario": name, "runs": runs, "order": labels}
        record.update(table)
        record["ratios"] = {label: {key: ratio(first.get(key, nan), table[label].get(key, nan))
                                    for key in keys} for label in labels[1:]}
        if name in failures:
            record["failed"] = failures[name]
        if name in disturbed:
            record["disturbed"] = disturbed[name]
        if "vs" in table:
            record["vs_command"] = setup.vs
        print("JSON " + json.dumps(record, sort_keys=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", metavar='"COMMAND {port}"',
                        help="another server speaking the chat protocol (the C reference)")
    parser.add_argument("--peer", action="append", choices=list(PEERS),
                        help="a peer in the fan-out scenarios, over IRC (repeatable): miniircd "
                             "2.3 as shipped, or with TCP_NODELAY as the others have; ngIRCd as "
                             "shipped, or with MaxPenaltyTime 0 (no per-client throttle); "
                             "InspIRCd with its <connect> limits lifted")
    parser.add_argument("--generator", choices=["c", "python"], default="c",
                        help="the fan-out load generator: bench/chatload.c, built with gcc -O2 "
                             "(default; the Python one where there is no gcc), or the Python "
                             "one, which runs near one core and caps the C reference")
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
    parser.add_argument("--max-others", type=float, metavar="SHARE",
                        help="on a shared machine: wait (up to --calm-wait) before each run "
                             "until other processes use at most this share of the machine's CPU,"
                             " and do a run again when they used more during it (0.05 = 5%%); "
                             "their share is reported either way")
    parser.add_argument("--calm-wait", type=float, default=60.0, metavar="SECONDS",
                        help="with --max-others: how long to wait for a calm machine before a "
                             "run (default 60)")
    parser.add_argument("--retries", type=int, default=3,
                        help="runs done again at most when over --max-steal or --max-others "
                             "(default 3); then the least disturbed is kept and flagged")
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
    setup = Setup(args)
    SCENARIOS.update(scenarios(args.warmup, args.duration, setup.chatload))
    limits = Limits(args.max_steal, args.max_others, args.retries, args.calm_wait)
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
        results, failures, disturbed = run(names, args.runs, setup, limits)
        report(results, failures, disturbed, args.runs, setup, limits, " ".join(
            ["python3", "bench/chat_bench.py"]
            + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]))
    finally:
        setup.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
