#!/usr/bin/env python3
"""The chat's test suite: standard library only. Run it with ``python3 test_chat.py``.

Everything here talks to real things: the server runs as a subprocess on an ephemeral port, the
clients are real sockets (or the real client program, in a pipe or a pseudo-terminal), and the
built .pyz archives are run end to end. Waits are on conditions with deadlines, never on sleeps.
The expected lines are those of ../shared/PROTOCOL.md, written out here on purpose: the tests check
the server's spelling against the protocol's, not against itself.
"""

import datetime
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "chat_server.py")
CLIENT = os.path.join(HERE, "chat_client.py")
DEADLINE = 15.0          # seconds any single wait may take before the test fails
TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d): ")

WELCOME = "Wellcome! Please enter your nickname"
OK = "Server: ok!"
NOTHING = "Sorry! You send nothing."
ALONE = "Server: there are no other users!"
FULL = "Sorry! The chat is full."
JOIN_TIMEOUT = "Sorry! You took too long to choose a nickname."
SHUTTING_DOWN = "Server is shutting down."
READY = "Server is ready for work!"
STOPPED = "Server stopped."


def invalid_nick(nick):
    return ('Your nickname must contain only letters and numbers, at least one character. '
            '"%s" is an incorrect nickname.' % nick)


def too_long_nick(first32):
    return 'Your nickname must be at most 32 characters. "%s..." is too long.' % first32


def busy(nick):
    return '"%s" is already busy.' % nick


def too_long_line(limit):
    return "Sorry! Your message is too long (more than %d bytes)." % limit


def wait_until(condition, what, deadline=DEADLINE, interval=0.01):
    """Poll ``condition`` until it is true; fail with ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(interval)


_checked_stamps = set()


def split_ts(line):
    """'2026-11-24 14:05: text' -> ('2026-11-24 14:05', 'text'); fails on any other shape, and
    on a timestamp that is not the local time now (give or take two minutes)."""
    match = TS.match(line)
    if not match:
        raise AssertionError("no '{ts}: ' prefix in %r" % line)
    stamp = match.group(1)
    if stamp not in _checked_stamps:
        when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M")
        if abs((datetime.datetime.now() - when).total_seconds()) > 180:
            raise AssertionError("timestamp %s is not the local time now" % stamp)
        _checked_stamps.add(stamp)
    return stamp, line[match.end():]


class LineSocket:
    """A test client on a real socket: sends bytes, receives whole lines with a deadline."""

    def __init__(self, port, host="127.0.0.1", rcvbuf=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(DEADLINE)
        self.sock.connect((host, port))
        self.buf = b""
        self.eof = False
        self.nick = None

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def _fill(self, end):
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for a line; have %r" % self.buf[:200])
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError("timed out waiting for a line; have %r" % self.buf[:200])
        if not chunk:
            self.eof = True
        self.buf += chunk

    def raw_line(self, deadline=DEADLINE):
        """The next line as bytes without its \\n; AssertionError at EOF or after the deadline."""
        end = time.monotonic() + deadline
        while b"\n" not in self.buf:
            if self.eof:
                raise AssertionError("connection closed; partial %r" % self.buf)
            self._fill(end)
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def line(self, deadline=DEADLINE):
        """The next line, which must be valid UTF-8 (the server never sends anything else)."""
        return self.raw_line(deadline).decode("utf-8")

    def said(self, deadline=DEADLINE):
        """The next line's text after its '{ts}: ' prefix."""
        return split_ts(self.line(deadline))[1]

    def expect_eof(self, deadline=DEADLINE):
        end = time.monotonic() + deadline
        while not self.eof:
            self._fill(end)
        if self.buf:
            raise AssertionError("unread lines before EOF: %r" % self.buf)

    def join(self, nick):
        """Read the welcome, choose ``nick``, expect it accepted; remembers it as ``.nick``."""
        self.nick = nick
        first = self.line()
        if first != WELCOME:
            raise AssertionError("expected the welcome, got %r" % first)
        self.send(nick + "\n")
        got = self.said()
        if got != OK:
            raise AssertionError("joining as %r got %r" % (nick, got))
        return self

    def close(self):
        self.sock.close()


class ServerProcess:
    """chat_server.py (or a built .pyz) as a subprocess on a free port."""

    def __init__(self, *options, env=None, cwd=None, command=None, log_file=True):
        self.dir = tempfile.mkdtemp(prefix="chat-test-")
        self.cwd = cwd or self.dir
        self.log_path = os.path.join(self.dir, "chat.log")
        args = list(options)
        if log_file and "--log" not in args:
            args += ["--log", "file", "--log-file", self.log_path]
        if "--port" not in args:
            args += ["--port", "0"]
        self.command = (command or [sys.executable, SERVER]) + args
        full_env = dict(os.environ)
        full_env.pop("CHAT_PLATFORM", None)
        full_env.update(env or {})
        self.stderr_file = open(os.path.join(self.dir, "stderr"), "w+b")
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                     stderr=self.stderr_file, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd, env=full_env)
        self.out = b""
        self.stdout_lines = []
        self.port = None

    def start(self):
        """Wait for the two lines that say the server is up; returns self."""
        first = self.stdout_line()
        match = re.match(r"^Listening on (\[[^\]]+\]|[^:]+):(\d+)$", first)
        if not match:
            raise AssertionError("unexpected first line %r; stderr %r" % (first, self.stderr()))
        self.host = match.group(1).strip("[]")
        self.port = int(match.group(2))
        second = self.stdout_line()
        if second != READY:
            raise AssertionError("unexpected second line %r" % second)
        return self

    def stdout_line(self, deadline=DEADLINE):
        end = time.monotonic() + deadline
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.out:
            remaining = end - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError("no line on the server's stdout; stderr %r" % self.stderr())
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("server stdout closed (exit %s); stderr %r"
                                     % (self.proc.poll(), self.stderr()))
            self.out += chunk
        line, self.out = self.out.split(b"\n", 1)
        text = line.decode("utf-8")
        self.stdout_lines.append(text)
        return text

    def stderr(self):
        self.stderr_file.flush()
        with open(self.stderr_file.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def client(self, **kwargs):
        return LineSocket(self.port, **kwargs)

    def log_lines(self):
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8").splitlines()

    def stop(self, sig=signal.SIGTERM, deadline=DEADLINE):
        """Send ``sig`` and wait for exit; returns (exit status, rest of stdout as lines)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not exit within %s s after %s" % (deadline, sig))
        rest = self.out + self.proc.stdout.read()
        self.out = b""
        return self.proc.returncode, rest.decode("utf-8").splitlines()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_server(test, *options, **kwargs):
    server = ServerProcess(*options, **kwargs).start()
    test.addCleanup(server.close)
    return server


_nick_counter = [0]


def fresh_nick(base="user"):
    """A nickname no other test uses, so tests can share one server."""
    _nick_counter[0] += 1
    return "%s%d" % (base, _nick_counter[0])


# ---------------------------------------------------------------------------------------------
# The protocol, row by row, over real sockets.
# ---------------------------------------------------------------------------------------------

class ProtocolTests(unittest.TestCase):
    """Every row of PROTOCOL.md's table, as the exact lines a client receives."""

    env = {}

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess(env=cls.env).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def connect(self, **kwargs):
        client = self.server.client(**kwargs)
        self.addCleanup(client.close)
        return client

    def joined(self, nick=None):
        return self.connect().join(nick or fresh_nick())

    def room(self, size):
        """``size`` joined clients, each having seen the later ones connect."""
        clients = []
        for _ in range(size):
            nick = fresh_nick()
            newcomer = self.joined(nick)
            for other in clients:
                self.assertEqual(other.said(), "%s connected!" % nick)
            clients.append(newcomer)
        return clients

    def test_welcome_is_the_first_line_without_timestamp(self):
        self.assertEqual(self.connect().line(), WELCOME)

    def test_nickname_accepted_and_announced_to_the_others(self):
        alice, = self.room(1)
        bob = self.connect()
        self.assertEqual(bob.line(), WELCOME)
        nick = fresh_nick("bob")
        bob.send(nick + "\n")
        self.assertEqual(bob.said(), OK)
        self.assertEqual(alice.said(), "%s connected!" % nick)

    def test_incorrect_nickname_may_be_retried(self):
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        client.send("bad nick\n")
        self.assertEqual(client.said(), invalid_nick("bad nick"))
        client.send("with-dash\n")
        self.assertEqual(client.said(), invalid_nick("with-dash"))
        client.send(fresh_nick() + "\n")
        self.assertEqual(client.said(), OK)

    def test_empty_nickname_is_incorrect(self):
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        client.send("\n   \n")
        self.assertEqual(client.said(), invalid_nick(""))
        self.assertEqual(client.said(), invalid_nick(""))

    def test_nickname_is_stripped_and_unicode_letters_count(self):
        nick = fresh_nick("Jürgen")
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        client.send("  %s \t\r\n" % nick)
        self.assertEqual(client.said(), OK)
        other = self.joined()
        self.assertEqual(client.said(), "%s connected!" % other.nick)
        other.send("hi\n")
        self.assertEqual(client.said(), "%s sent hi" % other.nick)

    def test_nickname_error_shows_the_attempt_without_control_characters(self):
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        client.send(b"ev\x1b[2Jil\x07 one\n")
        self.assertEqual(client.said(), invalid_nick("ev[2Jil one"))

    def test_nickname_longer_than_32_characters(self):
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        long_nick = "a" * 20 + "b" * 20
        client.send(long_nick + "\n")
        self.assertEqual(client.said(), too_long_nick(long_nick[:32]))
        nick32 = fresh_nick("c" * 26)[:32]
        client.send(nick32 + "\n")
        self.assertEqual(client.said(), OK)

    def test_busy_nickname_compared_case_insensitively(self):
        nick = fresh_nick("Straße")
        self.joined(nick)
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        client.send(nick.upper() + "\n")  # "STRASSE...": casefold matches it to "straße..."
        self.assertEqual(client.said(), busy(nick.upper()))
        client.send(nick.lower() + "\n")
        self.assertEqual(client.said(), busy(nick.lower()))
        client.send(fresh_nick() + "\n")
        self.assertEqual(client.said(), OK)

    def test_empty_or_whitespace_message(self):
        alice, bob = self.room(2)
        alice.send("\n \t \r\n\x1b\x07\n")
        for _ in range(3):
            self.assertEqual(alice.said(), NOTHING)
        alice.send("after\n")
        self.assertEqual(alice.said(), OK)
        self.assertEqual(bob.said(), "%s sent after" % alice.nick)

    def test_message_alone(self):
        # a room of one: a private server, so other tests' members do not count
        server = start_server(self, env=self.env)
        alone = server.client().join("alone")
        self.addCleanup(alone.close)
        alone.send("anybody?\n")
        self.assertEqual(alone.said(), ALONE)

    def test_message_to_the_others_with_one_timestamp(self):
        alice, bob, carol = self.room(3)
        alice.send("hello, world\n")
        ts1, first = split_ts(alice.line())
        ts2, second = split_ts(alice.line())
        self.assertEqual((first, second), (OK, "YOU SEND USERS hello, world"))
        for other in (bob, carol):
            ts3, text = split_ts(other.line())
            self.assertEqual(text, "%s sent hello, world" % alice.nick)
            self.assertEqual(ts3, ts1)
        self.assertEqual(ts1, ts2)

    def test_leave_is_announced(self):
        alice, bob = self.room(2)
        nick = alice.nick
        alice.close()
        self.assertEqual(bob.said(), "%s disconnected!" % nick)

    def test_nickname_is_free_again_after_leaving(self):
        nick = fresh_nick()
        first = self.joined(nick)
        watcher = self.joined()
        first.close()
        self.assertEqual(watcher.said(), "%s disconnected!" % nick)
        self.joined(nick)

    def test_crlf_pipelined_and_fragmented_input(self):
        alice, bob = self.room(2)
        alice.send("one\r\ntwo\nthree\r\n")
        for word in ("one", "two", "three"):
            self.assertEqual(alice.said(), OK)
            self.assertEqual(alice.said(), "YOU SEND USERS " + word)
            self.assertEqual(bob.said(), "%s sent %s" % (alice.nick, word))
        for byte in "split\r\n".encode():
            alice.send(bytes([byte]))
        self.assertEqual(bob.said(), "%s sent split" % alice.nick)

    def test_utf8_split_across_packets(self):
        alice, bob = self.room(2)
        data = "привет 🙂\n".encode("utf-8")
        for i in range(len(data)):
            alice.send(data[i:i + 1])
        self.assertEqual(bob.said(), "%s sent привет 🙂" % alice.nick)

    def test_control_characters_removed_tab_kept(self):
        alice, bob = self.room(2)
        alice.send(b"a\x00b\x1b[31mc\x7fd\xc2\x9be\tf\rg\n")
        self.assertEqual(bob.said(), "%s sent ab[31mcde\tfg" % alice.nick)
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS ab[31mcde\tfg")

    def test_invalid_utf8_becomes_replacement_characters(self):
        alice, bob = self.room(2)
        alice.send(b"bad \xff\xfe end \xe2\x82\n")
        self.assertEqual(bob.said(), "%s sent bad \ufffd\ufffd end \ufffd" % alice.nick)

    def test_line_over_the_limit_after_joining(self):
        alice, bob = self.room(2)
        alice.send(b"x" * 4096 + b"\n")  # exactly the limit: accepted
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS " + "x" * 4096)
        alice.send(b"y" * 4097 + b"\r\n" + b"after\n")
        self.assertEqual(alice.said(), too_long_line(4096))
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS after")
        self.assertEqual(bob.said(), "%s sent %s" % (alice.nick, "x" * 4096))
        self.assertEqual(bob.said(), "%s sent after" % alice.nick)

    def test_huge_line_in_pieces_is_answered_once(self):
        alice, bob = self.room(2)
        for _ in range(40):
            alice.send(b"z" * 5000)
        alice.send(b"z\nnext\n")
        self.assertEqual(alice.said(), too_long_line(4096))
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS next")
        self.assertEqual(bob.said(), "%s sent next" % alice.nick)

    def test_line_over_the_limit_before_joining(self):
        client = self.connect()
        self.assertEqual(client.line(), WELCOME)
        client.send(b"n" * 5000 + b"\n")
        self.assertEqual(client.said(), too_long_line(4096))
        client.send(fresh_nick() + "\n")
        self.assertEqual(client.said(), OK)

    def test_ipv6_literal(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6 here")
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            self.skipTest("no ::1 on this host")
        server = start_server(self, "--host", "::1", env=self.env)
        self.assertRegex(server.stdout_lines[0], r"^Listening on \[::1\]:\d+$")
        client = LineSocket(server.port, host="::1")
        self.addCleanup(client.close)
        client.join("six")


class ProtocolTestsWindowsPaths(ProtocolTests):
    """The same rows with the Windows paths forced: select() instead of epoll."""
    env = {"CHAT_PLATFORM": "windows"}


# ---------------------------------------------------------------------------------------------
# Limits that need a server of their own.
# ---------------------------------------------------------------------------------------------

class LimitTests(unittest.TestCase):

    def test_full_server_answers_and_closes(self):
        server = start_server(self, "--max-clients", "2")
        first = server.client().join("one")
        second = server.client()
        self.assertEqual(second.line(), WELCOME)
        third = server.client()
        self.assertEqual(third.said(), FULL)
        third.expect_eof()
        second.send("two\n")
        self.assertEqual(second.said(), OK)
        self.assertEqual(first.said(), "two connected!")
        for c in (first, second, third):
            c.close()

    def test_join_timeout_closes_silent_newcomers_only(self):
        server = start_server(self, "--join-timeout", "0.5")
        member = server.client().join("member")
        slow = server.client()
        self.assertEqual(slow.line(), WELCOME)
        slow.send("bad nick\n")
        self.assertEqual(slow.said(), invalid_nick("bad nick"))
        self.assertEqual(slow.said(), JOIN_TIMEOUT)
        slow.expect_eof()
        # The member is still there and still served.
        other = server.client().join("other")
        self.assertEqual(member.said(), "other connected!")
        other.send("still here\n")
        self.assertEqual(member.said(), "other sent still here")
        for c in (member, slow, other):
            c.close()

    def test_configured_line_limit(self):
        server = start_server(self, "--max-line-bytes", "10")
        client = server.client().join("short")
        client.send("12345678901\n1234567890\n")
        self.assertEqual(client.said(), too_long_line(10))
        self.assertEqual(client.said(), ALONE)
        client.close()

    def test_reader_that_never_reads_is_disconnected(self):
        server = start_server(self, "--max-send-queue", "65536")
        stuck = server.client(rcvbuf=4096).join("stuck")
        talker = server.client().join("talker")
        self.assertEqual(stuck.said(), "talker connected!")
        # The kernel buffers hold a few MiB on loopback; send more than that, reading the echoes.
        message = "m" * 4000 + "\n"
        sent = 0
        line = None
        while line != "stuck disconnected!":
            talker.send(message * 16)
            sent += 16
            while True:
                line = talker.said()
                if line == "stuck disconnected!":
                    break
                if line.startswith("YOU SEND USERS"):
                    sent -= 1
                    if sent == 0:
                        break
            self.assertLess(sent + 16, 100000)
        stuck.close()
        talker.close()

    def test_sender_that_never_reads_is_slowed_not_disconnected(self):
        server = start_server(self)
        flooder = server.client(rcvbuf=4096).join("flooder")
        watcher = server.client().join("watcher")
        self.assertEqual(flooder.said(), "watcher connected!")
        # Send until TCP pushes back (the server stopped reading us), without reading echoes.
        line_size = len(b"flood 000000\n")
        stream = b"".join(b"flood %06d\n" % i for i in range(400000))
        flooder.sock.setblocking(False)
        offset = 0
        stalled_since = None
        while True:
            try:
                offset += flooder.sock.send(stream[offset:offset + 65536])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
            self.assertLess(offset, len(stream) - 65536, "TCP never pushed back")
        sent_lines = -(-offset // line_size)
        # Finish the last line from a thread: it can only go through once we read again.
        flooder.sock.setblocking(True)
        rest = threading.Thread(target=flooder.sock.sendall,
                                args=(stream[offset:sent_lines * line_size],))
        rest.start()
        self.addCleanup(rest.join)
        flooder.sock.settimeout(DEADLINE)
        # The watcher got every line so far, in order, and the flooder was not cut off:
        # reading again it receives all its echoes.
        for i in range(sent_lines):
            self.assertEqual(watcher.said(), "flooder sent flood %06d" % i)
            self.assertEqual(flooder.said(), OK)
            self.assertEqual(flooder.said(), "YOU SEND USERS flood %06d" % i)
        flooder.close()
        watcher.close()


# ---------------------------------------------------------------------------------------------
# The server as a program: stdout, exit codes, signals, logs.
# ---------------------------------------------------------------------------------------------

class ServerProgramTests(unittest.TestCase):

    def test_stdout_lines_and_real_port(self):
        server = start_server(self)
        self.assertRegex(server.stdout_lines[0], r"^Listening on 127\.0\.0\.1:\d+$")
        self.assertNotEqual(server.port, 0)
        self.assertEqual(server.stdout_lines[1], READY)
        server.client().join("probe").close()

    def check_shutdown(self, sig):
        server = start_server(self)
        alice = server.client().join("alice")
        newcomer = server.client()
        self.assertEqual(newcomer.line(), WELCOME)
        status, rest = server.stop(sig)
        self.assertEqual(alice.said(), SHUTTING_DOWN)
        alice.expect_eof()
        self.assertEqual(newcomer.said(), SHUTTING_DOWN)
        newcomer.expect_eof()
        self.assertEqual(status, 0)
        self.assertEqual(rest, [STOPPED])
        self.assertNotIn("Traceback", server.stderr())
        alice.close()
        newcomer.close()

    def test_sigterm_notifies_everyone_and_exits_0(self):
        self.check_shutdown(signal.SIGTERM)

    def test_sigint_notifies_everyone_and_exits_0(self):
        self.check_shutdown(signal.SIGINT)

    def test_port_in_use_is_one_line_and_exit_1(self):
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        proc = subprocess.run([sys.executable, SERVER, "--port", str(port), "--log", "off"],
                              capture_output=True, text=True, timeout=DEADLINE)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stdout, "")
        self.assertEqual(proc.stderr,
                         "chat_server: cannot listen on 127.0.0.1:%d: Address already in use\n"
                         % port)

    def test_bad_option_is_one_line_and_exit_2(self):
        proc = subprocess.run([sys.executable, SERVER, "--port", "70000"],
                              capture_output=True, text=True, timeout=DEADLINE)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
        self.assertIn("--port", proc.stderr)

    def test_version_and_help(self):
        proc = subprocess.run([sys.executable, SERVER, "--version"],
                              capture_output=True, text=True, timeout=DEADLINE)
        self.assertEqual((proc.returncode, proc.stdout), (0, "chat_server %s\n" % readme_version()))
        proc = subprocess.run([sys.executable, SERVER, "--help"],
                              capture_output=True, text=True, timeout=DEADLINE)
        self.assertEqual(proc.returncode, 0)
        for option in ("--host", "--port", "--log", "--log-file", "--syslog-address",
                       "--max-clients", "--max-line-bytes", "--max-send-queue", "--join-timeout"):
            self.assertIn(option, proc.stdout)

    def test_log_file_holds_joins_messages_and_leaves_as_delivered(self):
        server = start_server(self)
        alice = server.client().join("alice")
        bob = server.client().join("bob")
        joined = alice.line()
        alice.send("hello \x1b[1mthere\n")
        sent = bob.line()
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS hello [1mthere")
        bob.close()
        left = alice.line()
        self.assertEqual(split_ts(left)[1], "bob disconnected!")
        status, _ = server.stop()
        self.assertEqual(status, 0)
        self.assertEqual(server.log_lines()[:4],
                         [server.log_lines()[0], joined, sent, left])
        self.assertEqual(split_ts(server.log_lines()[0])[1], "alice connected!")
        self.assertEqual(split_ts(sent)[1], "alice sent hello [1mthere")
        alice.close()

    def test_log_auto_without_syslog_socket_uses_chat_log_and_says_so(self):
        if os.path.exists("/dev/log") or os.path.exists("/var/run/syslog"):
            self.skipTest("this machine has a syslog socket")
        server = start_server(self, "--log", "auto", log_file=False)
        server.client().join("auto").close()
        wait_until(lambda: server.stop()[0] == 0, "server exit")
        with open(os.path.join(server.cwd, "chat.log"), encoding="utf-8") as f:
            self.assertEqual(split_ts(f.readline().rstrip("\n"))[1], "auto connected!")
        self.assertEqual(server.stderr(), "chat_server: no syslog socket (/dev/log) on this"
                                          " machine; logging to chat.log\n")

    def test_log_auto_on_windows_is_chat_log_without_notice(self):
        server = start_server(self, "--log", "auto", log_file=False,
                              env={"CHAT_PLATFORM": "windows"})
        server.client().join("win").close()
        self.assertEqual(server.stop()[0], 0)
        with open(os.path.join(server.cwd, "chat.log"), encoding="utf-8") as f:
            self.assertEqual(split_ts(f.readline().rstrip("\n"))[1], "win connected!")
        self.assertEqual(server.stderr(), "")


class SyslogTests(unittest.TestCase):
    """--syslog-address pointed at a Unix datagram socket the test owns."""

    def setUp(self):
        if not hasattr(socket, "AF_UNIX"):
            self.skipTest("no Unix sockets")
        self.dir = tempfile.mkdtemp(prefix="chat-syslog-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "log")
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog.bind(self.path)
        self.addCleanup(self.syslog.close)

    def record(self):
        self.syslog.settimeout(DEADLINE)
        return self.syslog.recv(65536).decode("utf-8")

    def test_records_carry_ident_facility_and_the_delivered_line(self):
        server = start_server(self, "--log", "syslog", "--syslog-address", self.path,
                              log_file=False)
        pid = server.proc.pid
        alice = server.client().join("alice")
        bob = server.client().join("bob")
        joined = alice.line()
        bob.send("hi there\n")
        sent = alice.line()
        prefix = "<30>chat_server[%d]: " % pid  # facility daemon (3) * 8 + info (6)
        self.assertEqual(self.record(), prefix + split_ts(joined)[0] + ": alice connected!")
        self.assertEqual(self.record(), prefix + joined)
        self.assertEqual(self.record(), prefix + sent)
        alice.close()
        bob.close()

    def test_syslog_that_never_reads_does_not_stop_the_chat(self):
        server = start_server(self, "--log", "syslog", "--syslog-address", self.path,
                              log_file=False)
        alice = server.client().join("alice")
        bob = server.client().join("bob")
        self.assertEqual(alice.said(), "bob connected!")
        for i in range(2000):  # far more records than a datagram socket's queue holds
            bob.send("message %d\n" % i)
            self.assertEqual(alice.said(), "bob sent message %d" % i)
            self.assertEqual(bob.said(), OK)
            self.assertEqual(bob.said(), "YOU SEND USERS message %d" % i)
        # Now read everything queued; the next record says how many were dropped.
        self.syslog.setblocking(False)
        queued = 0
        try:
            while self.syslog.recv(65536):
                queued += 1
        except BlockingIOError:
            pass
        bob.send("after\n")
        self.assertEqual(alice.said(), "bob sent after")
        note = self.record()
        match = re.match(r"^<28>chat_server\[\d+\]: (\d+) log records were dropped while syslog"
                         r" was not accepting them$", note)
        self.assertIsNotNone(match, note)
        self.assertEqual(int(match.group(1)) + queued, 2 + 2000)
        self.assertTrue(self.record().endswith(": bob sent after"))
        alice.close()
        bob.close()


class ChatCoreTests(unittest.TestCase):
    """The sans-I/O room, without sockets: the rules in microseconds."""

    def setUp(self):
        sys.path.insert(0, HERE)
        self.addCleanup(sys.path.remove, HERE)
        import chat_server
        self.mod = chat_server
        self.logged = []
        clock = chat_server.Clock(now=lambda: 0)  # 1970-01-01 00:00 UTC, local time here
        self.ts = time.strftime("%Y-%m-%d %H:%M: ", time.localtime(0))
        self.chat = chat_server.Chat(self.logged.append, clock)

    def peer(self, nick=None):
        peer = self.mod.Peer()
        if nick:
            self.chat.receive(peer, nick.encode())
            peer.out.clear()
        return peer

    def lines(self, peer):
        text = b"".join(peer.out).decode()
        peer.out.clear()
        return text.splitlines()

    def test_broadcast_shares_one_bytes_object(self):
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        for p in (alice, bob, carol):
            p.out.clear()
        self.chat.receive(alice, b"hi")
        self.assertIs(bob.out[0], carol.out[0])
        self.assertEqual(self.lines(bob), [self.ts + "alice sent hi"])
        self.assertEqual(self.lines(alice), [self.ts + OK, self.ts + "YOU SEND USERS hi"])
        self.assertEqual(self.logged[-1], (self.ts + "alice sent hi\n").encode())

    def test_leave_of_a_peer_that_never_joined_is_silent(self):
        alice = self.peer("alice")
        stranger = self.peer()
        self.chat.leave(stranger)
        self.assertEqual(alice.out, [])


# ---------------------------------------------------------------------------------------------
# The client: piped, threaded (the Windows path), under a pseudo-terminal, against hostile bytes.
# ---------------------------------------------------------------------------------------------

def free_port():
    """A port nothing listens on (bound, then released)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


class PipedClient:
    """chat_client.py with its stdin, stdout and stderr on pipes."""

    def __init__(self, port, env=None, command=None):
        full_env = dict(os.environ)
        full_env.pop("CHAT_PLATFORM", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen((command or [sys.executable, CLIENT]) + ["--port", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env)

    def type(self, text):
        self.proc.stdin.write(text.encode("utf-8"))
        self.proc.stdin.flush()

    def line(self, deadline=DEADLINE):
        """The next line the client printed, waiting at most ``deadline`` seconds."""
        end = time.monotonic() + deadline
        fd = self.proc.stdout.fileno()
        buf = getattr(self, "_buf", b"")
        while b"\n" not in buf:
            ready, _, _ = select.select([fd], [], [], max(end - time.monotonic(), 0))
            chunk = os.read(fd, 4096) if ready else None
            if not chunk:
                raise AssertionError("no line from the client; have %r" % buf)
            buf += chunk
        line, self._buf = buf.split(b"\n", 1)
        return line.decode("utf-8")

    def finish(self, deadline=DEADLINE):
        """Close stdin and wait: (exit status, stdout lines, stderr)."""
        out, err = self.proc.communicate(timeout=deadline)
        out = getattr(self, "_buf", b"") + out  # what line() read ahead comes first
        return self.proc.returncode, out.decode("utf-8").splitlines(), err.decode("utf-8")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class ClientTests(unittest.TestCase):
    """chat_client.py against a real server; ``env`` forces the Windows path in the subclass."""

    env = {}

    def client(self, port, **kwargs):
        client = PipedClient(port, env=self.env, **kwargs)
        self.addCleanup(client.kill)
        return client

    def test_piped_conversation_end_to_end(self):
        server = start_server(self)
        alice = server.client().join("alice")
        bob = self.client(server.port)
        bob.type("bob\n")
        self.assertEqual(alice.said(), "bob connected!")
        alice.send("hi bob\n")
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS hi bob")
        bob.type("hello alice")  # no newline at the end: the client adds it
        status, lines, err = bob.finish()
        self.assertEqual(alice.said(), "bob sent hello alice")
        self.assertEqual(alice.said(), "bob disconnected!")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(lines[0], WELCOME)
        self.assertEqual([split_ts(line)[1] for line in lines[1:]],
                         [OK, "alice sent hi bob", OK, "YOU SEND USERS hello alice"])

    def test_connection_refused(self):
        port = free_port()
        status, lines, err = self.client(port).finish()
        self.assertEqual((status, lines), (1, []))
        self.assertEqual(err, "Cannot connect to 127.0.0.1:%d: Connection refused."
                              " Is the server running?\n" % port)

    def test_server_shutdown_is_shown(self):
        server = start_server(self)
        client = self.client(server.port)
        client.type("dave\n")
        watcher = server.client().join("watcher")
        wait_until(lambda: "dave" in server_members(server, watcher), "dave to join")
        self.assertEqual(server.stop()[0], 0)
        status, lines, err = client.finish()
        self.assertEqual(status, 0)
        self.assertEqual(split_ts(lines[-1])[1], SHUTTING_DOWN)
        self.assertEqual(err, "Connection closed by the server.\n")

    def test_hostile_bytes_are_printed_harmless(self):
        fake = socket.socket()
        fake.bind(("127.0.0.1", 0))
        fake.listen(1)
        self.addCleanup(fake.close)
        hostile = (b"\x1b[2J\x1b]0;owned\x07 bad \xff\xfe utf8 \xc2\x9b31m c1 \x7f del\r\n"
                   b"tab\tkept\n")

        def serve():
            conn, _ = fake.accept()
            conn.sendall(hostile)
            conn.close()
        thread = threading.Thread(target=serve)
        thread.start()
        self.addCleanup(thread.join)
        client = self.client(fake.getsockname()[1])
        out, _ = client.proc.communicate(timeout=DEADLINE)
        self.assertEqual(out.decode("utf-8").splitlines(),
                         ["^[[2J^[]0;owned^G bad \ufffd\ufffd utf8 \\x9b31m c1 ^? del^M",
                          "tab\tkept"])

    def test_version_and_bad_option(self):
        proc = subprocess.run([sys.executable, CLIENT, "--version"],
                              capture_output=True, text=True, timeout=DEADLINE)
        self.assertEqual((proc.returncode, proc.stdout), (0, "chat_client %s\n" % readme_version()))
        proc = subprocess.run([sys.executable, CLIENT, "--port", "x"],
                              capture_output=True, text=True, timeout=DEADLINE)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(len(proc.stderr.splitlines()), 1)


def server_members(server, watcher):
    """Nicknames a watcher has seen connect so far (reads what is there within a moment)."""
    seen = getattr(watcher, "seen", set())
    watcher.seen = seen
    try:
        while True:
            text = watcher.said(deadline=0.05)
            if text.endswith(" connected!"):
                seen.add(text[:-len(" connected!")])
    except AssertionError:
        pass
    return seen


class ClientTestsWindowsPaths(ClientTests):
    """The same conversations through the threaded-stdin path Windows uses."""
    env = {"CHAT_PLATFORM": "windows"}


class Screen:
    """Just enough of a terminal to replay what readline writes: the rows a person would see."""

    def __init__(self, width=200):
        self.pending = ""   # an escape sequence cut in two by the pty read
        self.rows = [""]
        self.row = self.col = 0
        self.width = width

    def _put(self, ch):
        line = self.rows[self.row].ljust(self.col)
        self.rows[self.row] = line[:self.col] + ch + line[self.col + 1:]
        self.col += 1

    def feed(self, text):
        text, self.pending = self.pending + text, ""
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                match = re.match(r"\x1b(\[[?]?([0-9;]*)([A-Za-z@])|\][^\x07]*\x07|[=>])", text[i:])
                if not match and re.match(r"^\x1b(\[[?]?[0-9;]*|\][^\x07]*)?$", text[i:]):
                    self.pending = text[i:]
                    return
                if not match:
                    raise AssertionError("unknown escape %r" % text[i:i + 10])
                if match.group(3):
                    self._csi(match.group(2), match.group(3), match.group(1).startswith("[?"))
                i += match.end()
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
                if self.row == len(self.rows):
                    self.rows.append("")
            elif ch == "\b":
                self.col = max(self.col - 1, 0)
            elif ch == "\x07":
                pass
            elif ch >= " ":
                self._put(ch)
            else:
                raise AssertionError("unexpected control character %r on screen" % ch)
            i += 1

    def _csi(self, params, final, private):
        if private:
            return  # modes (keypad, bracketed paste): nothing to draw
        n = int(params.split(";")[0] or 1)
        line = self.rows[self.row]
        if final == "C":
            self.col += n
        elif final == "D":
            self.col = max(self.col - n, 0)
        elif final == "A":
            self.row = max(self.row - n, 0)
        elif final == "B":
            self.row += n
            while len(self.rows) <= self.row:
                self.rows.append("")
        elif final == "K":
            mode = int(params or 0)
            if mode == 0:
                self.rows[self.row] = line[:self.col]
            elif mode == 2:
                self.rows[self.row] = ""
            else:
                self.rows[self.row] = " " * self.col + line[self.col:]
        elif final == "J":
            self.rows[self.row] = line[:self.col]
            del self.rows[self.row + 1:]
        elif final == "P":
            self.rows[self.row] = line[:self.col] + line[self.col + n:]
        elif final == "@":
            self.rows[self.row] = line[:self.col] + " " * n + line[self.col:]
        elif final in "mh l":
            pass
        else:
            raise AssertionError("unhandled CSI %r%r" % (params, final))

    def visible(self):
        return [row.rstrip() for row in self.rows]


def _controlling_terminal():
    """In the child: a session of its own whose controlling terminal is the pty (stdin), so
    that Ctrl-C typed there sends SIGINT as in a real terminal."""
    import fcntl
    import termios
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal")
class TerminalClientTests(unittest.TestCase):
    """chat_client.py under a pseudo-terminal, typed into as a person would."""

    def setUp(self):
        import pty
        self.server = start_server(self)
        self.master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm", INPUTRC="/dev/null")
        env.pop("CHAT_PLATFORM", None)
        self.proc = subprocess.Popen([sys.executable, CLIENT, "--port", str(self.server.port)],
                                     stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, preexec_fn=_controlling_terminal)
        os.close(slave)
        self.addCleanup(self._stop)
        self.output = b""
        self.screen = Screen()

    def _stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)

    def type(self, keys):
        os.write(self.master, keys.encode("utf-8") if isinstance(keys, str) else keys)

    def read_until(self, condition, what):
        """Read the terminal until condition(visible rows) holds."""
        end = time.monotonic() + DEADLINE
        while not condition(self.screen.visible()):
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for %s; screen %r"
                                     % (what, self.screen.visible()))
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the client exited and the terminal closed
                    chunk = b""
                if not chunk:
                    if condition(self.screen.visible()):
                        return
                    raise AssertionError("terminal closed waiting for %s; screen %r"
                                         % (what, self.screen.visible()))
                self.output += chunk
                self.screen.feed(chunk.decode("utf-8", "replace"))

    def rows_after_ts(self):
        return [TS.sub("", row) for row in self.screen.visible()]

    def join_as(self, nick):
        self.read_until(lambda rows: WELCOME in rows, "the welcome")
        self.type(nick + "\r")
        self.read_until(lambda rows: OK in self.rows_after_ts(), "Server: ok!")

    def test_incoming_line_keeps_the_half_typed_input(self):
        self.join_as("carol")
        alice = self.server.client().join("alice")
        self.read_until(lambda rows: "alice connected!" in self.rows_after_ts(), "alice joins")
        self.type("half typ")
        self.read_until(lambda rows: rows[-1] == "> half typ", "the typed text echoed")
        alice.send("incoming\n")
        # The message gets a row of its own, and below it, last, the prompt with the
        # half-typed text, redrawn intact.
        self.read_until(lambda rows: self.rows_after_ts()[-2:] == ["alice sent incoming",
                                                                  "> half typ"],
                        "alice's line above the redrawn input")
        self.assertEqual(self.rows_after_ts().count("alice sent incoming"), 1)
        # Finish the line with editing keys (two Lefts, then typing) and send it whole.
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS incoming")
        self.type("\x1b[D\x1b[Ded\r")
        self.assertEqual(alice.said(), "carol sent half tedyp")
        self.read_until(lambda rows: "YOU SEND USERS half tedyp" in self.rows_after_ts(),
                        "the echo")
        alice.close()

    def test_history_and_ctrl_d_leave_cleanly(self):
        import termios
        self.join_as("erin")
        before = termios.tcgetattr(self.master)
        alice = self.server.client().join("alice")
        self.type("first\r")
        self.assertEqual(alice.said(), "erin sent first")
        self.type("\x1b[A again\r")  # Up brings "first" back
        self.assertEqual(alice.said(), "erin sent first again")
        self.type("\x04")  # Ctrl-D on an empty line
        self.assertEqual(self.proc.wait(DEADLINE), 0)
        self.assertEqual(alice.said(), "erin disconnected!")
        after = termios.tcgetattr(self.master)
        self.assertEqual(after[3] & (termios.ICANON | termios.ECHO),
                         termios.ICANON | termios.ECHO)
        self.assertEqual(before[3] & (termios.ICANON | termios.ECHO), 0)  # readline's raw mode
        self.assertNotIn(b"Traceback", self.output)
        alice.close()

    def test_ctrl_c_leaves_quietly(self):
        self.join_as("frank")
        self.type("\x03")
        self.assertEqual(self.proc.wait(DEADLINE), 0)
        self.read_until(lambda rows: True, "nothing")
        self.assertNotIn(b"Traceback", self.output)


# ---------------------------------------------------------------------------------------------
# The shipped files: build.sh's zipapps, run alone from an empty directory.
# ---------------------------------------------------------------------------------------------

def find_python38():
    """A Python 3.8 interpreter, to run the archives on the oldest version supported, if any."""
    candidates = [shutil.which("python3.8"),
                  os.path.expanduser("~/.pyenv/versions/3.8.18/bin/python3.8")]
    candidates += sorted(
        os.path.join(root, "bin", "python3.8")
        for root in [os.path.join(os.path.expanduser("~/.pyenv/versions"), v)
                     for v in (os.listdir(os.path.expanduser("~/.pyenv/versions"))
                               if os.path.isdir(os.path.expanduser("~/.pyenv/versions")) else [])
                     if v.startswith("3.8.")])
    for path in candidates:
        if path and os.path.exists(path):
            probe = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == "(3, 8)":
                return path
    return None


def run_build(out_dir):
    """sh build.sh OUT_DIR; returns its stdout lines."""
    proc = subprocess.run(["sh", os.path.join(HERE, "build.sh"), out_dir],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError("build.sh failed: %s" % proc.stderr)
    return proc.stdout.splitlines()


class BuildTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="chat-build-")
        cls.first = os.path.join(cls.dir, "first")
        cls.first_output = run_build(cls.first)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def sha256(self, path):
        import hashlib
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def test_build_prints_size_and_sha256_of_each_archive(self):
        self.assertEqual(len(self.first_output), 2)
        for line, name in zip(self.first_output, ("chat_server", "chat_client")):
            path = os.path.join(self.first, name + ".pyz")
            self.assertEqual(line, "built %s  %d bytes  sha256 %s"
                             % (path, os.path.getsize(path), self.sha256(path)))

    def test_building_twice_gives_identical_bytes(self):
        second = os.path.join(self.dir, "second")
        run_build(second)
        for name in ("chat_server.pyz", "chat_client.pyz"):
            self.assertEqual(self.sha256(os.path.join(self.first, name)),
                             self.sha256(os.path.join(second, name)))

    def test_build_bat_runs_the_same_builder(self):
        # build.bat can't run here; its Python line can, and must build the same bytes.
        with open(os.path.join(HERE, "build.bat"), encoding="utf-8") as f:
            line = [l for l in f.read().splitlines() if l.startswith("%PY% -c ")][0]
        code = re.match(r'^%PY% -c "(.*)" "%OUT%"$', line).group(1)
        out = os.path.join(self.dir, "bat")
        proc = subprocess.run([sys.executable, "-c", code, out], cwd=HERE,
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        for name in ("chat_server.pyz", "chat_client.pyz"):
            self.assertEqual(self.sha256(os.path.join(self.first, name)),
                             self.sha256(os.path.join(out, name)))

    def test_archive_holds_the_module_and_an_entry_point_only(self):
        import zipfile
        for name in ("chat_server", "chat_client"):
            path = os.path.join(self.first, name + ".pyz")
            with open(path, "rb") as f:
                self.assertEqual(f.readline(), b"#!/usr/bin/env python3\n")
            self.assertTrue(os.access(path, os.X_OK))
            with zipfile.ZipFile(path) as archive:
                self.assertEqual(archive.namelist(), [name + ".py", "__main__.py"])
                self.assertTrue(all(i.compress_type == zipfile.ZIP_DEFLATED
                                    for i in archive.infolist()))

    def conversation(self, python):
        """The built files alone in an empty directory, with an isolated interpreter."""
        empty = tempfile.mkdtemp(prefix="chat-empty-")
        self.addCleanup(shutil.rmtree, empty, True)
        for name in ("chat_server.pyz", "chat_client.pyz"):
            shutil.copy(os.path.join(self.first, name), empty)
        env = {"PYTHONPATH": ""}
        version = subprocess.run([python, "-I", os.path.join(empty, "chat_server.pyz"),
                                  "--version"], capture_output=True, text=True, cwd=empty,
                                 timeout=DEADLINE)
        self.assertEqual(version.stdout, "chat_server %s\n" % readme_version())
        server = start_server(self, "--log", "file", "--log-file", "chat.log", log_file=False,
                              cwd=empty, env=env,
                              command=[python, "-I", os.path.join(empty, "chat_server.pyz")])
        alice = PipedClient(server.port, env=env,
                            command=[python, "-I", os.path.join(empty, "chat_client.pyz")])
        self.addCleanup(alice.kill)
        alice.type("alice\n")
        self.assertEqual(alice.line(), WELCOME)
        self.assertEqual(split_ts(alice.line())[1], OK)
        bob = server.client().join("bob")
        bob.send("hi alice\n")
        self.assertEqual(bob.said(), OK)
        self.assertEqual(bob.said(), "YOU SEND USERS hi alice")
        alice.type("hi bob\n")
        self.assertEqual(bob.said(), "alice sent hi bob")
        status, lines, err = alice.finish()
        self.assertEqual((status, err), (0, ""))
        self.assertEqual([split_ts(l)[1] for l in lines],
                         ["bob connected!", "bob sent hi alice", OK, "YOU SEND USERS hi bob"])
        self.assertEqual(bob.said(), "alice disconnected!")
        bob.close()
        self.assertEqual(server.stop(), (0, [STOPPED]))
        with open(os.path.join(empty, "chat.log"), encoding="utf-8") as f:
            self.assertIn("alice sent hi bob", f.read())

    def test_built_files_alone_carry_a_conversation(self):
        self.conversation(sys.executable)

    def test_built_files_run_on_python_3_8(self):
        python38 = find_python38()
        if not python38:
            self.skipTest("no Python 3.8 on this machine")
        self.conversation(python38)


def readme_version():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        match = re.search(r"version (\d+\.\d+\.\d+)", f.read())
    if not match:
        raise AssertionError("README.md names no version")
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Running: a closing line that says how many passed and failed; exit 1 on failure or no test.
# ---------------------------------------------------------------------------------------------

def main(argv):
    loader = unittest.TestLoader()
    names = [a for a in argv if not a.startswith("-")]
    module = sys.modules[__name__]
    suite = (loader.loadTestsFromNames(names, module) if names
             else loader.loadTestsFromModule(module))
    verbosity = 2 if "-v" in argv else 1
    result = unittest.TextTestRunner(verbosity=verbosity).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("tests: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
    if result.testsRun == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
