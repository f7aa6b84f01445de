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
import selectors
import shutil
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import threading
import time
import unittest
from collections import deque

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

    def __init__(self, *options, env=None, cwd=None, command=None, log_file=True,
                 preexec_fn=None):
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
                                     cwd=self.cwd, env=full_env, preexec_fn=preexec_fn)
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

    def test_auto_falls_back_to_chat_log_when_the_syslog_socket_is_dead(self):
        self.syslog.close()  # the socket file stays, nobody listens: a stopped daemon
        server = start_server(self, "--log", "auto", "--syslog-address", self.path,
                              log_file=False)
        server.client().join("dead").close()
        self.assertEqual(server.stop()[0], 0)
        with open(os.path.join(server.cwd, "chat.log"), encoding="utf-8") as f:
            self.assertEqual(split_ts(f.readline().rstrip("\n"))[1], "dead connected!")
        self.assertEqual(server.stderr(), "chat_server: the syslog socket %s does not answer;"
                                          " logging to chat.log\n" % self.path)

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

    def flushed(self):
        """What the server does each turn: take the pending peers and mark them written."""
        peers = self.chat.take_pending()
        for peer in peers:
            peer.pending = False
        return peers

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

    def test_lines_queued_before_leaving_in_the_same_turn_are_still_written(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        self.flushed()
        alice.out.clear()
        bob.out.clear()
        self.chat.receive(alice, b"bye")    # queues a line for bob...
        self.chat.leave(bob)                # ...who leaves in the same turn
        self.assertIn(bob, self.flushed())
        self.assertEqual(self.lines(bob), [self.ts + "alice sent bye"])

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

    def __init__(self, port, env=None, command=None, args=()):
        full_env = dict(os.environ)
        full_env.pop("CHAT_PLATFORM", None)
        full_env.pop("CHAT_PASSWORD", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen((command or [sys.executable, CLIENT]) + ["--port", str(port)]
                                     + list(args),
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

    def test_server_shutdown_is_shown_and_exits_1(self):
        # The user did not end it: status 1, the server's reason on stderr (the line itself
        # also reaches stdout, as every line of the server does in a pipe).
        server = start_server(self)
        client = self.client(server.port)
        client.type("dave\n")
        watcher = server.client().join("watcher")
        wait_until(lambda: "dave" in server_members(server, watcher), "dave to join")
        self.assertEqual(server.stop()[0], 0)
        status, lines, err = client.finish()
        self.assertEqual(status, 1)
        self.assertEqual(split_ts(lines[-1])[1], SHUTTING_DOWN)
        self.assertEqual(err, SHUTTING_DOWN + "\n")

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
        self.assertEqual((proc.returncode, proc.stderr),
                         (2, "chat_client: --port: 'x' is not a port number (1 to 65535)\n"))

    def test_usage_errors_are_one_line_naming_the_option_and_exit_2(self):
        missing = os.path.join(tempfile.gettempdir(), "no-such-file-%d" % os.getpid())
        cases = [
            (["--port", "0"], "chat_client: --port: '0' is not a port number (1 to 65535)"),
            (["--color", "pink"], "chat_client: --color: invalid choice: 'pink' "
                                  "(choose from 'auto', 'always', 'never')"),
            (["--tls-fingerprint", "AB:CD"], "chat_client: --tls-fingerprint: 'AB:CD' is not a "
                                             "SHA-256 fingerprint (64 hex digits, colons allowed)"),
            (["--nick", ""], "chat_client: --nick: '' is not a nickname (letters and digits)"),
            (["--password-file", missing], "chat_client: --password-file: cannot read %s: "
                                           "No such file or directory" % missing),
            (["--tls-ca", missing], "chat_client: --tls-ca: cannot load %s: "
                                    "No such file or directory" % missing),
            (["--bogus"], "chat_client: unrecognized arguments: --bogus"),
        ]
        for args, message in cases:
            proc = subprocess.run([sys.executable, CLIENT] + args, capture_output=True,
                                  text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL)
            self.assertEqual((proc.returncode, proc.stdout, proc.stderr), (2, "", message + "\n"))

    def test_refusals_exit_1_with_the_reason_on_stderr(self):
        server = start_server(self, "--max-clients", "1")
        holder = server.client()
        self.assertEqual(holder.line(), WELCOME)
        status, lines, err = self.client(server.port).finish()
        self.assertEqual((status, [split_ts(line)[1] for line in lines], err),
                         (1, [FULL], FULL + "\n"))
        holder.close()
        server = start_server(self, "--join-timeout", "1")
        client = self.client(server.port)           # says nothing, keeps its stdin open
        self.assertEqual(client.line(), WELCOME)
        self.assertEqual(split_ts(client.line())[1], JOIN_TIMEOUT)
        status, lines, err = client.finish()
        self.assertEqual((status, lines, err), (1, [], JOIN_TIMEOUT + "\n"))

    def test_refused_nickname_in_a_pipe_exits_1_and_sends_nothing_more(self):
        server = start_server(self)
        alice = server.client().join("alice")
        client = self.client(server.port)
        client.type("ALICE\nhello\n")
        status, lines, err = client.finish()
        self.assertEqual((status, err), (1, busy("ALICE") + "\n"))
        self.assertEqual([WELCOME, busy("ALICE")],
                         [lines[0]] + [split_ts(line)[1] for line in lines[1:]])
        alice.send("anyone?\n")
        self.assertEqual(alice.said(), ALONE)   # "hello" never became a nickname
        alice.close()

    def test_nick_option_in_a_pipe(self):
        server = start_server(self)
        alice = server.client().join("alice")
        client = self.client(server.port, args=["--nick", "robot"])
        client.type("the build is green\n")
        status, lines, err = client.finish()
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(alice.said(), "robot connected!")
        self.assertEqual(alice.said(), "robot sent the build is green")
        status, lines, err = self.client(server.port, args=["--nick", "Alice"]).finish()
        self.assertEqual((status, err), (1, busy("Alice") + "\n"))
        alice.close()

    def test_quit_in_a_pipe_exits_0_after_goodbye(self):
        server = start_server(self)
        client = self.client(server.port, args=["--nick", "sam"])
        client.type("/quit\n")
        self.assertEqual(client.line(), WELCOME)
        self.assertEqual(split_ts(client.line())[1], OK)
        self.assertEqual(split_ts(client.line())[1], GOODBYE)
        status, lines, err = client.finish()   # stdin still open: Goodbye and EOF end it
        self.assertEqual((status, lines, err), (0, [], ""))

    def test_killed_server_exits_1(self):
        server = start_server(self)
        client = self.client(server.port, args=["--nick", "paul"])
        watcher = server.client().join("watcher")
        wait_until(lambda: "paul" in server_members(server, watcher), "paul to join")
        server.stop(signal.SIGKILL)
        status, lines, err = client.finish()
        self.assertEqual((status, err), (1, "Connection closed by the server.\n"))


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


def cell_width(ch):
    """Columns a character takes in the Screen below: 2 for East Asian wide, 0 for marks."""
    import unicodedata
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class Screen:
    """Just enough of a terminal to replay what the client writes: the rows a person would see
    and the attributes (SGR) of each character, a width with autowrap (DECAWM turns it off),
    wide characters, bells, and a resize that reflows soft-wrapped rows as tmux does (or, with
    ``reflow=False``, cuts them as xterm does). Rows are never scrolled away: the list of rows
    is the scrollback and the screen together."""

    def __init__(self, width=200, reflow=True):
        self.width = width
        self.reflow = reflow
        self.pending = ""       # an escape sequence cut in two by the pty read
        self.lines = [[]]       # rows of cells [char, attrs]; a wide char's right half is ""
        self.soft = [False]     # soft[i]: row i continues row i - 1 (the terminal wrapped it)
        self.row = self.col = 0
        self.wrap_next = False  # the last column was written: the next character wraps
        self.autowrap = True
        self.attrs = frozenset()
        self.bells = 0

    # -- writing --------------------------------------------------------------------------
    def _line(self, row, length=0):
        while len(self.lines) <= row:
            self.lines.append([])
            self.soft.append(False)
        line = self.lines[row]
        while len(line) < length:
            line.append([" ", frozenset()])
        return line

    def _down(self, soft=False):
        self.row += 1
        self._line(self.row)
        self.soft[self.row] = soft
        self.wrap_next = False

    def _put(self, ch):
        w = cell_width(ch)
        if w == 0:
            line = self._line(self.row)
            if 0 < self.col <= len(line):
                line[self.col - 1][0] += ch
            return
        if self.wrap_next and self.autowrap:
            self._down(soft=True)
            self.col = 0
        self.wrap_next = False
        if self.col + w > self.width:
            if self.autowrap:
                self._down(soft=True)
                self.col = 0
            else:
                self.col = self.width - w
        line = self._line(self.row, self.col + w)
        line[self.col] = [ch, self.attrs]
        if w == 2:
            line[self.col + 1] = ["", self.attrs]
        self.col += w
        if self.col >= self.width:
            self.col = self.width - 1
            self.wrap_next = True

    def feed(self, text):
        text, self.pending = self.pending + text, ""
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                match = re.match(r"\x1b(\[([?]?)([0-9;]*)([A-Za-z@])|\][^\x07]*\x07|[=>])",
                                 text[i:])
                if not match and re.match(r"^\x1b(\[[?]?[0-9;]*|\][^\x07]*)?$", text[i:]):
                    self.pending = text[i:]
                    return
                if not match:
                    raise AssertionError("unknown escape %r" % text[i:i + 10])
                if match.group(4):
                    self._csi(match.group(3), match.group(4), match.group(2) == "?")
                i += match.end()
                continue
            if ch == "\r":
                self.col = 0
                self.wrap_next = False
            elif ch == "\n":
                self._down()
            elif ch == "\b":
                self.col = max(self.col - 1, 0)
                self.wrap_next = False
            elif ch == "\x07":
                self.bells += 1
            elif ch >= " ":
                self._put(ch)
            else:
                raise AssertionError("unexpected control character %r on screen" % ch)
            i += 1

    def _csi(self, params, final, private):
        if private:
            if params == "7" and final in "hl":
                self.autowrap = final == "h"   # DECAWM
            return  # other modes (keypad, bracketed paste): nothing to draw
        if final == "m":
            self._sgr(params)
            return
        n = int(params.split(";")[0] or 1)
        self.wrap_next = False
        line = self._line(self.row)
        if final == "C":
            self.col = min(self.col + n, self.width - 1)
        elif final == "D":
            self.col = max(self.col - n, 0)
        elif final == "A":
            self.row = max(self.row - n, 0)
        elif final == "B":
            for _ in range(n):
                self._down()
        elif final == "K":
            mode = int(params or 0)
            if mode == 0:
                del line[self.col:]
            elif mode == 2:
                del line[:]
            else:
                for cell in line[:self.col + 1]:
                    cell[:] = [" ", frozenset()]
        elif final == "J":
            del line[self.col:]
            del self.lines[self.row + 1:]
            del self.soft[self.row + 1:]
        elif final == "P":
            del line[self.col:self.col + n]
        elif final == "@":
            line[self.col:self.col] = [[" ", frozenset()] for _ in range(n)]
            del line[self.width:]
        else:
            raise AssertionError("unhandled CSI %r%r" % (params, final))

    def _sgr(self, params):
        attrs = set(self.attrs)
        for code in [int(p or 0) for p in params.split(";")]:
            if code == 0:
                attrs = set()
            elif code in (1, 2, 7):
                attrs.add({1: "bold", 2: "dim", 7: "reverse"}[code])
            elif code == 22:
                attrs -= {"bold", "dim"}
            elif code == 27:
                attrs.discard("reverse")
            elif 30 <= code <= 37 or 90 <= code <= 97 or code == 39:
                attrs = {a for a in attrs if not a.startswith("fg:")}
                if code != 39:
                    attrs.add("fg:%d" % code)
            elif 40 <= code <= 47 or 100 <= code <= 107 or code == 49:
                attrs = {a for a in attrs if not a.startswith("bg:")}
                if code != 49:
                    attrs.add("bg:%d" % code)
            else:
                attrs.add("sgr:%d" % code)
        self.attrs = frozenset(attrs)

    # -- a new width ------------------------------------------------------------------------
    def resize(self, width):
        """The terminal gets ``width`` columns. Reflowing: soft-wrapped rows are joined into
        their line and the lines wrapped again, the cursor staying on its character. Not
        reflowing: rows are cut at the new width, the cursor stays where it is."""
        old, self.width = self.width, width
        self.wrap_next = False
        if not self.reflow:
            for line in self.lines:
                del line[width:]
            self.col = min(self.col, width - 1)
            return
        groups = []   # rows joined by soft wraps: each group is one line of text
        for i in range(len(self.lines)):
            if i > 0 and self.soft[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        lines, soft = [], []
        cursor = (self.row, self.col)
        for group in groups:
            cells, at = [], None
            for k, i in enumerate(group):
                if i == self.row:
                    at = len(cells) + self.col
                cells.extend(self.lines[i])
                if k < len(group) - 1:   # a row that wrapped was full: pad what was never drawn
                    cells.extend([" ", frozenset()] for _ in range(old - len(self.lines[i])))
            if at is None:
                while cells and cells[-1] == [" ", frozenset()]:
                    cells.pop()
            rows, col = [[]], 0
            for position, cell in enumerate(cells):
                if cell[0] == "":          # the right half of a wide character
                    rows[-1].append(cell)
                    continue
                w = cell_width(cell[0][0])
                if col + w > width:
                    rows.append([])
                    col = 0
                if position == at:
                    cursor = (len(lines) + len(rows) - 1, col)
                rows[-1].append(cell)
                col += w
            if at is not None and at >= len(cells):   # the cursor stands after the text
                extra = col + at - len(cells)
                cursor = (len(lines) + len(rows) - 1 + extra // width, extra % width)
            for k, row in enumerate(rows):
                lines.append(row)
                soft.append(k > 0)
        self.lines, self.soft = lines, soft
        self.row, self.col = cursor
        self._line(self.row)

    # -- reading --------------------------------------------------------------------------
    def visible(self):
        return ["".join(cell[0] for cell in line).rstrip() for line in self.lines]

    def attrs_of(self, text):
        """The attributes of the first character of the last row that contains ``text``."""
        for line in reversed(self.lines):
            chars = "".join(cell[0] or "\0" for cell in line)
            at = chars.find(text)
            if at >= 0:
                return line[at][1]
        raise AssertionError("%r is not on the screen: %r" % (text, self.visible()))


def _controlling_terminal():
    """In the child: a session of its own whose controlling terminal is the pty (stdin), so
    that Ctrl-C typed there sends SIGINT as in a real terminal."""
    import fcntl
    import termios
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_terminal_size(fd, width, height):
    import fcntl
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


class PtyClient:
    """chat_client.py (or ``command``) on a pseudo-terminal of ``width`` columns, typed into as
    a person would; what it writes is replayed on a Screen."""

    def __init__(self, test, args, env=None, width=100, height=30, reflow=True, command=None):
        import codecs
        import pty
        self.master, slave = pty.openpty()
        set_terminal_size(slave, width, height)
        self.height = height
        full_env = dict(os.environ, TERM="xterm", INPUTRC="/dev/null")
        for name in ("CHAT_PLATFORM", "NO_COLOR", "XTERM_VERSION", "CHAT_PASSWORD"):
            full_env.pop(name, None)
        full_env.update(env or {})
        self.proc = subprocess.Popen((command or [sys.executable, CLIENT]) + list(args),
                                     stdin=slave, stdout=slave, stderr=slave, env=full_env,
                                     close_fds=True, preexec_fn=_controlling_terminal)
        os.close(slave)
        test.addCleanup(self.close)
        self.output = b""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.screen = Screen(width, reflow=reflow)
        self.closed = False

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)

    def type(self, keys):
        os.write(self.master, keys.encode("utf-8") if isinstance(keys, str) else keys)

    def rows(self):
        return self.screen.visible()

    def rows_after_ts(self):
        return [TS.sub("", row) for row in self.screen.visible()]

    def read_until(self, condition, what, deadline=DEADLINE):
        """Read the terminal until condition(visible rows) holds."""
        end = time.monotonic() + deadline
        while not condition(self.screen.visible()):
            remaining = end - time.monotonic()
            if remaining <= 0 or self.closed:
                raise AssertionError("%s waiting for %s; screen %r"
                                     % ("terminal closed" if self.closed else "timed out",
                                        what, self.screen.visible()))
            self.read_some(remaining)

    def read_some(self, timeout):
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the client exited and the terminal closed
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self.output += chunk
        self.screen.feed(self.decoder.decode(chunk))

    def settle(self, quiet=0.3):
        """Read until nothing has come for ``quiet`` seconds (only where nothing is awaited:
        to see that something does NOT happen)."""
        end = time.monotonic() + DEADLINE
        before = None
        while before != len(self.output) and time.monotonic() < end:
            before = len(self.output)
            self.read_some(quiet)

    def join(self, nick):
        self.read_until(lambda rows: WELCOME in rows, "the welcome")
        self.type(nick + "\r")
        self.read_until(lambda rows: rows[-1] == nick + ">", "the prompt %s>" % nick)

    def resize(self, width, height=None):
        """A new window size; the kernel sends SIGWINCH to the client."""
        self.settle(0.1)
        self.screen.resize(width)
        set_terminal_size(self.master, width, height or self.height)

    def wait(self, deadline=DEADLINE):
        status = self.proc.wait(deadline)
        self.settle(0.05)
        return status

    def termios_lflag(self):
        import termios
        return termios.tcgetattr(self.master)[3]


@unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal")
class TerminalClientTests(unittest.TestCase):
    """chat_client.py under a pseudo-terminal, typed into as a person would."""

    def setUp(self):
        self.server = start_server(self)
        self.term = PtyClient(self, ["--port", str(self.server.port)])

    def test_incoming_line_keeps_the_half_typed_input(self):
        term = self.term
        term.join("carol")
        alice = self.server.client().join("alice")
        term.read_until(lambda rows: "alice connected!" in term.rows_after_ts(), "alice joins")
        term.type("half typ")
        term.read_until(lambda rows: rows[-1] == "carol> half typ", "the typed text echoed")
        alice.send("incoming\n")
        # The message gets a row of its own, and below it, last, the prompt with the
        # half-typed text, redrawn intact.
        term.read_until(lambda rows: term.rows_after_ts()[-2:] == ["alice sent incoming",
                                                                  "carol> half typ"],
                        "alice's line above the redrawn input")
        self.assertEqual(term.rows_after_ts().count("alice sent incoming"), 1)
        # Finish the line with editing keys (two Lefts, then typing) and send it whole.
        self.assertEqual(alice.said(), OK)
        self.assertEqual(alice.said(), "YOU SEND USERS incoming")
        term.type("\x1b[D\x1b[Ded\r")
        self.assertEqual(alice.said(), "carol sent half tedyp")
        term.read_until(lambda rows: "YOU SEND USERS half tedyp" in term.rows_after_ts(),
                        "the echo")
        alice.close()

    def test_history_and_ctrl_d_leave_cleanly(self):
        import termios
        term = self.term
        term.join("erin")
        before = term.termios_lflag()
        alice = self.server.client().join("alice")
        term.type("first\r")
        self.assertEqual(alice.said(), "erin sent first")
        term.type("\x1b[A again\r")  # Up brings "first" back
        self.assertEqual(alice.said(), "erin sent first again")
        term.type("\x04")  # Ctrl-D on an empty line
        self.assertEqual(term.wait(), 0)
        self.assertEqual(alice.said(), "erin disconnected!")
        after = term.termios_lflag()
        self.assertEqual(after & (termios.ICANON | termios.ECHO), termios.ICANON | termios.ECHO)
        self.assertEqual(before & (termios.ICANON | termios.ECHO), 0)  # readline's raw mode
        self.assertNotIn(b"Traceback", term.output)
        alice.close()

    def test_ctrl_c_leaves_quietly(self):
        self.term.join("frank")
        self.term.type("\x03")
        self.assertEqual(self.term.wait(), 0)
        self.assertNotIn(b"Traceback", self.term.output)


# Version 2's lines that only the client's tests need (docs/PROTOCOL.md), written out here on
# purpose, like the ones at the top.
PASSWORD_PROMPT = "This chat is protected. Please enter the password"
GOODBYE = "Goodbye!"
WRONG_PASSWORD = "Sorry! Wrong password."
TOO_MANY_PASSWORDS = "Sorry! Too many wrong passwords. Try again later."


def load_client_module():
    """chat_client.py as a module, for the tests that drive its parts in memory."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("chat_client_under_test", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingUi:
    """What a Session asks of the client, written down."""

    def __init__(self):
        self.session = None
        self.sent, self.shown, self.notes, self.prompts = [], [], [], []
        self.password_asked = self.half_closed = self.joins = 0

    def send(self, text):
        self.sent.append(text)

    def show(self, line):
        self.shown.append(line)

    def note(self, text, style=None):
        self.notes.append(text)

    def prompt_changed(self):
        self.prompts.append(self.session.prompt())

    def ask_password(self):
        self.password_asked += 1

    def half_close(self):
        self.half_closed += 1

    def joined(self):
        self.joins += 1

    def shown_texts(self):
        return [line.text for line in self.shown]


T0 = "2026-11-24 14:05: "


class SessionTests(unittest.TestCase):
    """The client's phases, driven in memory with the server's lines (docs/PROTOCOL.md)."""

    @classmethod
    def setUpClass(cls):
        cls.chat = load_client_module()

    def session(self, **options):
        ui = RecordingUi()
        session = self.chat.Session(ui, **options)
        ui.session = session
        session.connected()
        return session, ui

    def joined(self, nick="alice", **options):
        session, ui = self.session(**options)
        session.server_line(WELCOME)
        session.typed(nick)
        session.server_line(T0 + OK)
        del ui.sent[:], ui.shown[:], ui.notes[:]
        return session, ui

    def test_pipe_lines_wait_for_the_greeting_then_one_nickname_attempt_at_a_time(self):
        session, ui = self.session()
        session.typed("robot")
        session.typed("the build is green")
        self.assertEqual(ui.sent, [])                      # nothing before the greeting
        session.server_line(WELCOME)
        self.assertEqual((ui.sent, session.phase), (["robot"], "joining"))
        session.server_line(T0 + OK)
        self.assertEqual(ui.sent, ["robot", "the build is green"])
        self.assertEqual((session.phase, session.nick), ("member", "robot"))

    def test_pipe_refused_nickname_ends_with_status_1_and_sends_nothing_more(self):
        session, ui = self.session()
        session.typed("robot")
        session.typed("hello")
        session.server_line(WELCOME)
        with self.assertRaises(self.chat.ClientExit) as done:
            session.server_line(T0 + busy("robot"))
        self.assertEqual((done.exception.status, done.exception.message), (1, busy("robot")))
        self.assertEqual(ui.sent, ["robot"])   # "hello" never became a nickname
        self.assertEqual(ui.shown_texts()[-1], T0 + busy("robot"))  # stdout: the line as is

    def test_terminal_refused_nickname_asks_again_and_drops_lines_typed_meanwhile(self):
        session, ui = self.session(interactive=True)
        session.server_line(WELCOME)
        self.assertEqual(session.prompt(), "nickname> ")
        session.typed("alice")
        session.typed("hello")                          # typed before the answer came
        session.server_line(T0 + busy("alice"))
        self.assertEqual((session.phase, session.prompt()), ("nickname", "nickname> "))
        self.assertEqual(ui.notes, ["Not sent, you have not joined yet: hello"])
        self.assertEqual(ui.sent, ["alice"])
        session.typed("alice2")
        session.server_line(T0 + OK)
        self.assertEqual((session.nick, session.prompt()), ("alice2", "alice2> "))
        self.assertEqual(ui.sent, ["alice", "alice2"])

    def test_nick_option_is_sent_when_greeted(self):
        session, ui = self.session(nick="bot")
        session.input_ended()                       # an empty pipe: still join first
        self.assertEqual(ui.half_closed, 0)
        session.server_line(WELCOME)
        self.assertEqual((ui.sent, ui.half_closed), (["bot"], 1))

    def test_nickname_as_the_server_normalises_it(self):
        session, ui = self.session(interactive=True)
        session.server_line(WELCOME)
        session.typed("  \uff41\uff4c\uff49\uff43\uff45 ")   # fullwidth alice, padded
        session.server_line(T0 + OK)
        self.assertEqual(session.prompt(), "alice> ")

    def test_own_message_is_one_line_set_apart(self):
        session, ui = self.joined(interactive=True)
        self.assertTrue(session.replaces_echo("hello bob"))
        session.typed("hello bob")
        session.server_line(T0 + OK)                      # left out: the repeat says it all
        session.server_line(T0 + "YOU SEND USERS hello bob")
        self.assertEqual(ui.shown_texts(), [T0 + "YOU SEND USERS hello bob"])
        self.assertTrue(ui.shown[0].own)

    def test_ok_alone_is_shown_for_away_and_refusals_are_shown(self):
        session, ui = self.joined(interactive=True)
        self.assertFalse(session.replaces_echo("/away lunch"))
        session.typed("/away lunch")
        session.typed("hi")
        session.server_line(T0 + OK)                      # answers /away: shown
        session.server_line(T0 + "Server: there are no other users!")   # answers hi
        session.typed("/msg bob hi")
        session.server_line(T0 + 'Sorry! There is no user "bob".')
        session.typed("//etc")
        session.server_line(T0 + OK)
        session.server_line(T0 + "YOU SEND USERS /etc")
        self.assertEqual(ui.shown_texts(), [T0 + OK, T0 + "Server: there are no other users!",
                                            T0 + 'Sorry! There is no user "bob".',
                                            T0 + "YOU SEND USERS /etc"])

    def test_pipe_shows_every_line_as_it_is(self):
        session, ui = self.joined()
        session.typed("hello")
        for line in (OK, "YOU SEND USERS hello", "bob sent hi alice"):
            session.server_line(T0 + line)
        self.assertEqual(ui.shown_texts(), [T0 + OK, T0 + "YOU SEND USERS hello",
                                            T0 + "bob sent hi alice"])
        self.assertFalse(session.replaces_echo("x"))   # and no echo to replace

    def test_quiet_users_on_joining_teaches_the_nicknames(self):
        session, ui = self.session(interactive=True, list_users=True)
        session.server_line(WELCOME)
        session.typed("alice")
        session.server_line(T0 + OK)
        self.assertEqual(ui.sent, ["alice", "/users"])
        session.server_line(T0 + "Users (4): bob, alice, Carol (away), dave (away: a, b (c), x)")
        self.assertEqual(ui.shown_texts(), [WELCOME, T0 + OK])   # the list itself is not shown
        self.assertEqual(session.completions("", False), ["bob ", "Carol ", "dave "])
        session.server_line(T0 + "erin connected!")
        session.server_line(T0 + "bob disconnected!")
        session.server_line(T0 + "dave is now known as david")
        self.assertEqual(session.completions("", False), ["Carol ", "david ", "erin "])
        self.assertEqual(session.completions("c", False), ["Carol "])
        self.assertEqual(session.completions("/m", True), ["/msg ", "/me "])
        session.typed("/users")                             # typed by the user: shown
        session.server_line(T0 + "Users (2): alice, erin")
        self.assertEqual(ui.shown_texts()[-1], T0 + "Users (2): alice, erin")

    def test_prompt_follows_nick(self):
        session, ui = self.joined(interactive=True)
        session.typed("/nick alicia")
        session.server_line(T0 + OK)
        session.server_line(T0 + "alice is now known as alicia")
        self.assertEqual((session.nick, session.prompt()), ("alicia", "alicia> "))
        self.assertTrue(ui.shown[-1].own)
        session.server_line(T0 + "bob is now known as bobby")   # somebody else's
        self.assertEqual(session.prompt(), "alicia> ")

    def test_mentions_ring_once_history_does_not(self):
        session, ui = self.joined(interactive=True)
        session.server_line(T0 + "Recent messages (2):")
        session.server_line(T0 + "bob sent ALICE are you there")
        session.server_line(T0 + "* bob waves at alice")
        session.server_line(T0 + "bob sent alice: now?")
        session.server_line(T0 + "bob sent malice aforethought")
        session.server_line(T0 + "[private] bob sent psst")
        marks = [(line.mention, line.bell) for line in ui.shown]
        self.assertEqual(marks, [(False, False), (True, False), (True, False), (True, True),
                                 (False, False), (False, True)])

    def test_password_from_the_option_from_a_pipe_and_asked_on_a_terminal(self):
        session, ui = self.session(password="s3cret", nick="bob")
        session.server_line(PASSWORD_PROMPT)
        self.assertEqual((ui.sent, session.phase), (["s3cret"], "checking password"))
        session.server_line(WELCOME)
        self.assertEqual(ui.sent, ["s3cret", "bob"])
        session, ui = self.session()
        session.typed("pipe secret")
        session.typed("bob")
        session.server_line(PASSWORD_PROMPT)
        session.server_line(WELCOME)
        self.assertEqual(ui.sent, ["pipe secret", "bob"])
        session, ui = self.session(interactive=True)
        session.server_line(PASSWORD_PROMPT)
        self.assertEqual((ui.password_asked, session.prompt()), (1, "password> "))
        session.typed("typed secret")
        self.assertEqual(ui.sent, ["typed secret"])

    def test_final_refusals_end_with_status_1(self):
        for line in (FULL, JOIN_TIMEOUT, WRONG_PASSWORD, TOO_MANY_PASSWORDS):
            session, ui = self.session(interactive=True)
            with self.assertRaises(self.chat.ClientExit) as done:
                session.server_line(T0 + line)
            self.assertEqual((done.exception.status, done.exception.message), (1, line))
            self.assertEqual(ui.shown, [])   # a terminal sees it once, as the closing message

    def test_how_a_connection_ends(self):
        ClientExit = self.chat.ClientExit
        session, ui = self.joined()
        session.typed("/quit")
        session.server_line(T0 + GOODBYE)
        with self.assertRaises(ClientExit) as done:
            session.connection_closed()
        self.assertEqual((done.exception.status, done.exception.message), (0, None))
        session, ui = self.joined()
        session.input_ended()
        self.assertEqual(ui.half_closed, 1)
        with self.assertRaises(ClientExit) as done:
            session.connection_closed()
        self.assertEqual(done.exception.status, 0)
        session, ui = self.joined()
        session.server_line(T0 + SHUTTING_DOWN)
        with self.assertRaises(ClientExit) as done:
            session.connection_closed()
        self.assertEqual((done.exception.status, done.exception.message), (1, SHUTTING_DOWN))
        session, ui = self.joined()
        with self.assertRaises(ClientExit) as done:
            session.connection_closed("Connection lost: Connection reset by peer.")
        self.assertEqual(done.exception.message, "Connection lost: Connection reset by peer.")

    def test_terminal_reconnects_and_rejoins_with_the_same_nickname(self):
        session, ui = self.joined(interactive=True, reconnect=True, password="pw")
        session.typed("/nick alicia")
        session.server_line(T0 + OK)
        session.server_line(T0 + "alice is now known as alicia")
        session.server_line(T0 + SHUTTING_DOWN)
        session.connection_closed()
        self.assertEqual((session.phase, session.prompt()), ("offline", "(offline) alicia> "))
        session.typed("lost words")
        self.assertIn("lost words", ui.notes[-1])
        del ui.sent[:]
        session.connected()
        session.server_line(PASSWORD_PROMPT)
        session.server_line(WELCOME)
        session.server_line(T0 + OK)
        self.assertEqual(ui.sent, ["pw", "alicia"])
        self.assertEqual(ui.notes[-1], "Reconnected as alicia.")
        self.assertEqual(ui.shown_texts()[-1], T0 + SHUTTING_DOWN)   # greetings: answered
        self.assertEqual(session.prompt(), "alicia> ")

    def test_no_reconnect_before_joining_or_with_no_reconnect(self):
        session, ui = self.session(interactive=True, reconnect=True)
        with self.assertRaises(self.chat.ClientExit):
            session.connection_closed()
        session, ui = self.joined(interactive=True, reconnect=False)
        with self.assertRaises(self.chat.ClientExit):
            session.connection_closed()


class PresenterTests(unittest.TestCase):
    """How lines look on a terminal: wrapping that can't forge a line, colours, mentions."""

    @classmethod
    def setUpClass(cls):
        cls.chat = load_client_module()

    def rows(self, text, width, **options):
        presenter = self.chat.Presenter(width=lambda: width, **options)
        out = presenter.line(self.chat.ServerLine(text))
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out).split("\n")

    def test_padded_message_cannot_start_a_row_with_a_timestamp(self):
        fake = T0 + "bob disconnected!"
        for width in (20, 40, 61, 80, 132):
            for pad in range(0, width + 2):
                rows = self.rows(T0 + "bob sent hi" + " " * pad + fake, width)
                self.assertTrue(rows[0].startswith(T0.rstrip()), rows)
                for row in rows[1:]:
                    self.assertTrue(row.startswith(" "), rows)
                    self.assertLessEqual(cell_width_of(row), width - 1, rows)

    def test_wide_characters_count_two_columns_and_never_straddle(self):
        rows = self.rows(T0 + "bob sent " + "\u4e2d" * 40 + "e\u0301" * 5, 30)
        for row in rows:
            self.assertLessEqual(cell_width_of(row), 29, rows)
        self.assertEqual("".join(row.strip() for row in rows).count("\u4e2d"), 40)
        self.assertIn("e\u0301" * 5, rows[-1])

    def test_a_pipe_gets_the_line_as_it_is(self):
        presenter = self.chat.Presenter()
        text = T0 + "bob sent \t tabs and " + "x" * 300
        self.assertEqual(presenter.line(self.chat.ServerLine(text)), text)

    def test_nick_colours_are_stable_and_shared(self):
        palette = ("32", "33", "34", "35", "36", "92", "93", "94", "95", "96")
        for nick in ("bob", "Bob", "алиса", "ｂｏｂ"):
            expected = palette[zlib_crc32(nick.casefold().encode("utf-8")) % len(palette)]
            self.assertEqual(self.chat.nick_colour(nick), expected)
        presenter = self.chat.Presenter(colour=True)
        out = presenter.line(self.chat.ServerLine(T0 + "bob sent hi"))
        self.assertIn("\x1b[1;%sm%s\x1b[0m" % (self.chat.nick_colour("bob"), "bob"), out)

    def test_colour_auto_needs_a_terminal_and_no_no_color(self):
        wanted = self.chat.colour_wanted

        class Tty:
            def isatty(self):
                return True
        self.assertTrue(wanted("auto", Tty(), {"TERM": "xterm"}))
        self.assertTrue(wanted("auto", Tty(), {"TERM": "xterm", "NO_COLOR": ""}))
        self.assertFalse(wanted("auto", Tty(), {"TERM": "xterm", "NO_COLOR": "1"}))
        self.assertFalse(wanted("auto", Tty(), {"TERM": "dumb"}))
        self.assertFalse(wanted("auto", io_string(), {"TERM": "xterm"}))
        self.assertTrue(wanted("always", io_string(), {}))
        self.assertFalse(wanted("never", Tty(), {}))


def cell_width_of(text):
    return sum(cell_width(ch) for ch in text)


def zlib_crc32(data):
    import zlib
    return zlib.crc32(data)


def io_string():
    import io
    return io.StringIO()


def wrapped(text, width):
    """ASCII ``text`` cut into rows of ``width``: how a terminal shows an input line."""
    return [text[i:i + width].rstrip() for i in range(0, len(text), width)] or [""]


@unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal")
class TerminalLayoutTests(unittest.TestCase):
    """What a person sees: resizes, wrapping that can't forge a line, colours, mentions."""

    def setUp(self):
        self.server = start_server(self)

    def term(self, *args, **kwargs):
        return PtyClient(self, ["--port", str(self.server.port)] + list(args), **kwargs)

    def assert_input_rows(self, term, text, width):
        """The last rows are the prompt and input laid out at ``width``, and the row above
        them is a line of the conversation: nothing stale in between."""
        expected = wrapped(text, width)

        def shown(rows):   # the rows down to the last one written (blank ones below: nothing)
            while rows and not rows[-1]:
                rows = rows[:-1]
            return rows
        term.read_until(lambda rows: shown(rows)[-len(expected):] == expected,
                        "the input laid out at %d columns" % width)
        rows = shown(term.rows())
        whole = "".join(expected)
        for row in rows[:-len(expected)]:
            self.assertFalse(len(row) >= 5 and (row in whole or row.startswith("carol>")),
                             "stale row %r above the input in %r" % (row, rows))

    def resize_keeps_the_input(self, reflow):
        env = {} if reflow else {"XTERM_VERSION": "XTerm(388)"}
        term = self.term(width=40, reflow=reflow, env=env)
        term.join("carol")
        alice = self.server.client().join("alice")
        term.read_until(lambda rows: "alice connected!" in term.rows_after_ts(), "alice")
        typed = "the quick brown fox jumps over the lazy dog, then naps a while"
        term.type(typed)
        self.assert_input_rows(term, "carol> " + typed, 40)
        for width in (25, 33, 60, 17):
            term.resize(width)
            self.assert_input_rows(term, "carol> " + typed, width)
            alice.send("now %d\n" % width)
            self.assertEqual(alice.said(), OK)
            self.assertEqual(alice.said(), "YOU SEND USERS now %d" % width)
            term.read_until(lambda rows: any(row.endswith("now %d" % width) for row in rows),
                            "alice's line")
            self.assert_input_rows(term, "carol> " + typed, width)
        term.type("!\r")
        self.assertEqual(alice.said(), "carol sent " + typed + "!")
        alice.close()

    def test_resize_with_a_wrapped_half_typed_line_reflowing_terminal(self):
        self.resize_keeps_the_input(reflow=True)      # tmux, VTE, kitty, Windows Terminal

    def test_resize_with_a_wrapped_half_typed_line_xterm(self):
        self.resize_keeps_the_input(reflow=False)     # cuts rows, never rewraps them

    def test_padded_message_cannot_produce_a_row_starting_with_a_timestamp(self):
        term = self.term(width=61)
        term.join("dave")
        bob = self.server.client().join("bob")
        forged = "2026-11-24 14:05: bob disconnected!"
        for pad in (26, 27, 29, 30, 31, 59, 60, 61, 62, 100):
            bob.send("hi" + " " * pad + forged + "\n")
            self.assertEqual(bob.said(), OK)
            bob.said()
        bob.send("done\n")
        term.read_until(lambda rows: any(row.endswith("bob sent done") for row in rows), "done")
        rows = term.rows()
        for row in rows:
            if TS.match(row):   # every row that starts with a time is a real line
                self.assertTrue(TS.sub("", row).startswith(("bob sent", "Server:", "bob con")),
                                "forged row %r in %r" % (row, rows))
        bob.close()

    def test_own_message_costs_one_line_and_is_set_apart(self):
        term = self.term()
        term.join("erin")
        bob = self.server.client().join("bob")
        term.read_until(lambda rows: rows[-2].endswith("bob connected!"), "bob")
        term.type("hello bob\r")
        self.assertEqual(bob.said(), "erin sent hello bob")
        term.read_until(lambda rows: rows[-2:] == [rows[-2][:18] + "YOU SEND USERS hello bob",
                                                   "erin>"], "the one own line")
        rows = term.rows_after_ts()
        self.assertEqual(rows.count("YOU SEND USERS hello bob"), 1)
        self.assertNotIn("erin> hello bob", rows)          # readline's echo is gone
        self.assertEqual(rows[-3], "bob connected!")         # and so is the ok before it
        self.assertIn("bold", term.screen.attrs_of("hello bob"))
        bob.close()

    def test_colours_mention_and_bell(self):
        term = self.term()
        term.join("frank")
        bob = self.server.client().join("bob")
        bob.send("time for food?\n")
        bob.send("FRANK, lunch?\n")
        bob.send("frankly no\n")
        term.read_until(lambda rows: any(row.endswith("bob sent frankly no") for row in rows), "bob's lines")
        screen = term.screen
        colour = "fg:" + NICK_COLOURS[zlib_crc32(b"bob") % len(NICK_COLOURS)]
        self.assertEqual(screen.attrs_of("bob sent time"), {"bold", colour})
        self.assertEqual(screen.attrs_of("2026"[:2]), {"fg:90"})         # the time in grey
        self.assertNotIn("reverse", screen.attrs_of("time for food?"))
        self.assertIn("reverse", screen.attrs_of("FRANK, lunch?"))      # the mention
        self.assertNotIn("reverse", screen.attrs_of("frankly no"))      # not a word of its own
        self.assertEqual(screen.bells, 1)
        self.assertEqual(term.output.count(b"\a"), 1)
        bob.close()

    def test_no_bell_option(self):
        term = self.term("--no-bell")
        term.join("gina")
        bob = self.server.client().join("bob")
        bob.send("gina: ping\n")
        term.read_until(lambda rows: any(row.endswith("bob sent gina: ping") for row in rows), "the mention")
        self.assertIn("reverse", term.screen.attrs_of("gina: ping"))
        self.assertEqual(term.screen.bells, 0)
        bob.close()

    def test_no_color_and_color_never_mean_no_escape_for_colour(self):
        for args, env in (((), {"NO_COLOR": "1"}), (("--color", "never"), {})):
            term = self.term(*args, env=env)
            term.join(fresh_nick("hank"))
            bob = self.server.client().join(fresh_nick("bob"))
            bob.send("hank: hi\n")
            term.read_until(lambda rows: any("sent hank: hi" in row for row in rows), "hi")
            self.assertNotRegex(term.output.decode("utf-8", "replace"), r"\x1b\[[0-9;]*m")
            bob.close()


NICK_COLOURS = ("32", "33", "34", "35", "36", "92", "93", "94", "95", "96")


@unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal")
class TerminalSessionTests(unittest.TestCase):
    """The phases as a person meets them: nickname refused, stopped and continued, the
    server gone and back, and how the client ends."""

    def test_refused_nickname_then_retry_sends_nothing_by_surprise(self):
        server = start_server(self)
        taken = server.client().join("ivan")
        term = PtyClient(self, ["--port", str(server.port)])
        term.read_until(lambda rows: rows[-1] == "nickname>", "the nickname prompt")
        term.type("Ivan\r")
        term.read_until(lambda rows: rows[-2].endswith(busy("Ivan"))
                        and rows[-1] == "nickname>", "the refusal, and still asking")
        term.type("ivan2\r")
        term.read_until(lambda rows: rows[-1] == "ivan2>", "joined")
        self.assertEqual(taken.said(), "ivan2 connected!")
        taken.close()

    def test_nick_option_joins_and_asks_again_only_when_refused(self):
        server = start_server(self)
        term = PtyClient(self, ["--port", str(server.port), "--nick", "judy"])
        term.read_until(lambda rows: rows[-1] == "judy>", "joined as judy")
        term2 = PtyClient(self, ["--port", str(server.port), "--nick", "JUDY"])
        term2.read_until(lambda rows: len(rows) > 2 and rows[-1] == "nickname>"
                         and rows[-2].endswith(busy("JUDY")), "asked again")

    def test_ctrl_z_and_fg_under_job_control_restore_raw_mode(self):
        if not shutil.which("bash"):
            self.skipTest("needs bash for job control")
        server = start_server(self)
        alice = server.client().join("alice")
        shell = PtyClient(self, ["--norc", "--noprofile", "-i"], command=["bash"], width=200,
                          env={"PS1": "$ ", "HISTFILE": "/dev/null"})
        shell.read_until(lambda rows: rows[-1] == "$", "the shell's prompt")
        shell.type("%s %s --port %d --nick kate\r" % (sys.executable, CLIENT, server.port))
        shell.read_until(lambda rows: rows[-1] == "kate>", "the client")
        shell.type("abcdef")
        shell.read_until(lambda rows: rows[-1] == "kate> abcdef", "typed")
        shell.type("\x1a")                                    # Ctrl-Z
        shell.read_until(lambda rows: any("Stopped" in row for row in rows[-3:])
                         and rows[-1] == "$", "stopped")
        shell.type("fg\r")
        shell.read_until(lambda rows: rows[-1] == "kate> abcdef", "continued, input kept")
        shell.type("\x1b[D\x1b[DX\r")        # arrows work: raw mode, readline editing again
        self.assertEqual(alice.said(), "kate connected!")
        self.assertEqual(alice.said(), "kate sent abcdXef")
        shell.type("\x04")
        shell.read_until(lambda rows: rows[-1] == "$", "the shell again")
        alice.close()

    def test_sigstop_then_sigcont_after_the_shell_reset_the_terminal(self):
        import termios
        server = start_server(self)
        alice = server.client().join("alice")
        term = PtyClient(self, ["--port", str(server.port), "--nick", "liam"])
        term.read_until(lambda rows: rows[-1] == "liam>", "joined")
        term.proc.send_signal(signal.SIGSTOP)
        cooked = termios.tcgetattr(term.master)
        cooked[3] |= termios.ICANON | termios.ECHO
        termios.tcsetattr(term.master, termios.TCSANOW, cooked)   # what a shell does
        term.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: term.termios_lflag() & termios.ICANON == 0, "raw mode again")
        term.type("abcdef\x1b[D\x1b[DX\r")
        self.assertEqual(alice.said(), "liam connected!")
        self.assertEqual(alice.said(), "liam sent abcdXef")
        alice.close()

    def test_reconnect_after_the_server_restarts_keeps_the_half_typed_input(self):
        first = start_server(self)
        port = first.port
        term = PtyClient(self, ["--port", str(port)])
        term.join("mia")
        term.type("half typed")
        term.read_until(lambda rows: rows[-1] == "mia> half typed", "typed")
        self.assertEqual(first.stop()[0], 0)
        term.read_until(lambda rows: rows[-2] == "Connection lost. Reconnecting in 1 s "
                        "(Ctrl-C to quit)..." and rows[-1] == "(offline) mia> half typed",
                        "waiting to reconnect")
        self.assertTrue(term.rows()[-3].endswith(SHUTTING_DOWN))
        second = start_server(self, "--port", str(port))
        watcher = second.client().join("watcher")
        term.read_until(lambda rows: rows[-2] == "Reconnected as mia."
                        and rows[-1] == "mia> half typed", "rejoined")
        self.assertEqual(term.rows().count(WELCOME), 1)
        self.assertEqual(watcher.said(), "mia connected!")
        term.type(", sent after\r")
        self.assertEqual(watcher.said(), "mia sent half typed, sent after")
        watcher.close()

    def test_tab_completes_commands_and_a_nickname_that_joined_earlier(self):
        server = start_server(self)
        bob = server.client().join("bobby")          # here before the client: /users says so
        term = PtyClient(self, ["--port", str(server.port), "--nick", "quinn"])
        term.read_until(lambda rows: rows[-1] == "quinn>", "joined")
        self.assertEqual(bob.said(), "quinn connected!")
        term.settle(0.2)                     # the quiet /users answered (and not shown)
        self.assertFalse(any("Users (" in row for row in term.rows()), term.rows())
        term.type("/ms\tb\t")
        term.read_until(lambda rows: rows[-1] == "quinn> /msg bobby", "completed")  # + a space
        term.type("psst\r")
        self.assertEqual(bob.said(), "[private] quinn sent psst")
        term.read_until(lambda rows: rows[-1] == "quinn>" and
                        rows[-2].endswith("[private] YOU SEND bobby psst"), "one own line")
        carl = server.client().join("carl")   # joins later: learned from 'connected!'
        term.read_until(lambda rows: any(row.endswith("carl connected!") for row in rows), "carl")
        term.type("ca\t")
        term.read_until(lambda rows: rows[-1] == "quinn> carl", "completed carl")
        bob.close()
        carl.close()

    def test_prompt_follows_nick_and_quit_exits_0(self):
        server = start_server(self)
        watcher = server.client().join("watcher")
        term = PtyClient(self, ["--port", str(server.port), "--nick", "rosa"])
        term.read_until(lambda rows: rows[-1] == "rosa>", "joined")
        term.type("/nick rosalind\r")
        term.read_until(lambda rows: rows[-1] == "rosalind>" and
                        rows[-2].endswith("rosa is now known as rosalind"), "the new prompt")
        self.assertEqual(watcher.said(), "rosa connected!")
        self.assertEqual(watcher.said(), "rosa is now known as rosalind")
        term.type("/quit\r")
        self.assertEqual(term.wait(), 0)
        self.assertEqual(watcher.said(), "rosalind disconnected!")
        self.assertEqual(term.rows_after_ts()[-2:], [GOODBYE, ""])
        watcher.close()

    def test_ctrl_c_while_waiting_to_reconnect_exits_0(self):
        server = start_server(self)
        term = PtyClient(self, ["--port", str(server.port), "--nick", "nina"])
        term.read_until(lambda rows: rows[-1] == "nina>", "joined")
        server.stop(signal.SIGKILL)
        term.read_until(lambda rows: rows[-1] == "(offline) nina>", "offline")
        term.type("\x03")
        self.assertEqual(term.wait(), 0)

    def test_exit_status_1_with_the_reason_once(self):
        server = start_server(self, "--max-clients", "1")
        holder = server.client()
        self.assertEqual(holder.line(), WELCOME)
        term = PtyClient(self, ["--port", str(server.port)])
        self.assertEqual(term.wait(), 1)
        self.assertEqual([row for row in term.rows() if row], [FULL])
        holder.close()
        server2 = start_server(self)
        term = PtyClient(self, ["--port", str(server2.port), "--nick", "omar", "--no-reconnect"])
        term.read_until(lambda rows: rows[-1] == "omar>", "joined")
        server2.stop()
        self.assertEqual(term.wait(), 1)
        self.assertEqual([row for row in term.rows() if row][-1], SHUTTING_DOWN)  # stderr
        self.assertEqual(term.rows_after_ts().count(SHUTTING_DOWN), 1)
        self.assertNotIn(b"Traceback", term.output)


def now_ts():
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M: ")


class FakePeer:
    """The server's end of one connection in a FakeServer script."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(DEADLINE)
        self.buf = b""

    def send(self, *lines):
        self.sock.sendall("".join(line + "\n" for line in lines).encode("utf-8"))

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the client closed; partial %r" % self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("utf-8")

    def expect(self, text):
        got = self.line()
        if got != text:
            raise AssertionError("expected %r from the client, got %r" % (text, got))

    def expect_eof(self):
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:   # closed with TLS session tickets unread: also an end
                return
            if not chunk:
                return
            self.buf += chunk
            if self.buf.strip(b"\r"):
                raise AssertionError("expected the end, got %r" % self.buf)


class FakeServer:
    """A server that follows ``script(peer)`` for each of ``connections`` connections, in a
    thread: for protocol rows the real server does not have yet, and for misbehaviour it
    never shows. ``tls``: an SSLContext for the server side. An exception in the script
    fails the test when it is cleaned up."""

    def __init__(self, test, script, tls=None, connections=1, handshake_may_fail=False):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(DEADLINE)
        self.port = self.listener.getsockname()[1]
        self.errors = []
        self.handshake_may_fail = handshake_may_fail
        self.thread = threading.Thread(target=self._serve, args=(script, tls, connections),
                                       daemon=True)
        self.thread.start()
        test.addCleanup(self._finish, test)

    def _serve(self, script, tls, connections):
        for _ in range(connections):
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                self.errors.append(exc)
                return
            try:
                conn.settimeout(DEADLINE)
                if tls is not None:
                    try:
                        conn = tls.wrap_socket(conn, server_side=True)
                    except OSError:
                        if self.handshake_may_fail:
                            continue
                        raise
                script(FakePeer(conn))
            except Exception as exc:  # noqa: BLE001 -- reported by _finish
                self.errors.append(exc)
            finally:
                conn.close()

    def _finish(self, test):
        self.listener.close()
        self.thread.join(DEADLINE)
        if self.errors:
            raise self.errors[0]


def make_certificate(directory, name="server"):
    """A self-signed certificate for 127.0.0.1 made with openssl: (cert, key, fingerprint as
    openssl prints it). Skips the test where openssl is missing."""
    if not shutil.which("openssl"):
        raise unittest.SkipTest("needs the openssl command to make a test certificate")
    cert, key = os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=DEADLINE)
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", cert],
                         check=True, capture_output=True, text=True, timeout=DEADLINE).stdout
    return cert, key, out.strip().split("=", 1)[1]


def server_tls_context(cert, key):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def fake_member(nick, messages=()):
    """A script: greet, accept ``nick``, answer each message as the protocol does, then expect
    the client's end of input."""
    def script(peer):
        peer.send(WELCOME)
        peer.expect(nick)
        peer.send(now_ts() + OK)
        for message in messages:
            peer.expect(message)
            peer.send(now_ts() + OK, now_ts() + "YOU SEND USERS " + message)
        peer.expect_eof()
    return script


class ClientSecurityTests(unittest.TestCase):
    """Passwords and TLS from the client's side, in a pipe and on a terminal."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="chat-tls-")
        cls.cert, cls.key, cls.fingerprint = make_certificate(cls.dir)
        cls.other_cert, _, cls.other_fingerprint = make_certificate(cls.dir, "other")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    env = {}

    def client(self, port, args=(), env=None):
        client = PipedClient(port, env=dict(self.env, **(env or {})), args=args)
        self.addCleanup(client.kill)
        return client

    def known_servers(self, *lines):
        path = os.path.join(tempfile.mkdtemp(dir=self.dir), "known_servers")
        if lines:
            with open(path, "w") as f:
                f.write("".join(line + "\n" for line in lines))
        return path

    # -- passwords --------------------------------------------------------------------------
    def password_script(self, password, nick="bob"):
        def script(peer):
            peer.send(PASSWORD_PROMPT)
            peer.expect(password)
            fake_member(nick, ["hi"])(peer)
        return script

    def test_password_from_a_file_from_the_environment_and_from_the_pipe(self):
        path = os.path.join(self.dir, "password")
        with open(path, "w") as f:
            f.write("from file\nsecond line ignored\n")
        runs = ((["--password-file", path, "--nick", "bob"], {}, "hi\n", "from file"),
                (["--nick", "bob"], {"CHAT_PASSWORD": "from env"}, "hi\n", "from env"),
                ([], {}, "from pipe\nbob\nhi\n", "from pipe"))
        for args, env, typed, password in runs:
            server = FakeServer(self, self.password_script(password))
            client = self.client(server.port, args, env)
            client.type(typed)
            status, lines, err = client.finish()
            self.assertEqual((status, err), (0, ""))
            self.assertEqual(lines[:2], [PASSWORD_PROMPT, WELCOME])

    def test_wrong_password_and_lockout_exit_1(self):
        for answer in ([WRONG_PASSWORD], [TOO_MANY_PASSWORDS]):
            def script(peer, answer=answer):
                if answer == [WRONG_PASSWORD]:
                    peer.send(PASSWORD_PROMPT)
                    peer.expect("guess")
                peer.send(now_ts() + answer[0])
            server = FakeServer(self, script)
            client = self.client(server.port, ["--nick", "bob"], {"CHAT_PASSWORD": "guess"})
            status, lines, err = client.finish()
            self.assertEqual((status, err), (1, answer[0] + "\n"))
            self.assertEqual(split_ts(lines[-1])[1], answer[0])

    # -- TLS --------------------------------------------------------------------------------
    def tls_server(self, script=None, handshake_may_fail=False):
        return FakeServer(self, script or fake_member("tess", ["over tls"]),
                          tls=server_tls_context(self.cert, self.key),
                          handshake_may_fail=handshake_may_fail)

    def run_tls_client(self, server, *args):
        client = self.client(server.port, ["--tls", "--nick", "tess"] + list(args))
        client.type("over tls\n")
        return client.finish()

    def test_pinned_fingerprint_any_spelling(self):
        pin = self.fingerprint.lower().replace(":", "")
        server = self.tls_server()
        status, lines, err = self.run_tls_client(server, "--tls-fingerprint", pin)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual([split_ts(line)[1] for line in lines[1:]],
                         [OK, OK, "YOU SEND USERS over tls"])

    def test_pinned_fingerprint_mismatch_exits_1(self):
        server = self.tls_server(script=lambda peer: peer.expect_eof())
        status, lines, err = self.run_tls_client(server, "--tls-fingerprint",
                                                 self.other_fingerprint)
        self.assertEqual(status, 1)
        self.assertEqual(err, "The TLS certificate of 127.0.0.1:%d has the SHA-256 fingerprint "
                              "%s, not the one --tls-fingerprint gives (%s). Not connected.\n"
                         % (server.port, self.fingerprint, self.other_fingerprint))

    def test_ca_verification(self):
        server = self.tls_server()
        status, lines, err = self.run_tls_client(server, "--tls-ca", self.cert)
        self.assertEqual((status, err), (0, ""))
        server = self.tls_server(script=lambda peer: None, handshake_may_fail=True)
        status, lines, err = self.run_tls_client(server, "--tls-ca", self.other_cert)
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("The TLS certificate of 127.0.0.1:%d failed the "
                                       "--tls-ca check: " % server.port), err)

    def test_unknown_server_in_a_pipe_is_refused_then_known_is_accepted(self):
        path = self.known_servers()
        server = self.tls_server(script=lambda peer: peer.expect_eof())
        status, lines, err = self.run_tls_client(server, "--known-servers", path)
        self.assertEqual((status, lines), (1, []))
        self.assertIn("(SHA-256 %s)" % self.fingerprint, err)
        self.assertFalse(os.path.exists(path))
        server = self.tls_server()
        path = self.known_servers("# comment", "127.0.0.1:%d %s" % (server.port, self.fingerprint))
        status, lines, err = self.run_tls_client(server, "--known-servers", path)
        self.assertEqual((status, err), (0, ""))

    def test_changed_certificate_is_refused_naming_file_and_line(self):
        server = self.tls_server(script=lambda peer: peer.expect_eof())
        path = self.known_servers("127.0.0.1:1 %s" % self.fingerprint,
                                  "127.0.0.1:%d %s" % (server.port, self.other_fingerprint))
        status, lines, err = self.run_tls_client(server, "--known-servers", path)
        self.assertEqual(status, 1)
        self.assertIn("HAS CHANGED", err)
        self.assertIn("  known:  %s\n  now:    %s\n" % (self.other_fingerprint,
                                                       self.fingerprint), err)
        self.assertIn("remove line 2 of %s and connect again." % path, err)

    def test_tls_to_a_plain_server_and_plain_to_a_tls_server(self):
        plain = start_server(self)
        status, lines, err = self.run_tls_client(plain)
        self.assertEqual((status, lines, err), (1, [], "127.0.0.1:%d does not speak TLS (it "
                                                "answered in plain text): leave out --tls.\n"
                                                % plain.port))
        server = FakeServer(self, lambda peer: None, handshake_may_fail=True,
                            tls=server_tls_context(self.cert, self.key))
        client = self.client(server.port, ["--nick", "tess"])
        status, lines, err = client.finish()   # stdin open: nothing but the probe goes out
        self.assertEqual((status, lines, err), (1, [], "127.0.0.1:%d closed the connection "
                                                "without a greeting in plain text: it expects "
                                                "TLS, add --tls.\n" % server.port))

    def test_decrypted_bytes_waiting_inside_tls_are_not_left_behind(self):
        # A read smaller than a TLS record leaves the rest decrypted inside the SSLSocket,
        # where select can't see it: the client must drain pending() after each read.
        chat = load_client_module()
        chat.READ_SIZE = 64
        burst = ["%s line %03d of the burst, all in one record" % (now_ts(), i)
                 for i in range(40)]

        def script(peer):
            peer.send(*burst)                    # one sendall: one TLS record
            peer.expect_eof()
        server = self.tls_server(script=script)
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = chat.Connection("127.0.0.1", server.port, context)
        selector = selectors.DefaultSelector()
        received = b""
        end = time.monotonic() + DEADLINE
        while received.count(b"\n") < len(burst) and time.monotonic() < end:
            if conn.events():
                selector.register(conn.sock, conn.events())
                ready = selector.select(end - time.monotonic())
                selector.unregister(conn.sock)
                for _, mask in ready:
                    received += b"".join(e for e in conn.ready(mask) if e != "open")
        # (The socket is read 64 bytes at a time, so the record arrives whole only after a
        # few reads; then TLS holds 2.6 KB that select knows nothing of.)
        self.assertEqual(received.decode().splitlines(), burst)
        conn.half_close()
        conn.close()


class ClientSecurityTestsWindowsPaths(ClientSecurityTests):
    """The same through the threaded-stdin path Windows uses."""
    env = {"CHAT_PLATFORM": "windows"}


@unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal")
class TerminalSecurityTests(unittest.TestCase):
    """A password typed on a terminal, and trusting a certificate on first use."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="chat-tls-")
        cls.cert, cls.key, cls.fingerprint = make_certificate(cls.dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    @staticmethod
    def member_until_the_end(nick, password=None):
        def script(peer):
            if password is not None:
                peer.send(PASSWORD_PROMPT)
                peer.expect(password)
            peer.send(WELCOME)
            peer.expect(nick)
            peer.send(now_ts() + OK)
            peer.expect("/users")          # the client's quiet /users, for completion
            peer.send(now_ts() + "Users (1): " + nick)
            peer.expect_eof()
        return script

    def test_password_is_never_on_screen_nor_in_the_history(self):
        server = FakeServer(self, self.member_until_the_end("vic", "hunter2 \u00e9t\u00e9"))
        term = PtyClient(self, ["--port", str(server.port)])
        term.read_until(lambda rows: rows[-1] == "password>", "the password prompt")
        term.type("hunter3\x7f2 \u00e9t\u00e9\x1b[D\r")   # a typo, Backspace, an arrow key
        term.read_until(lambda rows: rows[-1] == "nickname>", "the nickname prompt")
        term.type("vic\r")
        term.read_until(lambda rows: rows[-1] == "vic>", "joined")
        term.type("\x1b[A")                                # Up: the nickname, nothing older
        term.read_until(lambda rows: rows[-1] == "vic> vic", "history")
        term.type("\x1b[A")
        term.settle(0.2)
        self.assertEqual(term.rows()[-1], "vic> vic")
        term.type("\x15\x04")                              # Ctrl-U, Ctrl-D: leave
        self.assertEqual(term.wait(), 0)
        self.assertNotIn(b"hunter", term.output)

    def test_trust_on_first_use_asks_remembers_and_then_trusts(self):
        path = os.path.join(tempfile.mkdtemp(dir=self.dir), "sub", "known_servers")
        context = server_tls_context(self.cert, self.key)
        server = FakeServer(self, self.member_until_the_end("tess"), tls=context)
        args = ["--port", str(server.port), "--tls", "--nick", "tess", "--known-servers", path]
        term = PtyClient(self, args)
        term.read_until(lambda rows: rows[-1] == "Trust it? [y/N]", "the question")
        shown = "".join(term.rows()).replace(" ", "")
        self.assertIn(self.fingerprint, shown)
        self.assertIn("TheTLScertificateof127.0.0.1:%disnotknownyet." % server.port, shown)
        term.type("y\r")
        term.read_until(lambda rows: rows[-1] == "tess>", "joined")
        with open(path) as f:
            self.assertEqual(f.read(), "127.0.0.1:%d %s\n" % (server.port, self.fingerprint))
        term.type("\x04")
        self.assertEqual(term.wait(), 0)
        # Known now: a pipe goes straight in.
        server = FakeServer(self, fake_member("tess", ["again"]), tls=context)
        with open(path, "w") as f:
            f.write("127.0.0.1:%d %s\n" % (server.port, self.fingerprint))
        client = PipedClient(server.port, args=["--tls", "--nick", "tess", "--known-servers",
                                                path])
        self.addCleanup(client.kill)
        client.type("again\n")
        self.assertEqual(client.finish()[0], 0)

    def test_not_trusting_exits_1(self):
        path = os.path.join(tempfile.mkdtemp(dir=self.dir), "known_servers")
        context = server_tls_context(self.cert, self.key)
        server = FakeServer(self, lambda peer: peer.expect_eof(), tls=context)
        term = PtyClient(self, ["--port", str(server.port), "--tls", "--known-servers", path])
        term.read_until(lambda rows: rows[-1] == "Trust it? [y/N]", "the question")
        term.type("\r")
        self.assertEqual(term.wait(), 1)
        self.assertEqual([row for row in term.rows() if row][-1],
                         "Not connected: the certificate of 127.0.0.1:%d was not trusted."
                         % server.port)
        self.assertFalse(os.path.exists(path))


# ---------------------------------------------------------------------------------------------
# The shipped files: build.sh's zipapps, run alone from an empty directory.
# ---------------------------------------------------------------------------------------------

def find_python38():
    """A Python 3.8 interpreter, to run the archives on the oldest version supported, if any."""
    import glob
    candidates = [shutil.which("python3.8")]  # (a pyenv shim may refuse to run: probed below)
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8.*/bin/python3.8")))
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


# ---------------------------------------------------------------------------------------------
# Hardening: load, faults and hostile input. Each case is a function with its sizes as parameters:
# the tests below run it small; bench/soak.py runs the same function big and prints its figures.
# ---------------------------------------------------------------------------------------------

CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def proc_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def proc_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def check_clean_line(raw):
    """A line any client receives: valid UTF-8 and no control character but TAB."""
    text = raw.decode("utf-8")  # raises on invalid UTF-8
    if CONTROLS.search(text):
        raise AssertionError("control character in a line sent to a client: %r" % text)
    return text


class Member:
    """One client of a Crowd: a non-blocking socket, its unfinished line, its handler."""
    __slots__ = ("sock", "nick", "tail", "joined", "eof", "handler", "lines", "state", "tail_line")

    def __init__(self, sock, nick):
        self.sock = sock
        self.nick = nick
        self.tail = b""
        self.joined = False
        self.eof = False
        self.handler = None   # called with (member, bytes of complete lines)
        self.lines = None     # where the default handler keeps lines, when asked to
        self.state = None     # whatever a case needs
        self.tail_line = b""  # the last complete line, where a case asks for it


class Crowd:
    """Many clients on raw sockets in one selectors loop: the load cases' test clients."""

    def __init__(self, port, nicks, rcvbuf=None):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.members = []
        for nick in nicks:
            self.add(nick, rcvbuf)
        self.pump_until(lambda: all(m.joined for m in self.members), "everyone to join")

    def add(self, nick, rcvbuf=None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        member = Member(sock, nick)
        self.selector.register(sock, selectors.EVENT_READ, member)
        self.members.append(member)
        if nick is not None:
            sock.send(nick.encode() + b"\n")
        return member

    def close(self):
        for m in self.members:
            m.sock.close()
        self.selector.close()

    def pump(self, timeout):
        """Read what is there (waiting up to ``timeout``); hand complete lines to handlers."""
        for key, _ in self.selector.select(timeout):
            member = key.data
            try:
                data = member.sock.recv(262144)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                member.eof = True  # and close, as nc or chat_client would
                self.selector.unregister(member.sock)
                member.sock.close()
                continue
            buf = member.tail + data if member.tail else data
            cut = buf.rfind(b"\n") + 1
            member.tail = buf[cut:]
            if cut:
                chunk = buf[:cut]
                if not member.joined and b": Server: ok!\n" in chunk:
                    member.joined = True
                if member.handler:
                    member.handler(member, chunk)
                elif member.lines is not None:
                    member.lines.extend(chunk.split(b"\n")[:-1])

    def pump_until(self, condition, what, deadline=60.0):
        """Pump until condition() holds; AssertionError after ``deadline`` seconds."""
        end = time.monotonic() + deadline
        while not condition():
            if time.monotonic() > end:
                raise AssertionError("timed out waiting for " + what)
            self.pump(0.05)

    def drain(self, quiet=0.2):
        """Read until nothing has come for ``quiet`` seconds."""
        while self.selector.get_map() and self.selector.select(quiet):
            self.pump(0)


class FuzzLines:
    """Seeded hostile lines (bytes without \\n) and what the protocol says to each."""

    def __init__(self, seed, max_line=4096):
        import random
        self.rng = random.Random(seed)
        self.max_line = max_line

    def line(self):
        rng = self.rng
        kind = rng.random()
        if kind < 0.25:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        elif kind < 0.45:
            pieces = ["héllo", "мир", "🙂", "\x1b[31m", "\x1b]0;title\x07", "\x00", "\t", "\r",
                      "\x7f", "\u009b", " ", "word", "\u202e", "\ufeff"]
            data = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 20))).encode()
        elif kind < 0.60:
            good = "text ünïcode ".encode() * rng.randrange(1, 5)
            cut = rng.randrange(len(good) + 1)
            data = good[:cut] + rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x99",
                                            b"\xed\xa0\x80", b"\xc0\xaf"]) + good[cut:]
        elif kind < 0.70:
            data = rng.choice([b"", b" ", b"\t", b"   \t ", b"\r", b"\x00", b"\x1b", b"\x7f"])
        elif kind < 0.73:
            size = rng.choice([self.max_line - 1, self.max_line, self.max_line + 1,
                               rng.randrange(self.max_line + 2, self.max_line * 3)])
            data = bytes(rng.randrange(32, 127) for _ in range(size))
        else:
            data = ("message %d" % rng.randrange(10 ** 6)).encode()
        data = data.replace(b"\n", b" ")
        if rng.random() < 0.2:
            data += b"\r"  # a telnet line end
        return data

    def junk_nick(self):
        """A nickname attempt that is certainly refused, and never a valid one."""
        choice = self.rng.random()
        if choice < 0.4:
            return self.line().replace(b"\r", b"") + b" !"
        if choice < 0.7:
            return b"x" * self.rng.randrange(33, 60)  # letters only, too long
        return self.rng.choice([b"", b"  ", b"bad nick", b"\x1b[2Jevil", b"a-b", b"\xff\xfe"])

    def replies(self, data, nick):
        """What the protocol answers ``data`` from a client joined as ``nick`` (None: not yet
        joined): (lines to the sender after '{ts}: ', line the others see or None)."""
        if data.endswith(b"\r"):
            data = data[:-1]
        if len(data) > self.max_line:
            return [too_long_line(self.max_line)], None
        text = data.decode("utf-8", "replace")
        if nick is None:
            attempt = text.strip()
            shown = CONTROLS.sub("", attempt)
            if not attempt.isalnum():
                return [invalid_nick(shown)], None
            if len(attempt) > 32:
                return [too_long_nick(shown[:32])], None
            return [OK], None
        message = CONTROLS.sub("", text)
        if not message.strip():
            return [NOTHING], None
        return [OK, "YOU SEND USERS " + message], "%s sent %s" % (nick, message)


def fuzz_case(port, clients=4, lines_per_client=2500, seed=7):
    """Case 1: seeded hostile input from several clients, before and after joining, split at
    random byte boundaries. Every client gets exactly the protocol's answers; a watching client
    gets only clean lines, every other client's messages in order."""
    import random
    rng = random.Random(seed)
    crowd = Crowd(port, ["watcher"])
    watcher = crowd.members[0]
    watcher.lines = []
    try:
        expected = {}
        counts = {}
        for i in range(clients):
            fuzz = FuzzLines(seed * 1000 + i)
            nick = "fuzz%d" % i
            script, answers, seen = [], [], ["%s connected!" % nick]
            for _ in range(rng.randrange(3, 12)):
                attempt = fuzz.junk_nick()
                script.append(attempt)
                answers += fuzz.replies(attempt, None)[0]
            script.append(nick.encode())
            answers.append(OK)
            for _ in range(lines_per_client):
                data = fuzz.line()
                script.append(data)
                mine, theirs = fuzz.replies(data, nick)
                answers += mine
                if theirs:
                    seen.append(theirs)
            member = crowd.add(None)
            member.lines = []
            member.state = b"\n".join(script) + b"\n"
            expected[member] = (nick, answers, seen)
            counts[member] = len(script)
        # Send every client's bytes in random-sized pieces, interleaved, while reading.
        sending = list(expected)
        while sending:
            member = rng.choice(sending)
            piece = member.state[:rng.randrange(1, 3000)]
            try:
                sent = member.sock.send(piece)
            except BlockingIOError:
                sent = 0
            member.state = member.state[sent:]
            if not member.state:
                sending.remove(member)
            crowd.pump(0)
        total = sum(len(a) for _, a, _ in expected.values())
        inputs = sum(script_lines for script_lines in counts.values())
        crowd.pump_until(lambda: all(len(m.lines) >= 1 + len(expected[m][1]) for m in expected)
                         and len(watcher.lines) >= sum(len(s) for _, _, s in expected.values()),
                         "every answer", deadline=120)
        crowd.drain()
        for member, (nick, answers, seen) in expected.items():
            got = [check_clean_line(l) for l in member.lines]
            if got[0] != WELCOME:
                raise AssertionError("%s: first line %r" % (nick, got[0]))
            others = re.compile(r"^(fuzz\d+|watcher) ")  # what the other members did
            got = [t for t in (split_ts(l)[1] for l in got[1:]) if not others.match(t)]
            if got != answers:
                first = next(i for i, (a, b) in enumerate(zip(got + [None] * len(answers),
                                                                answers)) if a != b)
                raise AssertionError("%s: answer %d is %r, the protocol says %r"
                                     % (nick, first, got[first:first + 1], answers[first]))
        watched = [split_ts(check_clean_line(l))[1] for l in watcher.lines]
        for member, (nick, answers, seen) in expected.items():
            mine = [t for t in watched if t.startswith(nick + " ")]
            if mine != seen:
                raise AssertionError("the watcher's lines from %s differ from what was sent" % nick)
        return {"clients": clients, "lines_sent": inputs, "answers_checked": total,
                "watcher_lines": len(watched)}
    finally:
        crowd.close()


def exactly_once_case(port, clients=20, messages=300):
    """Case 4: every client pipelines sequence-numbered messages all at once; every client
    receives every other's exactly once and in order. Counted in full."""
    nicks = ["seq%d" % i for i in range(clients)]
    crowd = Crowd(port, nicks)
    try:
        crowd.drain()  # the "connected!" lines of the later joiners
        index = {("%s sent " % n).encode(): i for i, n in enumerate(nicks)}
        pattern = re.compile(rb": (seq\d+ sent )(\d+)\n")

        def on_lines(member, chunk):
            expected_next = member.state
            for head, number in pattern.findall(chunk):
                sender = index[head]
                if int(number) != expected_next[sender]:
                    raise AssertionError("%s got %s%s, expected %d" % (
                        member.nick, head.decode(), number.decode(), expected_next[sender]))
                expected_next[sender] += 1
        for member in crowd.members:
            member.state = [0] * clients
            member.handler = on_lines
            member.state[nicks.index(member.nick)] = messages  # its own: none expected
        payloads = {m: b"".join(b"%d\n" % i for i in range(messages)) for m in crowd.members}
        while payloads:
            for member in list(payloads):
                try:
                    sent = member.sock.send(payloads[member])
                except BlockingIOError:
                    sent = 0
                payloads[member] = payloads[member][sent:]
                if not payloads[member]:
                    del payloads[member]
            crowd.pump(0.001)
        crowd.pump_until(lambda: all(all(n == messages for n in m.state) for m in crowd.members),
                         "every message everywhere", deadline=300)
        crowd.drain()
        return {"clients": clients, "messages_each": messages,
                "deliveries_checked": clients * (clients - 1) * messages}
    finally:
        crowd.close()


class ClosedLoop:
    """Each member keeps one message in flight; its echo's return times the round trip."""

    def __init__(self, crowd, message=b"x" * 60 + b"\n", watch_for=None):
        self.crowd = crowd
        self.message = message
        self.latencies = []
        self.watch_for = watch_for    # bytes whose arrival at a member is noted in .seen
        self.seen = set()
        self.sending = True
        for member in crowd.members:
            member.handler = self.on_lines
            member.state = deque()

    def start(self):
        now = time.perf_counter()
        for member in self.crowd.members:
            self._send(member, 1, now)

    def _send(self, member, count, now):
        try:
            member.sock.send(self.message * count)
            member.state.extend([now] * count)
        except OSError:
            pass  # the server is going away; the case checks what the member saw

    def on_lines(self, member, chunk):
        now = time.perf_counter()
        if self.watch_for and self.watch_for in chunk:
            self.seen.add(member)
        echoes = chunk.count(b": YOU SEND USERS ")
        for _ in range(echoes):
            self.latencies.append(now - member.state.popleft())
        if echoes and self.sending:
            self._send(member, echoes, now)
        member.tail_line = chunk.rsplit(b"\n", 2)[-2]





def p99(values):
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)] if ordered else 0.0


def slow_reader_case(server, talkers=50, send_queue=1024 * 1024, p99_limit=0.05):
    """Case 2: one client stops reading while the others chat at full speed: it is cut off once
    its queue passes the limit, the others see it leave, memory stays bounded and the others'
    round trip stays short."""
    pid = server.proc.pid
    baseline = proc_rss(pid)
    stuck = LineSocket(server.port, rcvbuf=4096).join("stuck")
    crowd = Crowd(server.port, ["talk%d" % i for i in range(talkers)])
    try:
        crowd.drain()
        loop = ClosedLoop(crowd, message=b"y" * 200 + b"\n", watch_for=b": stuck disconnected!\n")
        peak = baseline
        started = time.perf_counter()
        loop.start()
        end = time.monotonic() + 120
        while len(loop.seen) < talkers:
            crowd.pump(0.05)
            peak = max(peak, proc_rss(pid))
            if time.monotonic() > end:
                raise AssertionError("the stuck reader was never disconnected")
        cut_off_after = time.perf_counter() - started
        loop.sending = False
        crowd.drain()
        growth = peak - baseline
        if growth > 2 * send_queue + 20 * 2 ** 20:
            raise AssertionError("server RSS grew by %d bytes" % growth)
        if p99(loop.latencies) > p99_limit:
            raise AssertionError("others' p99 round trip %.1f ms" % (p99(loop.latencies) * 1000))
        return {"talkers": talkers, "cut_off_after_s": round(cut_off_after, 2),
                "messages": len(loop.latencies), "rss_growth_mib": round(growth / 2 ** 20, 1),
                "rtt_p99_ms": round(p99(loop.latencies) * 1000, 2)}
    finally:
        stuck.close()
        crowd.close()


def flood_case(server, stream_lines=400000, send_queue=1024 * 1024):
    """Case 3: a sender that never reads its echoes is slowed by TCP, not disconnected; memory
    stays bounded; once it reads again it receives everything, and so did a watcher."""
    pid = server.proc.pid
    baseline = proc_rss(pid)
    crowd = Crowd(server.port, ["flooder", "watcher"], rcvbuf=4096)
    flooder, watcher = crowd.members
    try:
        crowd.drain()
        crowd.selector.unregister(flooder.sock)  # the flooder stops reading
        watcher.state = [0]
        pattern = re.compile(rb": flooder sent flood (\d+)\n")

        def watch(member, chunk):
            for number in pattern.findall(chunk):
                if int(number) != member.state[0]:
                    raise AssertionError("watcher got %s, expected %d" % (number, member.state[0]))
                member.state[0] += 1
        watcher.handler = watch
        stream = b"".join(b"flood %d\n" % i for i in range(stream_lines))
        offset, stalled_since, peak = 0, None, baseline
        while True:
            try:
                offset += flooder.sock.send(stream[offset:offset + 65536])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
            crowd.pump(0.001)
            peak = max(peak, proc_rss(pid))
            if offset >= len(stream):
                raise AssertionError("TCP never pushed back")
        growth = peak - baseline
        if growth > 2 * send_queue + 20 * 2 ** 20:
            raise AssertionError("server RSS grew by %d bytes" % growth)
        # Finish the last line, then read again: every echo arrives, none is lost.
        complete = stream.count(b"\n", 0, offset) + (0 if stream[offset - 1:offset] == b"\n"
                                                      else 1)
        rest = stream[offset:stream.index(b"\n", offset) + 1] if stream[offset - 1:offset] != b"\n" \
            else b""
        flooder.lines = []
        flooder.state = [0]

        def count_echoes(member, chunk):
            member.state[0] += chunk.count(b": YOU SEND USERS flood ")
            if b"disconnected" in chunk and b"flooder" in chunk:
                raise AssertionError("the flooder was disconnected")
        flooder.handler = count_echoes
        crowd.selector.register(flooder.sock, selectors.EVENT_READ, flooder)
        while rest:
            try:
                rest = rest[flooder.sock.send(rest):]
            except BlockingIOError:
                pass
            crowd.pump(0.01)
        crowd.pump_until(lambda: flooder.state[0] == complete and watcher.state[0] == complete,
                         "every flood line echoed and watched", deadline=120)
        if flooder.eof:
            raise AssertionError("the flooder was disconnected")
        return {"lines_before_pushback": complete, "rss_growth_mib": round(growth / 2 ** 20, 1)}
    finally:
        crowd.close()


KILLED_CHILD = r"""
import socket, sys, time
port, count, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"%s%d\n" % (prefix.encode(), i))
    socks.append(s)
for s in socks:
    buf = b""
    while b": Server: ok!\n" not in buf:
        buf += s.recv(65536)
    s.sendall(b"half a li")
print("ready", flush=True)
time.sleep(600)
"""


def abrupt_ends_case(server, each=50):
    """Case 5: clients that reset, that are killed mid-line, that half-close: one
    "disconnected!" each, every nickname free again, descriptors back to the baseline."""
    pid = server.proc.pid
    watch = Crowd(server.port, ["watcher"])
    watcher = watch.members[0]
    watcher.lines = []
    try:
        watch.drain()
        baseline_fds = proc_fds(pid)
        nicks = []
        # Reset: SO_LINGER 0 makes close() send RST.
        resets = Crowd(server.port, ["rst%d" % i for i in range(each)])
        for m in resets.members:
            m.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            m.sock.send(b"half a li")
        resets.close()
        nicks += ["rst%d" % i for i in range(each)]
        # Killed mid-line: a child process holding the sockets gets SIGKILL.
        child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(server.port), str(each),
                                  "kill"], stdout=subprocess.PIPE)
        try:
            if child.stdout.readline() != b"ready\n":
                raise AssertionError("the child did not join")
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        nicks += ["kill%d" % i for i in range(each)]
        # Half-close: a partial line, then FIN; the server closes after its last lines.
        halves = Crowd(server.port, ["half%d" % i for i in range(each)])
        for m in halves.members:
            m.sock.send(b"half a li")
            m.sock.shutdown(socket.SHUT_WR)
        halves.pump_until(lambda: all(m.eof for m in halves.members), "the server to close")
        halves.close()
        nicks += ["half%d" % i for i in range(each)]
        expected = sorted("%s disconnected!" % n for n in nicks)

        def departures():
            texts = [split_ts(check_clean_line(l))[1] for l in watcher.lines]
            return sorted(t for t in texts if t.endswith(" disconnected!"))
        watch.pump_until(lambda: len(departures()) >= len(expected), "every departure")
        watch.drain()
        if departures() != expected:
            raise AssertionError("departures seen: %d, expected %d, once each"
                                 % (len(departures()), len(expected)))
        if any(b" sent half a li" in l for l in watcher.lines):
            raise AssertionError("an unfinished line was delivered")
        # Every nickname is free again.
        again = Crowd(server.port, nicks)
        again.close()
        wait_until(lambda: proc_fds(pid) <= baseline_fds, "descriptors back to the baseline",
                   deadline=30)
        return {"clients": len(nicks), "fds_after": proc_fds(pid), "fds_baseline": baseline_fds}
    finally:
        watch.close()


def limit_descriptors(limit):
    def set_limit():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return set_limit


def descriptor_case(test, attempts=200, limit=64):
    """Case 6: a server with few descriptors keeps serving its members, answers the rest
    ("full") without a busy loop, and accepts again once descriptors free up."""
    server = start_server(test, preexec_fn=limit_descriptors(limit))
    pid = server.proc.pid
    members = Crowd(server.port, ["fd%d" % i for i in range(5)])
    extras = Crowd(server.port, [])
    try:
        members.drain()
        for _ in range(attempts):
            extras.add(None).lines = []
        # Saturated: nobody reads the extras. The server must not spin meanwhile.
        cpu0, t0 = proc_cpu(pid), time.monotonic()
        members.members[0].sock.send(b"still served\n")
        others = members.members[1:]
        for m in others:
            m.lines = []
        members.pump_until(lambda: all(any(b"fd0 sent still served" in l for l in m.lines)
                                       for m in others), "the members to be served")
        while time.monotonic() - t0 < 1.0:
            members.pump(0.1)
        busy = (proc_cpu(pid) - cpu0) / (time.monotonic() - t0)
        if busy > 0.5:
            raise AssertionError("server used %.0f%% CPU while saturated" % (busy * 100))

        # Now read the extras: each is welcomed or told the chat is full, then closed.
        def answered():
            for m in extras.members:
                if m.eof:
                    m.sock.close()  # closing twice is harmless; it frees the server's side
            return all(m.lines and (m.lines[0] == WELCOME.encode() or m.eof)
                       for m in extras.members)
        extras.pump_until(answered, "every attempt answered", deadline=60)
        full = [m for m in extras.members if m.lines[0] != WELCOME.encode()]
        for m in full:
            if [split_ts(l.decode())[1] for l in m.lines] != [FULL]:
                raise AssertionError("a refused attempt got %r" % m.lines)
        welcomed = len(extras.members) - len(full)
        # Free descriptors: a newcomer is accepted again.
        extras.close()
        extras = Crowd(server.port, [])

        def newcomer_joins():
            newcomer = LineSocket(server.port)
            try:
                first = newcomer.line()
                if first != WELCOME:
                    return False  # still full: the server has not seen the closes yet
                newcomer.send("again\n")
                return newcomer.said() == OK
            finally:
                newcomer.close()
        wait_until(newcomer_joins, "a newcomer to be accepted again", interval=0.05)
        return {"attempts": attempts, "welcomed": welcomed, "told_full": len(full),
                "cpu_while_saturated": round(busy, 3)}
    finally:
        members.close()
        extras.close()


def sigterm_under_load_case(server, clients=100):
    """Case 8: SIGTERM while everyone chats: each client gets the notice as its last line,
    then EOF; the server exits 0 within 2 s."""
    crowd = Crowd(server.port, ["load%d" % i for i in range(clients)])
    try:
        crowd.drain()
        loop = ClosedLoop(crowd)
        loop.start()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            crowd.pump(0.05)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        crowd.pump_until(lambda: all(m.eof for m in crowd.members), "every client's EOF",
                         deadline=30)
        status = server.proc.wait(30)
        took = time.monotonic() - signalled
        last = [split_ts(m.tail_line.decode())[1] for m in crowd.members]
        if last != [SHUTTING_DOWN] * clients:
            raise AssertionError("last lines: %r" % sorted(set(last)))
        if status != 0 or took > 2.0:
            raise AssertionError("exit %s after %.2f s" % (status, took))
        return {"clients": clients, "exit_after_s": round(took, 2)}
    finally:
        crowd.close()


def join_timeout_case(server, silent=200):
    """Case 9: connections that never choose a nickname are closed after the timeout with the
    notice; the members chatting meanwhile notice nothing."""
    crowd = Crowd(server.port, ["ann", "ben"])
    ann, ben = crowd.members
    try:
        crowd.drain()
        ann.lines, ben.lines = [], []
        mute = [crowd.add(None) for _ in range(silent)]
        for m in mute:
            m.lines = []
        count = 0
        while not all(m.eof for m in mute):
            ann.sock.send(b"during %d\n" % count)
            count += 1
            crowd.pump_until(lambda: len(ben.lines) >= count, "ben to get ann's line")
            crowd.pump(0.05)
            if count > 5000:
                raise AssertionError("the silent connections were never closed")
        crowd.drain()
        for m in mute:
            if [l.decode() for l in m.lines[:1]] != [WELCOME] or \
                    [split_ts(l.decode())[1] for l in m.lines[1:]] != [JOIN_TIMEOUT]:
                raise AssertionError("a silent connection got %r" % m.lines)
        if [split_ts(l.decode())[1] for l in ben.lines] != \
                ["ann sent during %d" % i for i in range(count)]:
            raise AssertionError("ben saw more than ann's lines")
        echoes = []
        for i in range(count):
            echoes += [OK, "YOU SEND USERS during %d" % i]
        if [split_ts(l.decode())[1] for l in ann.lines] != echoes:
            raise AssertionError("ann saw more than her echoes")
        return {"silent": silent, "messages_meanwhile": count}
    finally:
        crowd.close()


class HardeningTests(unittest.TestCase):
    """Quick versions of the hardening cases (bench/soak.py runs them big)."""

    def test_fuzz_every_line_answered_as_the_protocol_says(self):
        server = start_server(self)
        figures = fuzz_case(server.port, clients=4, lines_per_client=2500)
        self.assertGreaterEqual(figures["lines_sent"], 10000)
        self.assertIsNone(server.proc.poll())

    def test_exactly_once_in_order(self):
        server = start_server(self)
        exactly_once_case(server.port, clients=20, messages=300)

    def test_slow_reader_is_cut_off_memory_bounded(self):
        server = start_server(self)
        # A generous round-trip bound here: it catches a stalled loop, not a slow machine.
        slow_reader_case(server, talkers=20, p99_limit=0.5)

    def test_flood_sender_is_slowed_not_disconnected(self):
        server = start_server(self)
        flood_case(server)

    def test_abrupt_ends(self):
        server = start_server(self)
        abrupt_ends_case(server, each=40)

    def test_descriptor_exhaustion(self):
        descriptor_case(self, attempts=150, limit=64)

    def test_sigterm_under_load(self):
        server = start_server(self)
        sigterm_under_load_case(server, clients=100)

    def test_join_timeout_for_many(self):
        server = start_server(self, "--join-timeout", "1")
        join_timeout_case(server, silent=200)


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
