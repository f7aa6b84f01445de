#!/usr/bin/env python3
"""Console chat server: one thread, one non-blocking selectors loop, a line protocol.

The protocol is ../shared/PROTOCOL.md (summarised in README.md). The file has three layers:

* the protocol's lines, spelled once (``Lines``);
* ``Chat``, the room: bytes of one line in, queued bytes for each member out. It never touches a
  socket (the shape of h11), so its rules are testable without a network;
* ``Server``, the loop: accepts, reads, frames lines, flushes every connection with new output once
  per turn just before it sleeps in ``select`` (the shape of Redis's beforeSleep), and enforces the
  limits.

Standard library only, Python 3.8 or newer: this file is zipped alone into chat_server.pyz.
"""

import argparse
import errno
import functools
import heapq
import os
import re
import selectors
import signal
import socket
import sys
import time

VERSION = "1.0.0"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_CLIENTS = 10000
# select() handles at most FD_SETSIZE sockets: 512 in Windows builds of Python, 1024 on POSIX.
SELECT_MAX_CLIENTS = 500
DEFAULT_MAX_LINE_BYTES = 4096
DEFAULT_MAX_SEND_QUEUE = 1024 * 1024
DEFAULT_JOIN_TIMEOUT = 60.0
MAX_NICK_CHARS = 32

READ_SIZE = 64 * 1024
LINES_PER_TURN = 1024      # lines handled per loop turn, shared fairly by the connections ready
ACCEPTS_PER_TURN = 512     # so a join storm cannot starve the members already chatting
LINGER_SECONDS = 2.0       # a closing socket drains its peer's input so close() sends FIN, not RST
SHUTDOWN_GRACE = 1.5       # how long queued output may take to leave when the server stops
EMFILE_PAUSE = 0.25        # out of descriptors: stop accepting this long, instead of spinning
FD_RESERVE = 24            # descriptors kept for the listener, log, selector and "full" answers
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
SYSLOG_IDENT = "chat_server"
SYSLOG_RETRY_SECONDS = 1.0


class Lines:
    """Every line of the protocol, spelled once. Strings marked seed are kept to the letter."""
    WELCOME = "Wellcome! Please enter your nickname"  # seed, sent without a timestamp
    NICK_INVALID = ('Your nickname must contain only letters and numbers, at least one character.'
                    ' "{nick}" is an incorrect nickname.')  # seed
    NICK_TOO_LONG = 'Your nickname must be at most {max} characters. "{nick}..." is too long.'
    NICK_BUSY = '"{nick}" is already busy.'  # seed
    OK = "Server: ok!"  # seed
    CONNECTED = "{nick} connected!"  # seed
    NOTHING = "Sorry! You send nothing."  # seed
    ECHO = "YOU SEND USERS {message}"  # seed
    SENT = "{nick} sent {message}"  # seed
    ALONE = "Server: there are no other users!"  # seed
    DISCONNECTED = "{nick} disconnected!"  # seed
    TOO_LONG = "Sorry! Your message is too long (more than {limit} bytes)."
    FULL = "Sorry! The chat is full."
    JOIN_TIMEOUT = "Sorry! You took too long to choose a nickname."
    SHUTTING_DOWN = "Server is shutting down."
    # standard output
    LISTENING = "Listening on {address}"
    READY = "Server is ready for work!"  # seed
    STOPPED = "Server stopped."


# C0 controls except TAB, DEL and C1 controls: removed so that no client can put terminal escape
# sequences on another's screen. A regex, because its C loop costs almost nothing on clean text.
CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


# without_controls(text): the text with those characters removed (a C-level partial: hot path).
without_controls = functools.partial(CONTROL_CHARS.sub, "")


class Clock:
    """The ``{ts}: `` prefix, local time to the minute, recomputed only when the minute changes."""

    def __init__(self, now=time.time):
        self._now = now
        self._minute = None
        self._prefix = ""
        self._prefix_bytes = b""

    def prefix(self):
        minute = int(self._now() // 60)
        if minute != self._minute:
            self._minute = minute
            self._prefix = time.strftime("%Y-%m-%d %H:%M: ", time.localtime(minute * 60))
            self._prefix_bytes = self._prefix.encode()
        return self._prefix

    def prefix_bytes(self):
        self.prefix()
        return self._prefix_bytes


class Peer:
    """What the room knows of a connection: its nickname and its queue of bytes to send."""
    __slots__ = ("nick", "sent_head", "out", "append", "out_bytes", "counted", "pending")

    def __init__(self):
        self.nick = None        # set once a nickname is accepted
        self.sent_head = b""    # "{nick} sent " encoded once, for every message this peer sends
        self.out = []           # bytes objects not yet handed to the kernel (never replaced:
        self.append = self.out.append   # a broadcast calls this bound method, nothing else)
        self.out_bytes = 0      # the size of out[:counted]; the rest is counted when needed
        self.counted = 0
        self.pending = False    # already listed in Chat.pending

    def queued_bytes(self):
        """Bytes waiting in ``out``. Appends are counted here, lazily, so that a broadcast costs
        one call per recipient."""
        out = self.out
        if len(out) > self.counted:
            self.out_bytes += sum(map(len, out[self.counted:]))
            self.counted = len(out)
        return self.out_bytes


class Chat:
    """The room. Decides which line goes to whom; never touches a socket.

    Output is appended to each peer's ``out`` queue; ``take_pending()`` lists the peers with new
    output, and whoever owns the sockets writes them out (the Server does it once per loop turn).
    ``log`` takes each logged line as the exact bytes the members received.
    """

    # The hot lines, cut from their templates once: "{nick} sent " + message, and so on.
    SENT_HEAD, SENT_TAIL = Lines.SENT.split("{message}")
    ECHO_HEAD, ECHO_TAIL = Lines.ECHO.split("{message}")
    SENT_END = (SENT_TAIL + "\n").encode()
    ECHO_START = (Lines.OK + "\n").encode()
    ECHO_MIDDLE = ECHO_HEAD.encode()
    ECHO_END = (ECHO_TAIL + "\n").encode()

    def __init__(self, log, clock=None, max_nick=MAX_NICK_CHARS):
        self.log = log
        self.clock = clock or Clock()
        self.max_nick = max_nick
        self.members = {}       # casefolded nickname -> Peer, in order of joining
        # Peer -> its out.append, for every member: the broadcast loop iterates these bound
        # methods directly (24 ns a recipient, against 35 ns through members' attributes).
        self._appends = {}
        self.pending = []       # peers given a private line since the last take_pending()
        self._broadcasted = False   # every member has new output since the last take_pending()

    # -- delivery -------------------------------------------------------------------------------
    def deliver(self, peer, data):
        peer.out.append(data)
        if not peer.pending:
            peer.pending = True
            self.pending.append(peer)

    def to_members(self, data):
        """One encoded line, the same bytes object, to every member: the fan-out, so nothing but
        one call per recipient. Who has new output is worked out once per turn instead."""
        for append in self._appends.values():
            append(data)
        self._broadcasted = True

    def take_pending(self):
        """The peers with output queued since the last call, each once."""
        pending, self.pending = self.pending, []
        if self._broadcasted:
            self._broadcasted = False
            for peer in self.members.values():
                if not peer.pending:
                    peer.pending = True
                    pending.append(peer)
        return pending

    def notice(self, peer, text):
        self.deliver(peer, (self.clock.prefix() + text + "\n").encode())

    # -- what a connection does -----------------------------------------------------------------
    def greet(self, peer):
        self.deliver(peer, (Lines.WELCOME + "\n").encode())

    def receive(self, peer, line):
        """One complete line from ``peer`` (bytes, without the line ending)."""
        text = line.decode("utf-8", "replace")
        if peer.nick is None:
            self.try_nickname(peer, text)
        else:
            self.say(peer, text)

    def line_too_long(self, peer, limit):
        self.notice(peer, Lines.TOO_LONG.format(limit=limit))

    def try_nickname(self, peer, text):
        nick = text.strip()
        shown = without_controls(nick)
        if not nick.isalnum():
            self.notice(peer, Lines.NICK_INVALID.format(nick=shown))
        elif len(nick) > self.max_nick:
            self.notice(peer, Lines.NICK_TOO_LONG.format(max=self.max_nick,
                                                         nick=shown[:self.max_nick]))
        elif nick.casefold() in self.members:
            self.notice(peer, Lines.NICK_BUSY.format(nick=shown))
        else:
            self.join(peer, nick)

    def join(self, peer, nick):
        peer.nick = nick
        peer.sent_head = self.SENT_HEAD.format(nick=nick).encode()
        prefix = self.clock.prefix()
        self.deliver(peer, (prefix + Lines.OK + "\n").encode())
        announcement = (prefix + Lines.CONNECTED.format(nick=nick) + "\n").encode()
        self.to_members(announcement)  # before joining: the newcomer is not told of itself
        self.members[nick.casefold()] = peer
        self._appends[peer] = peer.append
        self.log(announcement)

    def say(self, peer, text):
        message = without_controls(text)
        if not message.strip():
            self.notice(peer, Lines.NOTHING)
        elif len(self.members) < 2:
            self.notice(peer, Lines.ALONE)
        else:
            ts = self.clock.prefix_bytes()  # one {ts} for the sender's two lines and the others'
            body = message.encode()
            line = ts + peer.sent_head + body + self.SENT_END
            self.to_members(line)
            peer.out.pop()  # the sender's own copy, just appended: it gets the echo instead
            self.deliver(peer, ts + self.ECHO_START + ts + self.ECHO_MIDDLE + body + self.ECHO_END)
            self.log(line)

    def leave(self, peer):
        """``peer`` is gone, for whatever reason. Safe to call for a peer that never joined."""
        if peer.nick is None or self.members.get(peer.nick.casefold()) is not peer:
            return
        del self.members[peer.nick.casefold()]
        del self._appends[peer]
        # A broadcast earlier this turn may have queued lines for it that take_pending() would
        # no longer find among the members: list it now, so they are written before it closes.
        if not peer.pending:
            peer.pending = True
            self.pending.append(peer)
        announcement = (self.clock.prefix() + Lines.DISCONNECTED.format(nick=peer.nick)
                        + "\n").encode()
        self.to_members(announcement)
        self.log(announcement)


# ---------------------------------------------------------------------------------------------
# Logging: the seed's "log successful messages". Each sink takes the delivered line's bytes.
# ---------------------------------------------------------------------------------------------

class FileLog:
    """Appends lines to a file, rotating it at ``max_bytes`` (keeps ``backups`` old files).

    Writes are buffered and flushed once per loop turn, like the sockets."""

    def __init__(self, path, max_bytes=LOG_FILE_MAX_BYTES, backups=LOG_FILE_BACKUPS):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = open(path, "ab")
        self._size = self._file.tell()

    def __call__(self, line):
        self._file.write(line)
        self._size += len(line)
        if self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self):
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = "%s.%d" % (self.path, n)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (self.path, n + 1))
        if self.backups:
            os.replace(self.path, self.path + ".1")
        else:
            os.remove(self.path)
        self._file = open(self.path, "ab")
        self._size = 0

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class StderrLog:
    def __call__(self, line):
        sys.stderr.write(line.decode("utf-8", "replace"))

    def flush(self):
        sys.stderr.flush()

    def close(self):
        pass


class NullLog:
    def __call__(self, line):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class SyslogLog:
    """Sends each line as a datagram to the local syslog socket, facility daemon, level info.

    Never blocks the chat: the socket is non-blocking, a record it cannot take at once is dropped
    and counted, and the count is logged as soon as the socket takes records again."""

    FACILITY_DAEMON = 3
    SEVERITY_INFO = 6
    SEVERITY_WARNING = 4

    def __init__(self, address, ident=SYSLOG_IDENT, now=time.monotonic):
        self.address = address
        self.dropped = 0
        self._full = False      # the socket refused a record this loop turn: don't ask again
        self._now = now
        self._sock = None
        self._retry_at = 0.0
        self._header = self._make_header(self.SEVERITY_INFO, ident)
        self._warning_header = self._make_header(self.SEVERITY_WARNING, ident)
        self._connect()

    def _make_header(self, severity, ident):
        priority = self.FACILITY_DAEMON * 8 + severity
        return ("<%d>%s[%d]: " % (priority, ident, os.getpid())).encode()

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            self._retry_at = self._now() + SYSLOG_RETRY_SECONDS
            return False
        self._sock = sock
        return True

    def _send(self, datagram):
        if self._sock is None and (self._now() < self._retry_at or not self._connect()):
            return False
        try:
            self._sock.send(datagram)
            return True
        except (BlockingIOError, InterruptedError):
            self._full = True  # the daemon is not reading right now
            return False
        except OSError:
            self._sock.close()  # the daemon went away; reconnect later
            self._sock = None
            self._retry_at = self._now() + SYSLOG_RETRY_SECONDS
            return False

    def __call__(self, line):
        if self._full:  # refused already this turn: drop without a failing syscall
            self.dropped += 1
            return
        if self.dropped and not self._report_dropped():
            self.dropped += 1
            return
        if not self._send(self._header + line.rstrip(b"\n")):
            self.dropped += 1

    def _report_dropped(self):
        note = "%d log records were dropped while syslog was not accepting them" % self.dropped
        if self._send(self._warning_header + note.encode()):
            self.dropped = 0
            return True
        return False

    def connected(self):
        return self._sock is not None

    def flush(self):
        self._full = False  # once per loop turn: try the socket again

    def close(self):
        if self._sock is not None:
            self._sock.close()


def platform_name():
    """'windows' or 'posix'. CHAT_PLATFORM=windows lets the tests run the Windows paths on Linux."""
    forced = os.environ.get("CHAT_PLATFORM")
    if forced in ("windows", "posix"):
        return forced
    return "windows" if os.name == "nt" else "posix"


def default_syslog_address():
    for path in ("/dev/log", "/var/run/syslog"):
        if os.path.exists(path):
            return path
    return None


def open_log(mode, log_file, syslog_address, warn):
    """The sink ``--log`` asks for. ``auto``: syslog where its socket answers, else the file."""
    if mode == "auto" and platform_name() == "windows":
        mode = "file"
    elif mode == "auto":
        syslog_address = syslog_address or default_syslog_address()
        if not syslog_address:
            warn("no syslog socket (/dev/log) on this machine; logging to %s" % log_file)
            return FileLog(log_file)
        sink = SyslogLog(syslog_address)
        if sink.connected():
            return sink
        # A socket file left by a stopped daemon: logging there would lose every record.
        warn("the syslog socket %s does not answer; logging to %s" % (syslog_address, log_file))
        return FileLog(log_file)
    if mode == "syslog":
        if not hasattr(socket, "AF_UNIX"):
            raise OSError("syslog logging needs Unix sockets; use --log file")
        address = syslog_address or default_syslog_address() or "/dev/log"
        sink = SyslogLog(address)
        if not sink.connected():
            warn("the syslog socket %s does not answer yet; records are dropped until it does"
                 % address)
        return sink
    if mode == "file":
        return FileLog(log_file)
    if mode == "stderr":
        return StderrLog()
    return NullLog()


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

class Conn(Peer):
    """A connection: the room's Peer plus its socket and the loop's bookkeeping."""
    __slots__ = ("sock", "inbuf", "discarding", "mask", "blocked", "throttled", "in_backlog",
                 "eof", "closing", "lingering", "closed")

    def __init__(self, sock):
        Peer.__init__(self)
        self.sock = sock
        self.inbuf = b""          # received bytes not yet handled as lines
        self.discarding = False   # skipping the rest of an over-long line, up to its \n
        self.mask = 0             # the events the selector watches for this socket now
        self.blocked = False      # the kernel's send buffer is full: wait for EVENT_WRITE
        self.throttled = False    # own output queue above the high-water mark: stop reading
        self.in_backlog = False   # has complete lines waiting for their turn
        self.eof = False          # the peer will send no more
        self.closing = False      # close once the queued output is written
        self.lingering = False    # output written and FIN sent: draining input until EOF
        self.closed = False


class Server:
    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, log=None,
                 max_clients=None, max_line_bytes=DEFAULT_MAX_LINE_BYTES,
                 max_send_queue=DEFAULT_MAX_SEND_QUEUE, join_timeout=DEFAULT_JOIN_TIMEOUT,
                 selector=None):
        self.host = host
        self.port = port
        self.log = log or NullLog()
        self.chat = Chat(self.log)
        if selector is None:
            selector = (selectors.SelectSelector() if platform_name() == "windows"
                        else selectors.DefaultSelector())
        self.selector = selector
        if max_clients is None:
            max_clients = (SELECT_MAX_CLIENTS if isinstance(selector, selectors.SelectSelector)
                           else DEFAULT_MAX_CLIENTS)
        # Each client costs a descriptor: past what the process may open, a newcomer is better
        # told the chat is full than left waiting in the kernel's backlog.
        self.max_clients = min(max_clients, descriptors_for_clients())
        self.max_line_bytes = max_line_bytes
        self.max_send_queue = max_send_queue
        # Reading from a connection stops while its own queue is above high water (it sends but
        # does not read its replies) and resumes below low water: TCP then slows the sender down.
        self.high_water = max(max_send_queue // 4, 1)
        self.low_water = self.high_water // 4
        # While a queue holds fewer items than this it cannot be above high water (an item is at
        # most one line and its prefixes), so the per-line check need not add up its bytes.
        self._throttle_items = max(1, self.high_water // (2 * max_line_bytes + 128))
        self.join_timeout = join_timeout
        self.conns = {}           # socket -> Conn
        self.backlog = []         # Conns with complete lines not yet handled
        self.timers = []          # heap of (when, sequence, action, conn)
        self._timer_seq = 0
        self.listener = None
        self.accept_paused = False
        self.stopping = False
        self._wakeup_r = self._wakeup_w = None

    # -- setup ----------------------------------------------------------------------------------
    def listen(self):
        """Bind and listen; returns the address actually bound (the real port for port 0)."""
        infos = socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
        error = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if os.name == "nt":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(4096)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.setblocking(False)
            self.listener = sock
            self.selector.register(sock, selectors.EVENT_READ, "accept")
            self._install_wakeup()
            return sock.getsockname()[:2]
        raise error

    def _install_wakeup(self):
        """A socket pair the C signal handler writes to, so a signal wakes select() at once."""
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        for sock in (self._wakeup_r, self._wakeup_w):
            sock.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")

    def install_signal_handlers(self):
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame):
        self.stopping = True

    # -- the loop -------------------------------------------------------------------------------
    def serve_forever(self):
        while not self.stopping:
            self.run_once()
        self.shutdown()

    def run_once(self, timeout=None):
        """One loop turn: wait for events, handle them, then write what the turn queued."""
        wait = self._next_wait(timeout)
        for key, events in self.selector.select(wait):
            what = key.data
            if what == "accept":
                self._accept()
            elif what == "wakeup":
                self._drain_wakeup()
            else:
                if events & selectors.EVENT_WRITE:
                    self._write(what)
                if events & selectors.EVENT_READ and not what.closed:
                    self._read(what)
        self._handle_backlog()
        self._run_timers()
        self._flush_pending()
        self.log.flush()

    def _next_wait(self, timeout):
        if self.backlog:
            return 0
        wait = timeout
        if self.timers:
            until = max(self.timers[0][0] - time.monotonic(), 0)
            wait = until if wait is None else min(wait, until)
        return wait

    def _drain_wakeup(self):
        try:
            while self._wakeup_r.recv(512):
                pass
        except OSError:
            pass

    # -- timers ---------------------------------------------------------------------------------
    def _after(self, seconds, action, conn):
        self._timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + seconds, self._timer_seq, action, conn))

    def _run_timers(self):
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, action, conn = heapq.heappop(self.timers)
            action(conn)

    def _join_expired(self, conn):
        if not conn.closed and not conn.closing and conn.nick is None:
            self.chat.notice(conn, Lines.JOIN_TIMEOUT)
            self._close_after_flush(conn)

    def _linger_expired(self, conn):
        self._close(conn)

    def _resume_accepting(self, _):
        if self.accept_paused and self.listener is not None:
            self.accept_paused = False
            self.selector.register(self.listener, selectors.EVENT_READ, "accept")

    # -- accepting ------------------------------------------------------------------------------
    def _accept(self):
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting()
                return  # ECONNABORTED and the like: that one connection is gone
            self._admit(sock)

    def _pause_accepting(self):
        """Out of descriptors: the pending connection stays in the backlog. Stop watching the
        listener (it would report readable forever) until a descriptor frees up or a while."""
        if not self.accept_paused:
            self.accept_paused = True
            self.selector.unregister(self.listener)
            self._after(EMFILE_PAUSE, self._resume_accepting, None)

    def _admit(self, sock):
        sock.setblocking(False)
        tune_socket(sock)
        conn = Conn(sock)
        self.conns[sock] = conn
        self._set_interest(conn)
        if len(self.conns) > self.max_clients:
            self.chat.notice(conn, Lines.FULL)
            self._close_after_flush(conn)
            return
        self.chat.greet(conn)
        if self.join_timeout:
            self._after(self.join_timeout, self._join_expired, conn)

    # -- reading --------------------------------------------------------------------------------
    def _read(self, conn):
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            conn.eof = True
        if conn.lingering or self.stopping:
            # Being closed: its input no longer matters, only that our last lines get out.
            if conn.eof and (conn.lingering or not conn.out):
                self._close(conn)
            else:
                self._set_interest(conn)
            return
        if data:
            conn.inbuf = conn.inbuf + data if conn.inbuf else data
        if not conn.in_backlog:
            conn.in_backlog = True
            self.backlog.append(conn)
        if conn.eof or len(conn.inbuf) >= READ_SIZE:
            self._set_interest(conn)  # stop reading: at its end, or enough is waiting

    def _handle_backlog(self):
        """Handle queued lines, at most about LINES_PER_TURN in all, shared fairly; what is left
        waits for the next turn, so one turn never queues unbounded output before a flush."""
        if not self.backlog:
            return
        ready, self.backlog = self.backlog, []
        share = max(1, LINES_PER_TURN // len(ready))
        for conn in ready:
            conn.in_backlog = False
            if conn.closed or conn.closing:
                continue
            more = self._handle_lines(conn, share)
            if conn.closed or conn.closing:
                continue
            if more and not conn.throttled:
                conn.in_backlog = True
                self.backlog.append(conn)
            elif conn.eof and not more:
                self.chat.leave(conn)
                self._close_after_flush(conn)
            if conn.mask != selectors.EVENT_READ or conn.throttled or conn.eof:
                self._set_interest(conn)  # something changed; else reading simply goes on

    def _handle_lines(self, conn, most):
        """Handle up to ``most`` complete lines of conn's input. True if complete lines remain."""
        parts = conn.inbuf.split(b"\n", most)
        rest = parts.pop()
        limit = self.max_line_bytes
        for i, line in enumerate(parts):
            if conn.discarding:       # the tail of a line already answered as too long
                conn.discarding = False
                continue
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > limit:
                self.chat.line_too_long(conn, limit)
            else:
                self.chat.receive(conn, line)
            if ((conn.blocked or len(conn.out) > self._throttle_items)
                    and conn.queued_bytes() > self.high_water):
                conn.throttled = True
                rest = b"\n".join(parts[i + 1:] + [rest])
                break
        more = b"\n" in rest
        if not more and len(rest) > limit + 1:  # +1: the \r of a \r\n still on its way
            if not conn.discarding:
                self.chat.line_too_long(conn, limit)
                conn.discarding = True
            rest = b""
        conn.inbuf = rest
        return more

    # -- writing --------------------------------------------------------------------------------
    def _flush_pending(self):
        """Write every connection that has new output: one send each (flush-before-sleep).

        A connection whose kernel buffer is full waits for EVENT_WRITE instead; one whose queue
        passed the send-queue limit is disconnected (which may queue more output: loop)."""
        while True:
            batch = self.chat.take_pending()
            if not batch:
                return
            for conn in batch:
                conn.pending = False
                if conn.closed:
                    continue
                if not conn.blocked:
                    self._send(conn)
                    if not conn.out and conn.mask == selectors.EVENT_READ and not (
                            conn.throttled or conn.closing or conn.closed):
                        continue  # all written and nothing changes: the common case
                self._after_send(conn)

    def _write(self, conn):
        self._send(conn)
        if not conn.closed:
            self._after_send(conn)

    def _send(self, conn):
        out = conn.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent == len(data):
            out.clear()
            conn.out_bytes = conn.counted = 0
            conn.blocked = False
        else:
            out[:] = [memoryview(data)[sent:]]
            conn.out_bytes = len(data) - sent
            conn.counted = 1
            conn.blocked = True

    def _after_send(self, conn):
        if conn.closed:
            return
        if conn.queued_bytes() > self.max_send_queue:
            self._close(conn)  # a reader that stopped reading: its queue may not grow forever
            return
        if conn.throttled and conn.queued_bytes() <= self.low_water:
            conn.throttled = False
            if b"\n" in conn.inbuf or conn.eof:
                if not conn.in_backlog:
                    conn.in_backlog = True
                    self.backlog.append(conn)
        if conn.closing and not conn.out:
            self._start_lingering(conn)
        self._set_interest(conn)

    def _set_interest(self, conn):
        """Tell the selector what this connection waits for now; no syscall when unchanged."""
        if conn.closed:
            return
        mask = 0
        if conn.lingering or (not conn.closing and not conn.eof and not conn.throttled
                              and len(conn.inbuf) < READ_SIZE):
            mask |= selectors.EVENT_READ
        if conn.blocked:
            mask |= selectors.EVENT_WRITE
        if mask == conn.mask:
            return
        if conn.mask == 0:
            self.selector.register(conn.sock, mask, conn)
        elif mask == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, mask, conn)
        conn.mask = mask

    # -- closing --------------------------------------------------------------------------------
    def _close_after_flush(self, conn):
        conn.closing = True
        if not conn.out:
            self._start_lingering(conn)
        self._set_interest(conn)

    def _start_lingering(self, conn):
        """All output written: send FIN, then read until the peer closes (or a short while), so
        that close() does not answer unread input with a RST that could destroy our last lines."""
        if conn.lingering:
            return
        conn.lingering = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        if conn.eof:
            self._close(conn)
            return
        self._after(LINGER_SECONDS, self._linger_expired, conn)
        self._set_interest(conn)

    def _close(self, conn):
        """Close one connection now, whatever its state; tell the room if it had joined."""
        if conn.closed:
            return
        conn.closed = True
        if conn.mask:
            self.selector.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()
        del self.conns[conn.sock]
        self.chat.leave(conn)
        if self.accept_paused:
            self._resume_accepting(None)  # a descriptor just came free

    # -- stopping -------------------------------------------------------------------------------
    def shutdown(self, grace=SHUTDOWN_GRACE):
        """Tell every connection, give the output up to ``grace`` seconds to leave, close all."""
        self.stopping = True
        if self.listener is not None:
            if not self.accept_paused:
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
        self.backlog = []
        for conn in list(self.conns.values()):
            if not conn.closing:
                self.chat.notice(conn, Lines.SHUTTING_DOWN)
                self._close_after_flush(conn)
        self.timers = []
        self._after(grace, lambda _: None, None)  # bounds the wait below
        deadline = time.monotonic() + grace
        self._flush_pending()
        while self.conns and time.monotonic() < deadline:
            self.run_once(timeout=max(deadline - time.monotonic(), 0))
        for conn in list(self.conns.values()):
            self._close(conn)
        self.log.flush()

    def close(self):
        for conn in list(self.conns.values()):
            self._close(conn)
        if self.listener is not None:
            self.listener.close()
        for sock in (self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()
        self.selector.close()
        self.log.close()


def tune_socket(sock):
    """Chat lines are small: no Nagle delay. Keepalive finds peers that vanished silently."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        pass  # the connection may already be gone; reading it will tell


def descriptors_for_clients():
    """How many clients the descriptor limit leaves room for (POSIX; unbounded elsewhere)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return sys.maxsize
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(soft - FD_RESERVE, 1)


def raise_fd_limit():
    """Raise the soft limit on open descriptors to the hard one: each client costs one (POSIX)."""
    try:
        import resource
    except ImportError:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


def format_address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0 to 65535")
    return value


def seconds(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def parse_args(argv):
    parser = OneLineParser(
        prog="chat_server",
        description="Console chat server: people join with chat_client, nc or telnet.")
    parser.add_argument("--version", action="version", version="chat_server " + VERSION)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s; IPv6 such as ::1 works)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="TCP port (default %(default)s; 0 picks a free one and prints it)")
    parser.add_argument("--log", choices=("auto", "syslog", "file", "stderr", "off"),
                        default="auto",
                        help="where delivered messages, joins and leaves are logged: auto ="
                             " syslog where /dev/log exists, else the log file (default auto)")
    parser.add_argument("--log-file", default="chat.log", metavar="PATH",
                        help="log file for --log file (default %(default)s; rotates at 10 MiB)")
    parser.add_argument("--syslog-address", metavar="PATH",
                        help="syslog socket (default /dev/log or /var/run/syslog)")
    parser.add_argument("--max-clients", type=positive_int,
                        help="connections held at once (default %d; %d where select() is used)"
                             % (DEFAULT_MAX_CLIENTS, SELECT_MAX_CLIENTS))
    parser.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES,
                        help="longest line accepted, in bytes before the newline"
                             " (default %(default)s)")
    parser.add_argument("--max-send-queue", type=positive_int, default=DEFAULT_MAX_SEND_QUEUE,
                        help="bytes queued for a client that does not read before it is"
                             " disconnected (default %(default)s)")
    parser.add_argument("--join-timeout", type=seconds, default=DEFAULT_JOIN_TIMEOUT,
                        help="seconds to choose a nickname, 0 for no limit (default 60)")
    return parser.parse_args(argv)


def say(line):
    """A line on standard output, flushed at once so a script reading a pipe sees it."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, ValueError):
        pass  # nobody reads our stdout any more; the chat goes on


def warn(message):
    sys.stderr.write("chat_server: %s\n" % message)
    sys.stderr.flush()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    try:
        log = open_log(args.log, args.log_file, args.syslog_address, warn)
    except OSError as exc:
        warn("cannot open the log: %s" % (exc.strerror or exc))
        return 1
    server = Server(args.host, args.port, log, max_clients=args.max_clients,
                    max_line_bytes=args.max_line_bytes, max_send_queue=args.max_send_queue,
                    join_timeout=args.join_timeout)
    try:
        host, port = server.listen()
    except (OSError, UnicodeError) as exc:
        warn("cannot listen on %s: %s" % (format_address(args.host, args.port),
                                          getattr(exc, "strerror", None) or exc))
        server.close()
        return 1
    server.install_signal_handlers()
    say(Lines.LISTENING.format(address=format_address(host, port)))
    say(Lines.READY)
    try:
        server.serve_forever()
    finally:
        server.close()
    say(Lines.STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
