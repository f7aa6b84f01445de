#!/usr/bin/env python3
"""Version 3 benchmark: rooms, accounts and the data file; standard library, Python 3.8+.

    flock /tmp/bench.lock python3 bench/v3_bench.py            # every scenario (about 13 min)
    python3 bench/v3_bench.py --only search-10000 --runs 3
    python3 bench/v3_bench.py --setup                           # only build the cached files

Built on bench/chat_bench.py (imported: its Server, load generators, calmness guards and
helpers). Every run starts a fresh chat_server with its defaults (a data file, history 20, every
limit) except ``--rate-limit 0`` (``--server-args`` changes that), and each run is done again
while other processes disturb it beyond ``--max-steal`` / ``--max-others`` (chat_bench's
measure_calmly). The data files the scenarios start from are built once and kept in
/tmp/v3bench-cache (delete it to build them again; about 70 s, most of it the 10-million-row
file): the server makes an empty one, so its schema, application id and version are its own, and
the rows go in with the sqlite3 module.

Scenarios:
  rooms-1000x10, rooms-100x10, rooms-1x10, rooms-1x100
                       closed-loop fan-out (bench/chatload.c, -r: a room per group of clients;
                       the first group stays in #main, so 1,000 rooms is --max-rooms' default),
                       every member keeping one message in flight: deliveries/s, CPU per
                       delivery and per message, round trip.
  join-2000-registered 2,000 registered members who each missed 50 messages of #main reconnect at
  join-200-registered  once with their passwords: time until every one has its last catch-up line.
                       (Each login is a scrypt check, on the server's hashing threads.)
  join-2000-token      the same, each answering its password question with a login token
  join-200-token       (/token): no slow check.
  search-10000         /search in #main with 10,000 kept messages, 200 searches of each of three
                       words: one in 1% of the messages, one in all, one in none.
  startup-new, startup-1000x20, startup-1000x10000
                       from starting the process to "Server is ready for work!", and the RSS then:
                       a new data file, and 1,000 rooms of 20 and of 10,000 messages (10 million
                       rows, 1.1 GiB; used in place, not copied: start-up does not write to it).
  hashing-20           two members exchange a message every 10 ms while 20 connections try wrong
                       passwords of a registered nickname as fast as they are answered (each from
                       a fresh address of 127.1/16 once the lockout closes it): the latency
                       between the two, before and during, and then how long the nickname's
                       owner waits to log in (with its login token, then its password).
  idle-10000-v3        chat_bench's idle-10000 on version 3's defaults: 10,000 joined members,
                       the server's RSS and the time one message takes to reach all.
"""

import argparse
import json
import os
import selectors
import shlex
import shutil
import socket
import sqlite3
import statistics
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import chat_bench  # noqa: E402  (the benchmark this one builds on)
import chat_server  # noqa: E402  (its nickname and room keys, to write rows as the server would)

CACHE = "/tmp/v3bench-cache"
PASSWORD = b"benchpass1"
STAMP = b"2026-12-07 03:00: "      # the {ts} of the rows written straight into a data file
MISSED = 50                        # messages each registered member missed (catch-up lines)
JOIN_DEADLINE = 900.0              # 2,000 scrypt checks one after the other take minutes
SEARCHES = 200
SEARCH_WORDS = (("some", b"tag007"), ("all", b"quick"), ("none", b"zebra"))
chat_bench.START_DEADLINE = 600.0  # a start-up that reads the whole file can take long


# ---------------------------------------------------------------------------------------------
# A blocking connection, read line by line: setup steps, the searcher, the members of hashing-20.
# ---------------------------------------------------------------------------------------------

class LineClient:
    def __init__(self, port, hello=b"", source=None, timeout=60.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        if hello:
            self.sock.sendall(hello)

    def say(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed a connection (last: %r)" % self.buf[-200:])
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def until(self, marker):
        """The lines up to the first that holds ``marker``, that one included."""
        lines = [self.line()]
        while marker not in lines[-1]:
            lines.append(self.line())
        return lines

    def close(self):
        self.sock.close()


def joined_client(port, nick):
    client = LineClient(port, nick + b"\n")
    client.until(b"Server: ok!")
    return client


# ---------------------------------------------------------------------------------------------
# Data files: made empty by the server, filled here, cached.
# ---------------------------------------------------------------------------------------------

def cached_file(name, build, beside=()):
    """CACHE/name, built by ``build(path)`` the first time (under another name, renamed when
    complete: a build cut short is never taken for a built file), with the files the build
    writes beside it (path + each suffix of ``beside``)."""
    path = os.path.join(CACHE, name)
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    partial = path + ".partial"
    remove_data_file(partial)
    start = time.perf_counter()
    build(partial)
    for suffix in ("-lock", "-wal", "-shm"):   # (the server's lock file stays after a stop)
        remove_quietly(partial + suffix)
    for suffix in beside:
        os.rename(partial + suffix, path + suffix)
    os.rename(partial, path)
    print("# built %s (%.0f MiB) in %.0f s" % (path, os.path.getsize(path) / 2**20,
                                               time.perf_counter() - start),
          file=sys.stderr, flush=True)
    return path


def remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_data_file(path):
    for suffix in ("", "-lock", "-wal", "-shm"):
        remove_quietly(path + suffix)


def blank_data_file(path):
    """An empty data file as chat_server makes it (schema, application id, version)."""
    chat_bench.Server(server_args=["--data", path]).stop()


def room_name(index):
    return "#main" if index == 0 else "#r%d" % index


def kept_rows(room_key, count):
    """A room's ``count`` messages as the server keeps them, one a row (a chat at human pace
    commits one line a turn): (room, position, the line, its size and its text's, where its
    text starts). Message i holds "tag{i mod 100}", which 1% of them share, and the
    benchmark's sentence."""
    for position in range(1, count + 1):
        text = b"message %d tag%03d %s" % (position, position % 100, chat_bench.TEXT)
        line = STAMP + b"u%d sent " % (position % 10) + text + b"\n"
        yield (room_key, position, line, struct.pack("<II", len(line), len(text)),
               len(line) - len(text))


def build_rooms_file(path, rooms, per_room):
    """``rooms`` rooms (#main, #r1, ...) of ``per_room`` kept messages each."""
    blank_data_file(path)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        for index in range(rooms):
            name = room_name(index)
            key = chat_server.room_keys(name)[0]
            db.execute("INSERT INTO rooms (key, name, topic, key_hash) VALUES (?, ?, NULL, NULL)",
                       (key, name))
            db.executemany("INSERT INTO messages (room, last, lines, sizes, text_at)"
                           " VALUES (?, ?, ?, ?, ?)", kept_rows(key, per_room))
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")   # (as the server leaves it)
    finally:
        db.close()


def rooms_file(rooms, per_room):
    return cached_file("rooms-%dx%d-v4.db" % (rooms, per_room),   # (v4: text_at)
                       lambda path: build_rooms_file(path, rooms, per_room))


def member_nick(index):
    return b"r%d" % index


def register_through_server(path, missed):
    """On a new data file: r0 registers (one scrypt), makes a login token (kept beside the file,
    in token_path(path)) and leaves; then two unregistered members say ``missed`` messages in
    #main (one hears them, so they are kept), which r0 missed."""
    server = chat_bench.Server(server_args=chat_bench.default_server_args() + ["--data", path])
    try:
        token = register_nick(server.port, member_nick(0), token=True)
        with open(token_path(path), "wb") as f:
            f.write(token)
        talker, listener = joined_client(server.port, b"t0"), joined_client(server.port, b"t1")
        for i in range(missed):
            talker.say(b"missed %d\n" % i)
        talker.until(b"YOU SEND USERS missed %d" % (missed - 1))
        listener.until(b" sent missed %d" % (missed - 1))
        talker.close()
        listener.close()
    finally:
        server.stop()


def clone_account(path, model, nicks):
    """Accounts for ``nicks`` like ``model``'s: its password hash (salt included: the same
    password, one scrypt to make instead of thousands; a login checks it just the same), its
    login token's digest (the same token for all: a login checks it just the same) and where
    it left each room."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        key = chat_server.nickname_keys(model)[0]
        kept, tokens = db.execute("SELECT password_hash, tokens FROM accounts WHERE key = ?",
                                  (key,)).fetchone()
        seen = db.execute("SELECT room, position FROM seen WHERE account = ?", (key,)).fetchall()
        db.execute("BEGIN")
        for nick in nicks:
            keys = chat_server.nickname_keys(nick)
            db.execute("INSERT INTO accounts (key, nick, password_hash, tokens)"
                       " VALUES (?, ?, ?, ?)", (keys[0], nick, kept, tokens))
            db.executemany("INSERT INTO account_keys (key, account) VALUES (?, ?)",
                           [(k, keys[0]) for k in keys])
            db.executemany("INSERT INTO seen (account, room, position) VALUES (?, ?, ?)",
                           [(keys[0], room, position) for room, position in seen])
        db.execute("COMMIT")
    finally:
        db.close()


def check_catch_up(path, nicks, missed):
    """On a copy: the first of ``nicks`` logs in with its password, the second with its login
    token, and each is shown "Messages since you left (missed):"."""
    server = DataFileServer(path, server_args=chat_bench.default_server_args())
    try:
        for nick, answer in zip(nicks, (PASSWORD, read_token(path))):
            client = LineClient(server.port, nick + b"\n" + answer + b"\n")
            heading = client.until(b"Messages since you left")[-1]
            if b"(%d)" % missed not in heading:
                raise RuntimeError("the data file's catch-up is wrong: %r" % heading)
            client.close()
    finally:
        server.stop()


def token_path(data_file):
    return data_file + ".token"


def read_token(data_file):
    with open(token_path(data_file), "rb") as f:
        return f.read()


def build_accounts_file(path, members, missed):
    register_through_server(path, missed)
    clone_account(path, "r0", ["r%d" % i for i in range(1, members)])
    check_catch_up(path, (member_nick(members - 1), member_nick(members - 2)), missed)


def accounts_file(members, missed=MISSED):
    return cached_file("accounts-%d-missed-%d-v5.db" % (members, missed),
                       lambda path: build_accounts_file(path, members, missed),
                       beside=(".token",))


class DataFileServer(chat_bench.Server):
    """chat_server on ``data_file`` (None: a new one in its folder): a copy in the run's folder,
    or with ``copy`` False the file itself. Times the start: from starting the process to
    "Server is ready for work!", with the CPU the server and others used meanwhile."""

    def __init__(self, data_file, copy=True, **options):
        self.data_file, self.copy = data_file, copy
        chat_bench.Server.__init__(self, **options)

    def _start_chat_server(self, server_path, server_args):
        path = self.data_file
        if path is not None and self.copy:
            path = os.path.join(self.dir, "chat.db")
            shutil.copyfile(self.data_file, path)
        if path is not None:
            server_args = server_args + ["--data", path]
        ticks, mine = chat_bench.machine_ticks(), chat_bench.own_cpu_seconds()
        start = time.perf_counter()
        chat_bench.Server._start_chat_server(self, server_path, server_args)
        self.startup_s = time.perf_counter() - start
        self.startup_cpu_s = self.cpu_seconds()
        self.startup_shares = chat_bench.machine_shares(
            ticks, chat_bench.machine_ticks(),
            self.startup_cpu_s + chat_bench.own_cpu_seconds() - mine)


# ---------------------------------------------------------------------------------------------
# The scenarios: each takes a running server and returns its metrics.
# ---------------------------------------------------------------------------------------------

def room_wrapper(folder, chatload, group):
    """chatload with ``-r group`` first: chat_bench.scenario_fanout_c runs it as it runs
    chatload itself, with the same arguments and the same reading of its output."""
    path = os.path.join(folder, "chatload-r%d" % group)
    with open(path, "w") as f:
        f.write('#!/bin/sh\nexec %s -r %d "$@"\n' % (shlex.quote(chatload), group))
    os.chmod(path, 0o755)
    return path


def scenario_rooms(server, clients, generator, warmup, duration):
    metrics = chat_bench.scenario_fanout_c(server, clients, 1, warmup, duration, generator)
    metrics["cpu_us_per_message"] = (metrics["server_cpu_share"] / metrics["messages_per_s"]
                                     * 1e6 if metrics["messages_per_s"] else float("nan"))
    return metrics


class RegisteredDialect(chat_bench.ChatDialect):
    """A registered member comes back: its nickname, then its password (or login token) on the
    next line."""

    def __init__(self, answer):
        self.answer = answer

    def hello(self, index):
        return member_nick(index) + b"\n" + self.answer + b"\n"


def scenario_join_registered(server, members, missed=MISSED, answer=PASSWORD):
    load = chat_bench.LoadGen(server)
    load.dialect = RegisteredDialect(answer)
    try:
        cpu = server.cpu_seconds()
        start = time.perf_counter()
        load.join(members, batch=members, deadline=JOIN_DEADLINE,
                  marker=b" sent missed %d\n" % (missed - 1))
        elapsed = load.last_joined - start
        cpu = server.cpu_seconds() - cpu
        return {"all_joined_s": elapsed, "per_login_ms": elapsed / members * 1000,
                "server_cpu_s_per_login_ms": cpu / members * 1000,
                "server_cpu_share": cpu / (time.perf_counter() - start)}
    finally:
        load.close()


def search_answer(client):
    """The lines of one /search answer: its heading ("Found K ..." or "No messages ..."), then
    min(K, 20) lines. Returns K."""
    heading = client.line()
    while b": Found " not in heading and b": No messages with " not in heading:
        heading = client.line()   # (the history shown on joining, before the first answer)
    if b": No messages with " in heading:
        return 0
    found = int(heading.split(b": Found ", 1)[1].split(b" ", 1)[0])
    for _ in range(min(found, chat_server.SEARCH_SHOWN)):
        client.line()
    return found


def scenario_search(server, searches=SEARCHES):
    client = joined_client(server.port, b"searcher")
    metrics = {}
    try:
        for label, word in SEARCH_WORDS:
            times = []
            for _ in range(searches):
                start = time.perf_counter()
                client.say(b"/search " + word + b"\n")
                found = search_answer(client)
                times.append(time.perf_counter() - start)
            metrics["%s_found" % label] = found
            metrics["%s_p50_ms" % label] = chat_bench.percentile(times, 0.50) * 1000
            metrics["%s_p99_ms" % label] = chat_bench.percentile(times, 0.99) * 1000
            metrics["%s_max_ms" % label] = max(times) * 1000
        return metrics
    finally:
        client.close()


def scenario_startup(server):
    metrics = {"startup_s": server.startup_s, "startup_cpu_s": server.startup_cpu_s,
               "rss_mib": server.rss_bytes() / 2**20,
               "file_mib": (os.path.getsize(server.data_file) / 2**20
                            if server.data_file else 0.0)}
    metrics.update(server.startup_shares)   # (measure_once's own window starts after it)
    return metrics


class Attackers:
    """``count`` connections trying wrong passwords of ``nick`` as fast as they are answered:
    each sends the nickname and a wrong password, and again at each "Wrong password" answer.
    The fifth wrong one within a minute locks the address out and closes the connection; it
    then comes back from the next address of 127.1/16 (a crowd of addresses: one address alone
    gets 5 tries a minute, which keeps no worker busy)."""

    def __init__(self, port, selector, nick, count):
        self.port, self.selector, self.nick, self.count = port, selector, nick, count
        self.addresses = 0
        self.answers = 0      # wrong-password answers (each one a scrypt check)
        self.tails = {}       # socket -> its incomplete last line
        self.running = False

    def start(self):
        self.running = True
        for _ in range(self.count):
            self._connect()

    def stop(self):
        self.running = False
        for sock in list(self.tails):
            self._drop(sock)

    def _connect(self):
        self.addresses += 1
        high, low = divmod(self.addresses, 250)
        sock = socket.create_connection(("127.0.0.1", self.port),
                                        source_address=("127.1.%d.%d" % (high, low + 1), 0))
        sock.setblocking(False)
        self.tails[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ, self.readable)
        self._try(sock)

    def _try(self, sock):
        sock.send(self.nick + b"\nwrong%d\n" % self.answers)   # (a few bytes: never blocks)

    def _drop(self, sock):
        self.selector.unregister(sock)
        del self.tails[sock]
        sock.close()

    def readable(self, sock):
        try:
            data = sock.recv(65536)
        except ConnectionError:
            data = b""
        text = self.tails[sock] + data
        cut = text.rfind(b"\n") + 1
        self.tails[sock], lines = text[cut:], text[:cut]
        wrong = lines.count(b"Sorry! Wrong password for ")
        locked = lines.count(b"Sorry! Too many wrong passwords.")
        self.answers += wrong + locked
        if not data or locked:
            self._drop(sock)
            if self.running:
                self._connect()
            return
        for _ in range(wrong):
            self._try(sock)


class Exchange:
    """Two members in #main: every ``interval`` one of them (in turn) says "ping N"; the time
    until the other has it is a latency."""

    def __init__(self, port, selector, interval):
        self.selector, self.interval = selector, interval
        self.members = [joined_client(port, b"ta"), joined_client(port, b"tb")]
        self.sent = {}         # N -> when sent
        self.latencies = []
        self.count = 0
        for member in self.members:
            member.sock.setblocking(False)
            member.tail = member.buf
            selector.register(member.sock, selectors.EVENT_READ, self.readable)

    def readable(self, sock):
        member = next(m for m in self.members if m.sock is sock)
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the server closed a member's connection")
        now = time.perf_counter()
        text = member.tail + data
        cut = text.rfind(b"\n") + 1
        member.tail = text[cut:]
        for line in text[:cut].split(b"\n"):
            if b" sent ping " in line:
                self.latencies.append(now - self.sent.pop(int(line.rsplit(b" ", 1)[1])))

    def run(self, seconds):
        """Exchange for ``seconds``; returns the latencies of that time, and how many messages
        sent then had not arrived at its end."""
        self.latencies = []
        end = time.perf_counter() + seconds
        due = time.perf_counter()
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if now >= due:
                self.members[self.count % 2].sock.send(b"ping %d\n" % self.count)
                self.sent[self.count] = now
                self.count += 1
                due += self.interval
            for key, _ in self.selector.select(max(min(due, end) - time.perf_counter(), 0)):
                key.data(key.fileobj)
        return self.latencies, len(self.sent)

    def close(self):
        for member in self.members:
            self.selector.unregister(member.sock)
            member.close()


def register_nick(port, nick, token=False):
    """``nick`` joins, registers with PASSWORD (one scrypt) and leaves; with ``token``, it
    makes a login token first, and returns it."""
    client = joined_client(port, nick)
    client.say(b"/register " + PASSWORD + b"\n")
    client.until(b"is registered to you")
    if token:
        client.say(b"/token\n")
        line = client.until(b"Login token for ")[-1]
        token = line.rstrip(b"\n").rsplit(b" ", 1)[1]
    client.say(b"/quit\n")
    client.until(b"Goodbye!")
    client.close()
    return token


def owner_login(port, nick, answer=PASSWORD):
    """Seconds until the owner of ``nick``, coming back with its password (its check waits
    behind those already queued) or its login token (no check to wait for), has "Server: ok!"."""
    start = time.perf_counter()
    client = LineClient(port, nick + b"\n" + answer + b"\n")
    client.until(b"Server: ok!")
    client.close()
    return time.perf_counter() - start


def latency_metrics(prefix, latencies):
    return {prefix + "_p50_ms": chat_bench.percentile(latencies, 0.50) * 1000,
            prefix + "_p99_ms": chat_bench.percentile(latencies, 0.99) * 1000,
            prefix + "_max_ms": max(latencies) * 1000 if latencies else float("nan"),
            prefix + "_messages": len(latencies)}


def scenario_hashing(server, attackers=20, quiet=5.0, settle=1.0, busy=10.0, interval=0.01):
    token = register_nick(server.port, b"victim", token=True)
    selector = selectors.DefaultSelector()
    exchange = Exchange(server.port, selector, interval)
    crowd = Attackers(server.port, selector, b"victim", attackers)
    try:
        metrics = latency_metrics("quiet", exchange.run(quiet)[0])
        crowd.start()
        exchange.run(settle)
        answers, cpu = crowd.answers, server.cpu_seconds()
        latencies, lost = exchange.run(busy)
        metrics.update(latency_metrics("busy", latencies))
        metrics.update({"busy_not_arrived": lost,
                        "checks_per_s": (crowd.answers - answers) / busy,
                        "server_cpu_share": (server.cpu_seconds() - cpu) / busy,
                        "addresses_used": crowd.addresses,
                        "owner_token_login_s": owner_login(server.port, b"victim", token),
                        "owner_login_s": owner_login(server.port, b"victim")})
        return metrics
    finally:
        crowd.stop()
        exchange.close()
        selector.close()


# ---------------------------------------------------------------------------------------------
# The table of scenarios, the runner and the report.
# ---------------------------------------------------------------------------------------------

class Scenario:
    """A measurement (``measure(server)``) and the server it needs (``start()``), measured
    ``runs`` times by default; what chat_bench.measure_calmly takes as scenario and contender."""

    def __init__(self, name, measure, start, runs=3):
        self.name, self.measure, self.start, self.runs = name, measure, start, runs


def scenarios(args, folder):
    server_args = (shlex.split(args.server_args) if args.server_args is not None
                   else chat_bench.default_server_args())
    chatload = None

    def fresh():
        return chat_bench.Server(server_args=server_args)

    def on(data_file, copy=True):
        return lambda: DataFileServer(data_file(), copy=copy, server_args=server_args)

    def rooms(count, size):
        def measure(server):
            nonlocal chatload
            if chatload is None:
                chatload, why_not = chat_bench.build_chatload(folder)
                if chatload is None:
                    raise RuntimeError("rooms need bench/chatload.c: %s" % why_not)
            generator = room_wrapper(folder, chatload, size) if count > 1 else chatload
            return scenario_rooms(server, count * size, generator, args.warmup, args.duration)
        return Scenario("rooms-%dx%d" % (count, size), measure, fresh)

    table = [rooms(1000, 10), rooms(100, 10), rooms(1, 10), rooms(1, 100),
             Scenario("join-2000-registered", lambda s: scenario_join_registered(s, 2000),
                      on(lambda: accounts_file(2000)), runs=1),
             Scenario("join-200-registered", lambda s: scenario_join_registered(s, 200),
                      on(lambda: accounts_file(2000))),
             Scenario("join-2000-token", lambda s: scenario_join_registered(
                 s, 2000, answer=read_token(accounts_file(2000))), on(lambda: accounts_file(2000))),
             Scenario("join-200-token", lambda s: scenario_join_registered(
                 s, 200, answer=read_token(accounts_file(2000))), on(lambda: accounts_file(2000))),
             Scenario("search-10000", scenario_search, on(lambda: rooms_file(1, 10000))),
             Scenario("startup-new", scenario_startup, on(lambda: None)),
             Scenario("startup-1000x20", scenario_startup, on(lambda: rooms_file(1000, 20))),
             Scenario("startup-1000x10000", scenario_startup,
                      on(lambda: rooms_file(1000, 10000), copy=False)),
             Scenario("hashing-20", scenario_hashing, fresh),
             Scenario("idle-10000-v3", chat_bench.scenario_idle, fresh)]
    return {s.name: s for s in table}


SETUP_FILES = (lambda: accounts_file(2000), lambda: rooms_file(1, 10000),
               lambda: rooms_file(1000, 20), lambda: rooms_file(1000, 10000))


def run_scenario(scenario, runs, limits):
    """(the runs' metrics, their errors, how many were kept though disturbed)."""
    samples, errors, disturbed = [], [], 0
    for attempt in range(runs):
        what = "%s run %d" % (scenario.name, attempt + 1)
        try:
            metrics, still = chat_bench.measure_calmly(scenario, scenario, limits, what)
        except (RuntimeError, OSError) as exc:
            errors.append("%s: %s" % (type(exc).__name__, exc))
            print("  %s: FAILED %s" % (what, errors[-1]), file=sys.stderr, flush=True)
            continue
        disturbed += still
        samples.append(metrics)
        print("  %s: %s" % (what, json.dumps({k: round(v, 3) for k, v in metrics.items()})),
              file=sys.stderr, flush=True)
    return samples, errors, disturbed


def summary(samples):
    """{metric: (median, min, max)} over the runs."""
    keys = list(samples[0]) if samples else []
    return {key: (statistics.median(s[key] for s in samples), min(s[key] for s in samples),
                  max(s[key] for s in samples)) for key in keys}


def print_scenario(name, samples, errors, disturbed, runs):
    table = summary(samples)
    print("\n%-28s %14s %14s %14s   (%d of %d runs)" % (name, "median", "min", "max",
                                                       len(samples), runs))
    for key, (median, low, high) in table.items():
        print("  %-26s %14.3f %14.3f %14.3f" % (key, median, low, high))
    for error in errors:
        print("  FAILED: %s" % error)
    if disturbed:
        print("  DISTURBED: %d runs kept over the limits" % disturbed)
    record = {"scenario": name, "runs": len(samples)}
    for index, label in enumerate(("median", "min", "max")):
        record[label] = {key: values[index] for key, values in table.items()}
    if errors:
        record["failed"] = errors
    print("JSON " + json.dumps(record, sort_keys=True))
    return table


RATIOS = (("rooms-1000x10", "rooms-1x100"), ("rooms-100x10", "rooms-1x100"),
          ("rooms-1000x10", "rooms-1x10"), ("rooms-100x10", "rooms-1x10"),
          ("startup-1000x10000", "startup-1000x20"))


def print_ratios(tables):
    for first, second in RATIOS:
        if tables.get(first) and tables.get(second):
            line = "ratio %s / %s (medians):" % (first, second)
            for key in ("deliveries_per_s", "messages_per_s", "cpu_us_per_delivery",
                        "cpu_us_per_message", "startup_s", "rss_mib"):
                if key in tables[first] and key in tables[second]:
                    line += " %s %.3f" % (key, chat_bench.ratio(tables[first][key][0],
                                                                 tables[second][key][0]))
            print(line)


def raise_file_limit():
    """10,000 connections on each side: the soft limit of open files up to the hard one (the
    server and chatload inherit it)."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv, names):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=names,
                        help="run only this scenario (repeatable)")
    parser.add_argument("--runs", type=int,
                        help="runs per scenario (default 3; join-2000-registered 1)")
    parser.add_argument("--setup", action="store_true",
                        help="only build the cached data files (%s)" % CACHE)
    parser.add_argument("--server-args", metavar='"OPTIONS"',
                        help='chat_server options (default "--rate-limit 0")')
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="rooms: seconds of fan-out before measuring (default 2)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="rooms: seconds of fan-out measured (default 5)")
    parser.add_argument("--max-steal", type=float, metavar="SHARE")
    parser.add_argument("--max-others", type=float, metavar="SHARE")
    parser.add_argument("--calm-wait", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--retries", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folder = tempfile.mkdtemp(prefix="v3bench-")
    try:
        names = list(scenarios(parse_args([], []), folder))
        args = parse_args(argv, names)
        table = scenarios(args, folder)
        raise_file_limit()
        if args.setup:
            for build in SETUP_FILES:
                print(build())
            return 0
        limits = chat_bench.Limits(args.max_steal, args.max_others, args.retries,
                                   args.calm_wait)
        print("# v3_bench: python3 bench/v3_bench.py %s" % " ".join(map(shlex.quote, argv)))
        print("# machine: %d cores, Python %s; chat_server %s; server options %s"
              % (os.cpu_count(), sys.version.split()[0], chat_server.VERSION,
                 args.server_args if args.server_args is not None
                 else " ".join(chat_bench.default_server_args())))
        tables, failed = {}, False
        for name in args.only or names:
            scenario = table[name]
            runs = args.runs or scenario.runs
            samples, errors, disturbed = run_scenario(scenario, runs, limits)
            tables[name] = print_scenario(name, samples, errors, disturbed, runs)
            failed = failed or bool(errors)
        print()
        print_ratios(tables)
        return 1 if failed else 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
