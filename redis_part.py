"""A Redis client for chat_server.py's loop: RESP2 over non-blocking sockets, standard library only.

A staging file: it is pasted into chat_server.py and then deleted, so it imports nothing of the
chat and everything it needs is here. Its parts, in the order they build on each other:

* ``RespParser``: an incremental RESP2 reader (the shape of hiredis's read.c): ``feed(bytes)``,
  then ``gets()`` until it returns ``RESP_INCOMPLETE``. A reply may arrive split over any number
  of reads; nested arrays are filled through a stack, not recursion. An error reply is a
  ``RedisError`` *value*, so the replies of a pipeline can hold one among the others; bytes that
  are not RESP raise ``RespProtocolError``.
* ``encode_command(*args)``: a command as a RESP array of bulk strings.
* ``parse_redis_url(url)`` -> ``RedisAddress``; ``redact_redis_url(url)`` for messages.
* ``RedisConnection``: one connection's life inside the caller's loop, never blocking: connect,
  TLS for rediss://, AUTH, SELECT, then pipelined commands whose callbacks are called in the
  order they were sent, EVALSHA with a transparent NOSCRIPT reload, a deadline per command.
  It talks to the loop only through:
      loop.watch(sock, readable, writable, handler)   # handler(readable_now, writable_now)
      loop.unwatch(sock)
      loop.call_later(seconds, callback) -> handle    # handle.cancel()
      loop.monotonic()
  and its owner calls ``flush()`` once per loop turn, just before the loop sleeps.
* ``RedisLink``: keeps one RedisConnection usable, connecting again with back-off after a loss.

The promise to the owner: every command given to ``send`` or ``evalsha`` ends in exactly one of
two ways: its callback gets its reply, or it is in the list ``on_lost(reason, unanswered)`` hands
over (a ``RedisCommand``, whose ``written`` says whether Redis may have run it). Nothing is
assumed done or undone, and no error of Redis or the network escapes into the loop.
"""

import collections
import errno
import functools
import hashlib
import os
import socket
import urllib.parse

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

REDIS_DEFAULT_PORT = 6379
REDIS_TIMEOUT = 3.0            # seconds a command (or connecting) may take before the link is lost
REDIS_RECONNECT_FIRST = 0.1    # the first wait before connecting again, doubled after each failure
REDIS_RECONNECT_MAX = 2.0      # ...up to this
REDIS_READ_SIZE = 256 * 1024   # one recv(): a big XREAD batch in few system calls
REDIS_READ_BUDGET = 4 * 1024 * 1024  # read per event at most; then the other sockets' turn
RESP_MAX_LINE = 1024 * 1024    # a header, status or error line; garbage without CRLF ends here
RESP_MAX_BULK = 512 * 1024 * 1024  # Redis's own proto-max-bulk-len


# ---------------------------------------------------------------------------------------------
# TLS, imported on first use. The same names as chat_server.py's: drop these when merging.
# ---------------------------------------------------------------------------------------------

ssl = None


class _NotRaised(Exception):
    """Stands for ssl's exceptions in the except clauses until TLS is used."""


# A TLS socket's "try again when it is readable/writable", as distinct from a real error.
TLS_WANTS_READ = TLS_WANTS_WRITE = _NotRaised


def load_ssl():
    """Import ssl for TLS; RuntimeError if this Python has none (some minimal builds)."""
    global ssl, TLS_WANTS_READ, TLS_WANTS_WRITE
    try:
        import ssl as module
    except ImportError:
        raise RuntimeError("rediss:// needs Python's ssl module, which this Python lacks")
    ssl = module
    TLS_WANTS_READ, TLS_WANTS_WRITE = ssl.SSLWantReadError, ssl.SSLWantWriteError
    return ssl


# ---------------------------------------------------------------------------------------------
# RESP2: replies in, commands out
# ---------------------------------------------------------------------------------------------

class RedisError(Exception):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``): a value handed to a
    callback, never raised here, so that a pipeline's replies can hold it among the others.
    ``code`` is its first word, the part meant for programs."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]

    def __repr__(self):
        return "RedisError(%r)" % self.message


class RespProtocolError(Exception):
    """The bytes are not RESP2: the connection can't know which reply is whose any more."""


class _Incomplete:
    def __repr__(self):
        return "RESP_INCOMPLETE"


# What gets() returns until a whole reply is there (None is a reply: the null bulk string).
RESP_INCOMPLETE = _Incomplete()

_RESP_TYPES = b"$*:+-"


class RespParser:
    """Bytes in (``feed``), whole replies out (``gets``), one at a time in arrival order.

    Types: ``+OK`` -> ``"OK"`` (str), ``-ERR x`` -> ``RedisError("ERR x")``, ``:1`` -> ``1``,
    ``$3 abc`` -> ``b"abc"``, ``$-1`` -> ``None``, ``*2 ...`` -> ``[...]``, ``*-1`` -> ``None``.

    The input is kept as one ``bytes`` and an offset into it. Elements of an array are taken off
    the input as soon as each is whole, so what waits for more bytes is at most one element; a
    long bulk string that waits for its end collects the pieces in a list and joins them once it
    is all there. Nothing is copied over and over, however the reply is cut.
    """

    def __init__(self):
        self._buf = b""
        self._pos = 0            # where the next unread byte of _buf is
        self._more = []          # pieces fed since, not yet joined to _buf
        self._more_size = 0
        self._need = 1           # bytes from _pos that the next step needs at least
        self._stack = []         # (items, size) of each array being filled, outermost first
        self._broken = None      # a protocol error: every later gets() raises it again

    def feed(self, data):
        if self._pos == len(self._buf) and not self._more:
            self._buf = bytes(data)
            self._pos = 0
        else:
            self._more.append(bytes(data))
            self._more_size += len(data)

    def gets(self):
        """The next whole reply, or ``RESP_INCOMPLETE``; RespProtocolError on bytes that are not
        RESP (and from then on: after one, the parser's place in the stream is lost)."""
        if self._broken is not None:
            raise RespProtocolError(self._broken)
        if self._more:
            if len(self._buf) - self._pos + self._more_size < self._need:
                return RESP_INCOMPLETE
            self._buf = b"".join([self._buf[self._pos:]] + self._more)
            self._pos = 0
            self._more = []
            self._more_size = 0
        try:
            return self._parse()
        except (RespProtocolError, ValueError) as exc:
            self._broken = "%s (at %r)" % (exc, self._buf[self._pos:self._pos + 40])
            raise RespProtocolError(self._broken)

    def _parse(self):
        buf = self._buf
        end = len(buf)
        pos = self._pos
        stack = self._stack
        find = buf.find
        need = 1
        while pos < end:
            kind = buf[pos]
            line_end = find(b"\r\n", pos)
            if line_end < 0:
                if kind not in _RESP_TYPES:
                    raise RespProtocolError("not a RESP type: %r" % bytes([kind]))
                if end - pos > RESP_MAX_LINE:
                    raise RespProtocolError("a line longer than %d bytes" % RESP_MAX_LINE)
                need = end - pos + 1
                break
            if kind == 36:                                   # $ bulk string
                size = int(buf[pos + 1:line_end])
                if size >= 0:
                    start = line_end + 2
                    stop = start + size
                    if stop + 2 > end:
                        if size > RESP_MAX_BULK:
                            raise RespProtocolError("a bulk string of %d bytes" % size)
                        need = stop + 2 - pos
                        break
                    if buf[stop:stop + 2] != b"\r\n":
                        raise RespProtocolError("a bulk string not followed by CRLF")
                    value = buf[start:stop]
                    pos = stop + 2
                elif size == -1:
                    value = None
                    pos = line_end + 2
                else:
                    raise RespProtocolError("a bulk string of length %d" % size)
            elif kind == 42:                                 # * array
                size = int(buf[pos + 1:line_end])
                pos = line_end + 2
                if size > 0:
                    stack.append(([], size))
                    continue
                if size == 0:
                    value = []
                elif size == -1:
                    value = None
                else:
                    raise RespProtocolError("an array of length %d" % size)
            elif kind == 58:                                 # : integer
                value = int(buf[pos + 1:line_end])
                pos = line_end + 2
            elif kind == 43:                                 # + simple string
                value = buf[pos + 1:line_end].decode("utf-8", "replace")
                pos = line_end + 2
            elif kind == 45:                                 # - error
                value = RedisError(buf[pos + 1:line_end].decode("utf-8", "replace"))
                pos = line_end + 2
            else:
                raise RespProtocolError("not a RESP type: %r" % bytes([kind]))
            # A whole value: it fills its array, which may fill the array around it, and so on.
            while stack:
                items, size = stack[-1]
                items.append(value)
                if len(items) < size:
                    break
                stack.pop()
                value = items
            else:
                self._taken(pos)
                return value
        self._taken(pos)
        self._need = need
        return RESP_INCOMPLETE

    def _taken(self, pos):
        if pos == len(self._buf):
            self._buf = b""      # all read: the next feed() becomes the buffer, uncopied
            self._pos = 0
        else:
            self._pos = pos


def encode_command(*args):
    """``encode_command("SET", "k", 1)`` -> ``b"*3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\n1\\r\\n"``.
    Arguments are str (sent as UTF-8), bytes or int; anything else is a TypeError, rather than
    a guess at how Redis should read it."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, (bytearray, memoryview)):
            data = bytes(arg)
        else:
            raise TypeError("a Redis argument is str, bytes or int, not %s" % type(arg).__name__)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@functools.lru_cache(maxsize=64)
def script_digest(script):
    """(SHA-1 in hex, as EVALSHA names it; the script as bytes). Scripts are the program's
    constants, so the digest is computed once each."""
    body = script.encode("utf-8") if isinstance(script, str) else bytes(script)
    return hashlib.sha1(body).hexdigest(), body


def blocking_seconds(args):
    """How long Redis may rightly keep this command before answering: the BLOCK of an XREAD or
    XREADGROUP, else 0. ValueError for BLOCK 0, which waits for ever: a dead Redis would then
    never be noticed; block for a while and ask again."""
    name = _word(args[0]).upper() if args else ""
    if name not in ("XREAD", "XREADGROUP"):
        return 0.0
    words = [_word(arg).upper() for arg in args]
    if "BLOCK" not in words:
        return 0.0
    milliseconds = int(_word(args[words.index("BLOCK") + 1]))
    if milliseconds <= 0:
        raise ValueError("%s BLOCK %d waits for ever: give it a time, and ask again after it"
                         % (name, milliseconds))
    return milliseconds / 1000.0


def _word(arg):
    return arg.decode("utf-8", "replace") if isinstance(arg, (bytes, bytearray)) else str(arg)


# ---------------------------------------------------------------------------------------------
# Where Redis is: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss:// for TLS
# ---------------------------------------------------------------------------------------------

REDIS_URL_FORM = "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS)"


class RedisAddress:
    """A parsed Redis URL. Its repr and ``shown`` leave the password out: they go into logs."""
    __slots__ = ("tls", "host", "port", "db", "username", "password")

    def __init__(self, tls, host, port, db, username, password):
        self.tls = tls
        self.host = host              # an IPv6 address without its brackets
        self.port = port
        self.db = db
        self.username = username      # None: the default user
        self.password = password      # None: no AUTH

    @property
    def shown(self):
        """The URL without its password: ``rediss://alice@[::1]:6380/2``."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        user = "%s@" % urllib.parse.quote(self.username, safe="") if self.username else ""
        return "%s://%s%s:%d/%d" % ("rediss" if self.tls else "redis", user, host, self.port,
                                    self.db)

    def __repr__(self):
        return "RedisAddress(%s)" % self.shown


def redact_redis_url(url):
    """``url`` fit for a message: without its password, even when it is not a valid URL."""
    try:
        return parse_redis_url(url).shown
    except ValueError:
        return _without_password(url)


def _without_password(url):
    """The text of a URL that did not parse, with *** for what may be its password: whatever
    stands between the user name and the last ``@`` (all of it when there is no colon, as in
    the old redis://PASSWORD@HOST)."""
    scheme, separator, rest = url.rpartition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return "%s%s%s***@%s" % (scheme, separator, user + ":" if colon else "", host)


def parse_redis_url(url):
    """A ``RedisAddress``; ValueError naming what is wrong (and never the password)."""
    scheme, separator, rest = url.partition("://")

    def problem(what):
        return ValueError('"%s" is not a Redis URL: %s. The form is %s'
                          % (_without_password(url), what, REDIS_URL_FORM))
    if not separator:
        raise problem("it does not begin with redis:// or rediss://")
    scheme = scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise problem('its scheme is "%s"' % scheme)
    if "?" in rest or "#" in rest:
        raise problem("it has a ? or # part (a password with ?, # or / is written %3F, %23, %2F)")
    userinfo, at, hostpart = rest.rpartition("@")
    hostport, slash, db_text = hostpart.partition("/")
    if "/" in userinfo:
        raise problem("a password with / is written %2F")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise problem("a user needs a password (USER:PASSWORD@); a password alone is "
                          ":PASSWORD@")
        username = _percent_decoded(user, problem) or None
        password = _percent_decoded(secret, problem)
        if not password:
            raise problem("its password is empty")
    host, port = _host_and_port(hostport, problem)
    if db_text and not (db_text.isdigit() and db_text.isascii()):
        raise problem('its database "%s" is not a number' % db_text)
    return RedisAddress(scheme == "rediss", host, port, int(db_text or 0), username, password)


def _percent_decoded(text, problem):
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise problem("a %-escape in its user or password is not UTF-8")


def _host_and_port(hostport, problem):
    if hostport.startswith("["):
        host, bracket, port_part = hostport[1:].partition("]")
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise problem('"%s" is not an IPv6 address' % host)
        if not bracket or (port_part and not port_part.startswith(":")):
            raise problem("an IPv6 address is written in brackets: [::1]:6379")
        port_text = port_part[1:] if port_part else None
    else:
        if hostport.count(":") > 1:
            raise problem("an IPv6 address is written in brackets: [::1]:6379")
        host, colon, port_text = hostport.partition(":")
        if not colon:
            port_text = None
        if not host:
            raise problem("it names no host")
        if not all(c.isalnum() or c in "-._" for c in host) or not host.isascii():
            raise problem('"%s" is not a host name' % host)
    if port_text is None:
        return host, REDIS_DEFAULT_PORT
    if not (port_text.isdigit() and port_text.isascii()) or not 0 < int(port_text) < 65536:
        raise problem('its port "%s" is not a number from 1 to 65535' % port_text)
    return host, int(port_text)


def resolve_redis_address(address):
    """The socket addresses to try for ``address``: [(family, sockaddr)], IPv6 and IPv4 as the
    system orders them. A host name is looked up here, blocking: call this once, before the loop
    serves (RedisLink does, when it is made). OSError saying what failed."""
    try:
        found = socket.getaddrinfo(address.host, address.port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError("cannot find %s: %s" % (address.shown, exc.strerror))
    unique = []
    for family, _, _, _, sockaddr in found:
        if (family, sockaddr) not in unique:
            unique.append((family, sockaddr))
    return unique


def redis_tls_context(ca_file=None):
    """A client context for rediss://: the server's certificate verified against ``ca_file``
    alone when given, else the system's authorities, and its host name checked."""
    load_ssl()
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# ---------------------------------------------------------------------------------------------
# One connection
# ---------------------------------------------------------------------------------------------

class RedisCommand:
    """A command given to a RedisConnection, until its callback has had its reply. The ones a
    lost connection leaves unanswered are handed to ``on_lost``: ``args`` (what was sent: for a
    script, ``("EVALSHA", sha, numkeys, *keys, *args)``), ``callback``, ``script`` (its text, or
    None), and ``written``: False when no whole copy of it ever left this process, so Redis
    certainly did not run it; True when it may have. ``send_again`` gives it to a new
    connection with the same callback."""
    __slots__ = ("args", "callback", "script", "deadline", "end", "retried", "reply",
                 "answered", "internal", "written")

    def __init__(self, args, callback, script=None, internal=False):
        self.args = args
        self.callback = callback
        self.script = script
        self.internal = internal  # ours (AUTH, SCRIPT LOAD...): never the owner's to see
        self.retried = False      # sent again after NOSCRIPT
        self.answered = False     # its reply is in ``reply``, its callback not yet called
        self.reply = None
        self.deadline = self.end = 0
        self.written = False

    def send_again(self, target):
        """Send this command on ``target`` (a ready RedisConnection or RedisLink)."""
        if self.script is None:
            target.send(self.args, self.callback)
        else:
            count = int(self.args[2])
            target.evalsha(self.script, self.args[3:3 + count], self.args[3 + count:],
                           self.callback)

    def __repr__(self):
        return "RedisCommand(%r)" % (self.args[:4],)


class RedisState:
    """The phases of a connection, in the order it goes through them; CLOSED from any."""
    CONNECTING = "connecting"    # the TCP handshake
    TLS = "tls"                  # the TLS handshake (rediss://)
    STARTING = "starting"        # AUTH, SELECT and PING sent, their replies awaited
    READY = "ready"              # the owner's commands flow
    CLOSED = "closed"


_CONNECT_PENDING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EINTR)


class RedisConnection:
    """One connection to Redis inside the caller's loop, from connecting to closed. It never
    connects again: RedisLink makes a new one for that.

    ``on_ready()`` is called once the connection is usable (AUTH, SELECT and a PING answered);
    ``on_lost(reason, unanswered)`` once when it ends by itself: ``reason`` is a sentence for a
    person ("redis://127.0.0.1:6379/0 did not answer within 3 s"), ``unanswered`` the
    RedisCommands whose callbacks were not called, in the order they were sent. A command Redis
    has not answered within ``timeout`` seconds (an XREAD BLOCK: its block time more) ends the
    connection: a late reply could no longer be matched to its command with certainty.
    Callbacks are called from the loop's events and timers, not from inside the owner's calls
    (but see close). An exception raised by one of the owner's callbacks closes the connection
    (``on_lost`` says so) and goes on up to the loop: a bug is not a Redis problem to hide.
    """

    def __init__(self, loop, address, sockaddrs, on_ready, on_lost, timeout=REDIS_TIMEOUT,
                 tls_context=None):
        self._loop = loop
        self.address = address
        self._sockaddrs = list(sockaddrs)
        self._on_ready = on_ready
        self._on_lost = on_lost
        self.timeout = timeout
        self._tls_context = tls_context
        self.state = RedisState.CONNECTING
        self._sock = None
        self._interest = None        # (readable, writable) the loop watches for
        self._connect_error = None
        self._ready_deadline = 0.0
        self._timer = None
        self._parser = RespParser()
        self._out = []               # encoded commands not yet given to send()
        self._unsent = b""           # what a send() left over, to be sent first
        self._write_blocked = False  # waiting for the socket to be writable
        self._read_wants_write = self._write_wants_read = False  # TLS, see _read and _write
        self._queued_bytes = 0       # every byte ever queued, and every byte send() took:
        self._sent_bytes = 0         # ...a command is written once _sent_bytes passes its end
        self._wire = collections.deque()  # commands awaiting a reply, in the order sent
        # Commands whose callbacks wait for a retried script sent before them (NOSCRIPT): the
        # retried ones and those answered since, in the order the owner sent them.
        self._held = collections.deque()
        self._loaded = set()         # scripts loaded (or being loaded) on this connection
        self._load_errors = {}       # sha -> the error SCRIPT LOAD gave (a script that can't load)
        self._late = None            # commands sent while closing, for on_lost's list

    # -- the owner's side -----------------------------------------------------------------------
    def start(self):
        """Begin connecting. Failures are reported through on_lost, from the loop."""
        self._ready_deadline = self._loop.monotonic() + self.timeout
        self._arm(self._ready_deadline)
        self._connect_next()

    def send(self, args, callback):
        """Queue ``args`` (a tuple such as ``("SET", "k", "v")``); ``callback(reply)`` is called
        with its reply, after those of every command sent before it. Sent at the next flush()."""
        self._check_ready()
        self._queue(RedisCommand(tuple(args), callback))

    def evalsha(self, script, keys, args, callback):
        """Run the Lua ``script`` by its SHA-1 (EVALSHA), loading it first on this connection's
        first use of it: SCRIPT LOAD then EVALSHA, pipelined, so a normal run never meets
        NOSCRIPT. If Redis forgot it meanwhile (SCRIPT FLUSH), the NOSCRIPT reply is not
        shown: the script is loaded and run again, and the callbacks of commands sent after it
        wait for its result, so the owner sees every reply in the order it sent the commands.
        (Redis has then run those later commands before this one: only the callbacks keep the
        order, as they must; the script must not depend on running before them.)"""
        self._check_ready()
        sha, body = script_digest(script)
        command = RedisCommand(("EVALSHA", sha, len(keys)) + tuple(keys) + tuple(args),
                               callback, body)
        if self._late is None:
            self._load_script(sha, body)
        self._queue(command)

    def flush(self):
        """Send what was queued since the last flush, in one send() where the socket takes it.
        The owner calls this once per loop turn, just before the loop sleeps."""
        if (self._out or self._unsent) and not self._write_blocked and (
                self.state is RedisState.READY or self.state is RedisState.STARTING):
            self._write()

    def close(self):
        """Close now, without on_lost; returns the unanswered commands (as on_lost would).
        Replies held back behind a script being run again (see evalsha) are delivered first:
        the one case where a callback is called from inside a call of the owner's."""
        if self.state is RedisState.CLOSED:
            return []
        return self._shut()

    # -- queueing -------------------------------------------------------------------------------
    def _check_ready(self):
        if self._late is not None:
            return  # closing: the command goes into on_lost's list (see _shut)
        if self.state is not RedisState.READY:
            raise RuntimeError("the connection to %s is %s, not ready"
                               % (self.address.shown, self.state))

    def _queue(self, command):
        if self._late is not None:
            self._late.append(command)
            return
        self._put_on_wire(command)

    def _put_on_wire(self, command):
        data = encode_command(*command.args)             # TypeError, or
        blocked = blocking_seconds(command.args)         # ValueError, before anything changes
        self._out.append(data)
        self._queued_bytes += len(data)
        command.end = self._queued_bytes
        command.deadline = self._loop.monotonic() + self.timeout + blocked
        self._wire.append(command)
        if self._timer is None:
            self._arm(command.deadline)

    def _queue_internal(self, args, callback):
        self._put_on_wire(RedisCommand(args, callback, internal=True))

    def _load_script(self, sha, body):
        if sha not in self._loaded:
            self._loaded.add(sha)
            self._queue_internal(("SCRIPT", "LOAD", body),
                                 lambda reply: self._script_loaded(sha, reply))

    def _script_loaded(self, sha, reply):
        if isinstance(reply, RedisError):
            self._load_errors[sha] = reply  # its EVALSHA's NOSCRIPT will be shown this instead

    # -- connecting -----------------------------------------------------------------------------
    def _connect_next(self):
        """Try the next address: each connect() in its turn, never blocking."""
        while self._sockaddrs:
            family, sockaddr = self._sockaddrs.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                self._connect_error = exc
                continue
            sock.setblocking(False)
            code = sock.connect_ex(sockaddr)
            if code == 0 or code in _CONNECT_PENDING:
                self._sock = sock
                self._want(False, True)  # writable: connected, or failed (SO_ERROR says which)
                return
            sock.close()
            self._connect_error = OSError(code, os.strerror(code))
        # Told from the loop, not from inside start(): the owner may not be ready to hear it.
        why = self._connect_error.strerror if self._connect_error else "no address to try"
        self._loop.call_later(0, lambda: self._lose_if_open(
            "cannot connect to %s: %s" % (self.address.shown, why)))

    def _connected(self):
        code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_error = OSError(code, os.strerror(code))
            self._drop_socket()
            self._connect_next()
            return
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # we batch ourselves
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._tls_context is None:
            self._start_session()
            return
        self._loop.unwatch(self._sock)  # the TLS socket replaces it (same descriptor)
        self._interest = None
        self._sock = self._tls_context.wrap_socket(self._sock, server_hostname=self.address.host,
                                                   do_handshake_on_connect=False)
        self.state = RedisState.TLS
        self._handshake()

    def _handshake(self):
        try:
            self._sock.do_handshake()
        except TLS_WANTS_READ:
            self._want(True, False)
            return
        except TLS_WANTS_WRITE:
            self._want(False, True)
            return
        except OSError as exc:
            self._lose(self._tls_failure(exc))
            return
        self._start_session()

    def _tls_failure(self, exc):
        shown = self.address.shown
        verify = getattr(exc, "verify_message", None)
        if verify:
            return "the TLS certificate of %s was refused: %s" % (shown, verify)
        reason = getattr(exc, "reason", None)
        if reason == "WRONG_VERSION_NUMBER":
            return "TLS with %s failed: it does not speak TLS there (use redis://)" % shown
        return "TLS with %s failed: %s" % (shown, reason or exc.strerror or exc)

    def _start_session(self):
        """AUTH and SELECT as the URL says, then PING: the first PING's answer tells that this
        is Redis, that it lets us in (NOAUTH otherwise) and that it serves (LOADING otherwise)."""
        self.state = RedisState.STARTING
        self._want(True, False)
        address = self.address
        if address.password is not None:
            credentials = ((address.username, address.password) if address.username
                           else (address.password,))
            self._queue_internal(("AUTH",) + credentials, self._authenticated)
        if address.db:
            self._queue_internal(("SELECT", address.db), self._selected)
        self._queue_internal(("PING",), self._pinged)

    def _authenticated(self, reply):
        if isinstance(reply, RedisError):
            self._lose("%s refused the password: %s" % (self.address.shown, reply.message))

    def _selected(self, reply):
        if isinstance(reply, RedisError):
            self._lose("%s refused database %d: %s"
                       % (self.address.shown, self.address.db, reply.message))

    def _pinged(self, reply):
        if not isinstance(reply, RedisError):
            self.state = RedisState.READY
            self._on_ready()
        elif reply.code == "NOAUTH":
            self._lose("%s wants a password (%s): give it in the URL, redis://:PASSWORD@HOST"
                       % (self.address.shown, reply.message))
        else:
            self._lose("%s is not serving: %s" % (self.address.shown, reply.message))

    # -- events ---------------------------------------------------------------------------------
    def _on_event(self, readable, writable):
        """The loop's call: the socket is ready for what we asked."""
        if self.state is RedisState.CLOSED:
            return  # an event the loop had already collected before we closed
        try:
            if self.state is RedisState.CONNECTING:
                self._connected()
            elif self.state is RedisState.TLS:
                self._handshake()
            else:
                if readable or (writable and self._read_wants_write):
                    self._read()
                if (self.state is not RedisState.CLOSED and (self._out or self._unsent)
                        and (writable or (readable and self._write_wants_read))):
                    self._write()
        except Exception as exc:
            self._lose_for_bug(exc)
            raise

    def _want(self, readable, writable):
        if self._interest != (readable, writable):
            self._interest = (readable, writable)
            self._loop.watch(self._sock, readable, writable, self._on_event)

    def _update_interest(self):
        self._want(True, self._write_blocked or self._read_wants_write)

    # -- reading --------------------------------------------------------------------------------
    def _read(self):
        self._read_wants_write = False
        sock = self._sock
        tls = self._tls_context is not None
        budget = REDIS_READ_BUDGET
        while True:
            try:
                data = sock.recv(REDIS_READ_SIZE)
            except (BlockingIOError, InterruptedError, TLS_WANTS_READ):
                break
            except TLS_WANTS_WRITE:
                # TLS must write before it can read on (a renegotiation): wait until it can.
                self._read_wants_write = True
                break
            except OSError as exc:
                self._lose(self._gone_reason(exc))
                return
            if not data:
                self._lose(self._gone_reason())
                return
            self._parser.feed(data)
            if not self._take_replies():
                return
            budget -= len(data)
            # Bytes TLS has already decrypted never wake the loop's select(): take them now.
            if tls and sock.pending():
                continue
            # A short plain read has emptied the kernel's buffer. TLS gives one record (16 KiB)
            # a read, however much is there: it reads on until it wants more bytes.
            if budget <= 0 or (not tls and len(data) < REDIS_READ_SIZE):
                break
        self._update_interest()

    def _gone_reason(self, exc=None):
        """Why the connection ended, ``exc`` being the error (None: the end of its input)."""
        shown = self.address.shown
        if self.state is RedisState.STARTING and self._tls_context is None:
            # Redis's TLS port closes (or resets) a plain-text connection at once.
            return "%s closed the connection before answering (a TLS port? then rediss://)" % shown
        if exc is None:
            return "%s closed the connection" % shown
        return "lost %s: %s" % (shown, exc.strerror or exc)

    def _take_replies(self):
        """Hand every whole reply to its command; False once the connection is closed."""
        parser = self._parser
        while True:
            try:
                reply = parser.gets()
            except RespProtocolError as exc:
                self._lose("%s sent something that is not RESP: %s" % (self.address.shown, exc))
                return False
            if reply is RESP_INCOMPLETE:
                return True
            self._on_reply(reply)
            if self.state is RedisState.CLOSED:
                return False

    def _on_reply(self, reply):
        if not self._wire:
            self._lose("%s sent a reply to no command: which reply is whose is in doubt"
                       % self.address.shown)
            return
        command = self._wire.popleft()
        if command.internal:
            command.callback(reply)
            return
        if (command.script is not None and isinstance(reply, RedisError)
                and reply.code == "NOSCRIPT" and not command.retried):
            sha = command.args[1]
            if sha not in self._load_errors:
                self._run_script_again(command, sha)
                return
            reply = self._load_errors[sha]  # why it isn't there, not just that it isn't
        if command.retried:
            command.reply, command.answered = reply, True  # it waits in _held already
            self._deliver_held()
        elif self._held:
            command.reply, command.answered = reply, True
            self._held.append(command)
        else:
            command.callback(reply)

    def _run_script_again(self, command, sha):
        """NOSCRIPT: load the script and run the command again. Its callback, and those of the
        commands answered meanwhile, wait in _held for its new reply."""
        command.retried = True
        self._held.append(command)
        self._loaded.discard(sha)
        self._load_script(sha, command.script)
        self._put_on_wire(command)

    def _deliver_held(self):
        held = self._held
        while held and held[0].answered:
            command = held.popleft()
            command.callback(command.reply)

    # -- writing --------------------------------------------------------------------------------
    def _write(self):
        self._write_wants_read = False
        if self._out:
            pieces = [self._unsent] + self._out if self._unsent else self._out
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self._out = []
        else:
            data = self._unsent
        try:
            count = self._sock.send(data)
        except (BlockingIOError, InterruptedError, TLS_WANTS_WRITE):
            count = 0
        except TLS_WANTS_READ:
            # TLS must read before it can write on: the next readable event writes again.
            count = 0
            self._write_wants_read = True
        except OSError as exc:
            self._lose(self._gone_reason(exc))
            return
        self._sent_bytes += count
        # A TLS write that must be retried is retried with the same bytes first (OpenSSL's rule).
        self._unsent = memoryview(data)[count:] if count < len(data) else b""
        self._write_blocked = bool(self._unsent) and not self._write_wants_read
        self._update_interest()

    # -- deadlines ------------------------------------------------------------------------------
    def _arm(self, due):
        self._timer = self._loop.call_later(max(0.0, due - self._loop.monotonic()),
                                            self._on_timer)

    def _on_timer(self):
        """One timer for the earliest deadline; answers that came meanwhile cost nothing."""
        self._timer = None
        if self.state is RedisState.CLOSED:
            return
        try:
            due = self._wire[0].deadline if self._wire else None
            if self.state is not RedisState.READY:
                due = self._ready_deadline if due is None else min(due, self._ready_deadline)
            if due is None:
                return
            if self._loop.monotonic() >= due:
                self._lose(self._timeout_reason())
            else:
                self._arm(due)
        except Exception as exc:
            self._lose_for_bug(exc)
            raise

    def _timeout_reason(self):
        shown, seconds = self.address.shown, self.timeout
        if self.state is RedisState.CONNECTING:
            return "cannot connect to %s: no answer within %g s" % (shown, seconds)
        if self.state is RedisState.TLS:
            return ("TLS with %s failed: no answer within %g s (a plain-text port? then redis://)"
                    % (shown, seconds))
        return "%s did not answer within %g s" % (shown, seconds)

    # -- closing --------------------------------------------------------------------------------
    def _lose_if_open(self, reason):
        if self.state is not RedisState.CLOSED:
            self._lose(reason)

    def _lose(self, reason):
        self._on_lost(reason, self._shut())

    def _lose_for_bug(self, exc):
        if self.state is not RedisState.CLOSED:
            self._lose("closed after an error in this program: %r" % (exc,))

    def _shut(self):
        """Close, deliver the replies that were held for a retried script, and return the
        owner's commands left without a reply, in the order they were sent."""
        self.state = RedisState.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop_socket()
        # In the order sent: a retried script was sent before every command still on the wire
        # but its own retry (those before it were answered before its NOSCRIPT came).
        unanswered = [c for c in self._held if not c.answered]
        unanswered += [c for c in self._wire if not c.internal and not c.retried]
        for command in unanswered:
            command.written = command.end <= self._sent_bytes
        answered = [c for c in self._held if c.answered]
        self._wire.clear()
        self._held.clear()
        self._out = []
        self._unsent = b""
        self._late = []  # what their callbacks send now joins the unanswered, never written
        for command in answered:
            command.callback(command.reply)
        late, self._late = self._late, None
        return unanswered + late

    def _drop_socket(self):
        if self._sock is not None:
            self._loop.unwatch(self._sock)
            self._interest = None
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------------------------
# A connection kept usable
# ---------------------------------------------------------------------------------------------

class RedisLink:
    """One Redis connection kept usable: connecting at once, and again after every loss, waiting
    0.1 s first and twice as long after each failed attempt, up to 2 s.

    ``on_ready()``: a connection is usable (first, or again). ``on_lost(reason, unanswered)``: a
    connection ended, or an attempt failed (then ``unanswered`` is empty); the next attempt is
    in ``retry_in`` seconds. ``send`` and ``evalsha`` work between on_ready and on_lost
    (RuntimeError otherwise): while Redis is away, the owner holds its work itself.

    Made before the loop serves: the host name is looked up here, once (OSError if it can't
    be), and the TLS context made (OSError or ssl.SSLError for a CA file that can't be read).
    """

    def __init__(self, loop, url, on_ready, on_lost, timeout=REDIS_TIMEOUT, ca_file=None):
        self._loop = loop
        self.address = parse_redis_url(url) if isinstance(url, str) else url
        self._sockaddrs = resolve_redis_address(self.address)
        self._tls_context = redis_tls_context(ca_file) if self.address.tls else None
        self._on_ready = on_ready
        self._on_lost = on_lost
        self.timeout = timeout
        self.connection = None    # the ready connection, else None
        self._current = None      # the connection being made or used
        self._retry_timer = None
        self.retry_in = None      # seconds until the next attempt, after a loss
        self._backoff = REDIS_RECONNECT_FIRST
        self._connect()

    @property
    def ready(self):
        return self.connection is not None

    def send(self, args, callback):
        self._ready_connection().send(args, callback)

    def evalsha(self, script, keys, args, callback):
        self._ready_connection().evalsha(script, keys, args, callback)

    def flush(self):
        if self._current is not None:
            self._current.flush()

    def close(self):
        """Stop for good; returns the unanswered commands of the connection it had."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        unanswered = self._current.close() if self._current is not None else []
        self._current = self.connection = None
        return unanswered

    def _ready_connection(self):
        if self.connection is None:
            raise RuntimeError("%s is not ready: wait for on_ready" % self.address.shown)
        return self.connection

    def _connect(self):
        self._retry_timer = None
        self._current = RedisConnection(self._loop, self.address, self._sockaddrs,
                                        self._connection_ready, self._connection_lost,
                                        self.timeout, self._tls_context)
        self._current.start()

    def _connection_ready(self):
        self.connection = self._current
        self.retry_in = None
        self._backoff = REDIS_RECONNECT_FIRST
        self._on_ready()

    def _connection_lost(self, reason, unanswered):
        self.connection = self._current = None
        self.retry_in = self._backoff
        self._backoff = min(self._backoff * 2, REDIS_RECONNECT_MAX)
        self._retry_timer = self._loop.call_later(self.retry_in, self._connect)
        self._on_lost(reason, unanswered)
