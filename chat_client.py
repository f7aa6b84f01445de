#!/usr/bin/env python3
"""Terminal client for the console chat (chat_server.py, or any server of docs/PROTOCOL.md).

How it is built, top to bottom:

* ``Lines`` and ``ServerLine``: the protocol's strings in one place, and a line from the server
  taken apart (timestamp, kind, nickname, text).
* ``Session``: the client's side of the protocol as explicit phases (CONNECTING, PASSWORD,
  NICKNAME, JOINING, MEMBER, OFFLINE). It gets the server's lines and the lines the user typed,
  and decides what to send, what to show and when the client ends. No sockets, no terminal: the
  tests drive it in memory.
* ``Presenter``: how a line looks on a terminal: nicknames in colours of their own, your own
  lines and the server's notices set apart, mentions highlighted, long lines wrapped to the width
  with a hanging indent so that no text of a message can pose as a line of its own. Pipes get the
  server's lines exactly as they are.
* Terminals and inputs: on POSIX terminals GNU readline's callback interface (bound with ctypes)
  edits the input line inside the select loop; pipes are read as lines; on Windows (and for files
  select can't watch) a thread reads standard input and wakes the loop through a socketpair.
* ``Connection``: TCP, then TLS when asked, never blocking: the handshake, reads and writes are
  driven by the selector, and bytes TLS already decrypted (``pending()``) are drained.
* ``Client``: one selectors loop over the connection, the input and (POSIX terminals) the
  signals; timers for connecting, reconnecting and the plain-text probe.

Whatever the server sends is made harmless before it reaches the screen: invalid UTF-8 becomes
U+FFFD, control characters are shown as ^X, so no escape sequence from the wire reaches the
terminal. Standard library only, Python 3.8 or newer: zipped alone into chat_client.pyz.
"""

import argparse
import bisect
import codecs
import errno
import hashlib
import os
import queue
import re
import selectors
import signal
import socket
import sys
import threading
import time
import unicodedata
import zlib
from collections import deque

try:
    import ssl
except ImportError:  # some minimal Python builds have no ssl: only --tls needs it
    ssl = None

VERSION = "2.0.0"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
READ_SIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0       # seconds for TCP and the TLS handshake together
MAX_UNSENT = 256 * 1024      # stop reading stdin while this much typed or piped input is unsent
RECONNECT_DELAYS = (1, 2, 4, 8, 16, 30)   # seconds; the last one repeats
PLAIN_PROBE_AFTER = 1.5      # seconds of silence before a plain connection checks for a TLS server
# Five carriage returns: a TLS server needs a five-byte record header to refuse us (and then
# closes), while a chat server in plain text strips them from the next line as whitespace.
PLAIN_PROBE = b"\r" * 5
THREAD_POLL = 0.25           # the longest select wait where Ctrl-C can't interrupt it (Windows)

# Control characters (C0 but TAB, DEL, C1) are shown in caret or \x notation instead.
CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------------------------
# The protocol's lines (docs/PROTOCOL.md), each spelled once.
# ---------------------------------------------------------------------------------------------

class Lines:
    """What the server says. Lines without a timestamp are the greeting and the password prompt;
    every other line starts with '{ts}: '."""

    WELCOME = "Wellcome! Please enter your nickname"
    PASSWORD_PROMPT = "This chat is protected. Please enter the password"
    TLS_HINT = "This server speaks TLS: use chat_client --tls, or openssl s_client."  # plain
    OK = "Server: ok!"
    ALONE = "Server: there are no other users!"
    GOODBYE = "Goodbye!"
    SHUTTING_DOWN = "Server is shutting down."
    # Refusals after which the server closes the connection: the client ends with status 1.
    FULL = "Sorry! The chat is full."
    JOIN_TIMEOUT = "Sorry! You took too long to choose a nickname."
    WRONG_PASSWORD = "Sorry! Wrong password."
    TOO_MANY_PASSWORDS = "Sorry! Too many wrong passwords. Try again later."
    FINAL_REFUSALS = (FULL, JOIN_TIMEOUT, WRONG_PASSWORD, TOO_MANY_PASSWORDS)

    OWN_MESSAGE = "YOU SEND USERS "
    ERROR_PREFIXES = ("Sorry! ", "Your nickname must ")
    COMMANDS_PREFIX = "Commands: "
    COMMANDS = ("/help", "/users", "/who", "/names", "/msg", "/me", "/nick", "/away", "/back",
                "/join", "/part", "/leave", "/rooms", "/topic", "/search", "/register",
                "/password", "/unregister", "/kick", "/ban", "/unban", "/bans", "/mute",
                "/unmute", "/op", "/deop", "/drop", "/quit")
    USERS_COMMAND = "/users"

    TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d): ")


class Kind:
    """What a line from the server is, as far as the client cares."""
    GREETING = "greeting"          # no timestamp: the welcome and the password prompt
    OK = "ok"
    MESSAGE = "message"            # {nick} sent {text}
    ACTION = "action"              # * {nick} {text}
    PRIVATE = "private"            # [private] {nick} sent {text}
    OWN_MESSAGE = "own message"    # YOU SEND USERS {text}
    OWN_PRIVATE = "own private"    # [private] YOU SEND {target} {text}
    JOINED = "joined"
    LEFT = "left"
    RENAMED = "renamed"
    USERS = "users"                # Users ({n}): a, b (away), ...
    RECENT = "recent"              # Recent messages ({k}):
    ERROR = "error"                # Sorry! ..., and the nickname refusals
    NOTICE = "notice"              # any other line with a timestamp
    OTHER = "other"                # any other line without one


_NICK = r"([^\W_]+)"   # a nickname is str.isalnum(): word characters but the underscore
_SHAPES = (
    (Kind.OWN_PRIVATE, re.compile(r"\[private\] YOU SEND %s (.*)\Z" % _NICK)),
    (Kind.PRIVATE, re.compile(r"\[private\] %s sent (.*)\Z" % _NICK)),
    (Kind.ACTION, re.compile(r"\* %s (.*)\Z" % _NICK)),
    (Kind.MESSAGE, re.compile(r"%s sent (.*)\Z" % _NICK)),
    (Kind.JOINED, re.compile(r"%s connected!\Z" % _NICK)),
    (Kind.LEFT, re.compile(r"%s disconnected!\Z" % _NICK)),
    (Kind.RENAMED, re.compile(r"%s is now known as %s\Z" % (_NICK, _NICK))),
    (Kind.USERS, re.compile(r"Users \((\d+)\): (.*)\Z")),
    (Kind.RECENT, re.compile(r"Recent messages \((\d+)\):\Z")),
    (Kind.ERROR, re.compile(r'"(.*)" is already busy\.\Z')),
)


class ServerLine:
    """One line from the server (already made harmless by render()), taken apart.

    ``nick`` is whom the line is about (sender, newcomer, old nickname, private target),
    ``other`` the new nickname of a rename or the count of a list, ``said`` the text of a
    message. The session marks ``own``, ``mention`` and ``bell`` for the presenter."""

    __slots__ = ("text", "ts", "prefix_len", "body", "kind", "nick", "other", "said",
                 "own", "mention", "bell")

    def __init__(self, text):
        self.text = text
        match = Lines.TIMESTAMP.match(text)
        self.ts = match.group(1) if match else None
        self.prefix_len = match.end() if match else 0
        self.body = text[self.prefix_len:]
        self.nick = self.other = self.said = None
        self.own = self.mention = self.bell = False
        self.kind = self._classify()

    def _classify(self):
        body = self.body
        if self.ts is None:
            return Kind.GREETING if body in (Lines.WELCOME, Lines.PASSWORD_PROMPT) else Kind.OTHER
        if body == Lines.OK:
            return Kind.OK
        if body.startswith(Lines.OWN_MESSAGE):
            self.said = body[len(Lines.OWN_MESSAGE):]
            return Kind.OWN_MESSAGE
        for kind, shape in _SHAPES:
            match = shape.match(body)
            if match:
                self._take(kind, match.groups())
                return kind
        if body.startswith(Lines.ERROR_PREFIXES):
            return Kind.ERROR
        return Kind.NOTICE

    def _take(self, kind, groups):
        if kind in (Kind.USERS, Kind.RECENT):
            self.other = int(groups[0])
            self.said = groups[1] if len(groups) > 1 else None
        elif kind == Kind.RENAMED:
            self.nick, self.other = groups
        elif kind in (Kind.JOINED, Kind.LEFT):
            self.nick = groups[0]
        elif kind != Kind.ERROR:
            self.nick, self.said = groups

    def __repr__(self):
        return "<ServerLine %s %r>" % (self.kind, self.text)


_MEMBER = re.compile(r"%s(?: \(away\)| \(away: .*\))?\Z" % _NICK, re.DOTALL)
_NICK_RUN = re.compile(_NICK)
_AWAY_TEXT = " (away: "
USERS_PARSE_BUDGET = 20000   # steps spent counting the readings of a tangled list


def users_listed(text, count):
    """The nicknames in the list of 'Users ({n}): a, b (away), c (away: text)', which has
    ``count`` entries. An away text may hold anything, ', ' and ')' too, so '/away x), mallory,
    eve' could pose as more members: only nicknames that are entries in every reading of the
    list as ``count`` entries are trusted (the true list is one of those readings)."""
    pieces = text.split(", ") if text else []
    if len(pieces) == count and all(_MEMBER.match(piece) for piece in pieces):
        # Every ', ' ends an entry: no away text holds one, and no other reading has as many.
        return [_NICK_RUN.match(piece).group() for piece in pieces]
    only = _only_reading(text, count)
    return only if only is not None else _certain_entries(pieces)


def _certain_entries(pieces):
    """The nicknames that begin the list up to its first away text (where each entry must
    end is known until then), and those after the last piece that ends with ')' (no away
    text can reach past that)."""
    first = []
    for piece in pieces:
        nick = _NICK_RUN.match(piece)
        if nick and piece.startswith(_AWAY_TEXT, nick.end()):
            first.append(nick.group())   # its entry begins here; where it ends, who knows
            break
        if not _MEMBER.match(piece):
            return first
        first.append(nick.group())
    else:
        return first   # (no away text at all)
    last = []
    for piece in reversed(pieces[len(first):]):
        if piece.endswith(")") or not _NICK_RUN.fullmatch(piece):
            break
        last.append(piece)
    return first + last[::-1]


def _only_reading(text, count):
    """The nicknames of the one reading of ``text`` as ``count`` entries, where some away
    text holds a ', ': the readings are counted (up to two) from the end backwards. None
    when there are more, or counting them would take too long."""
    ends = [m.start() for m in re.finditer(", ", text)] + [len(text)]
    closing = [end for end in ends if text[end - 1:end] == ")"]   # where an away text may end
    starts = [0] + [end + 2 for end in ends[:-1]]
    # ways[start][left]: readings of text[start:] as exactly ``left`` entries (2: 'more').
    ways = {len(text) + 2: {0: 1}}
    budget = USERS_PARSE_BUDGET
    for start in reversed(starts):
        counts = {}
        for end, _ in _entries_from(text, start, ends, closing):
            after = ways[end + 2]
            budget -= 1 + len(after)
            if budget < 0:
                return None
            for left, n in after.items():
                if left < count:
                    counts[left + 1] = min(2, counts.get(left + 1, 0) + n)
        ways[start] = counts
    if ways[0].get(count) != 1:
        return None if ways[0].get(count) else []   # more than one reading; none: not a list
    nicks, start = [], 0
    for left in range(count, 0, -1):   # follow the one reading, entry by entry
        for end, nick in _entries_from(text, start, ends, closing):
            if ways[end + 2].get(left - 1):
                nicks.append(nick)
                start = end + 2
                break
    return nicks


def _entries_from(text, start, ends, closing):
    """(end, nickname) of each entry that can start at ``start`` and end at one of ``ends``
    (before a ', ', or the end of ``text``). Only an entry with an away text can reach past
    a ', ': to any of the ``closing`` ones, after a ')'."""
    nick = _NICK_RUN.match(text, start)
    if nick is None:
        return
    if not text.startswith(_AWAY_TEXT, nick.end()):
        end = ends[bisect.bisect_left(ends, nick.end())]
        if _MEMBER.match(text, start, end):
            yield end, nick.group()
        return
    earliest = nick.end() + len(_AWAY_TEXT) + 1   # just after the shortest text's ')'
    for i in range(bisect.bisect_left(closing, earliest), len(closing)):
        yield closing[i], nick.group()


def same_nick(a, b):
    return a is not None and b is not None and a.casefold() == b.casefold()


def mentions(text, nick):
    """Does ``text`` name ``nick`` as a word of its own, whatever the case?"""
    if not nick:
        return False
    pattern = r"(?<![^\W_])%s(?![^\W_])" % re.escape(nick)
    return re.search(pattern, text, re.IGNORECASE) is not None


def normalized_nick(text):
    """The nickname the server makes of an attempt: stripped, then NFKC (docs/PROTOCOL.md)."""
    return unicodedata.normalize("NFKC", text.strip())


# ---------------------------------------------------------------------------------------------
# What the client itself says.
# ---------------------------------------------------------------------------------------------

class Notes:
    CLOSED_BY_SERVER = "Connection closed by the server."
    CANNOT_CONNECT = "Cannot connect to {address}: {reason}."
    REFUSED_HINT = " Is the server running?"
    CONNECTION_LOST = "Connection lost: {reason}."
    RECONNECTING = "Connection lost. Reconnecting in {delay} s (Ctrl-C to quit)..."
    # After 'Server is shutting down.', which says why already:
    RECONNECTING_AFTER_SHUTDOWN = "Reconnecting in {delay} s (Ctrl-C to quit)..."
    RECONNECTED = "Reconnected as {nick}."
    NOT_SENT_OFFLINE = "Not sent, the connection is down (Up brings the line back): {text}"
    NOT_SENT_NOT_JOINED = "Not sent, you have not joined yet: {text}"
    PASSWORD_PROMPT = "password> "
    NICKNAME_PROMPT = "nickname> "
    TRUST_PROMPT = "Trust it? [y/N] "
    # TLS
    NOT_TLS = "{address} does not speak TLS (it answered in plain text): leave out --tls."
    EXPECTS_TLS = ("{address} closed the connection without a greeting in plain text: "
                   "it expects TLS, add --tls.")
    TLS_FAILED = "TLS handshake with {address} failed: {reason}."
    TLS_NOT_VERIFIED = "The TLS certificate of {address} failed the --tls-ca check: {reason}."
    TLS_PIN_MISMATCH = ("The TLS certificate of {address} has the SHA-256 fingerprint {actual}, "
                        "not the one --tls-fingerprint gives ({pinned}). Not connected.")
    # The fingerprint on a line of its own: no punctuation of the sentence sticks to it.
    TLS_FIRST_USE = ("The TLS certificate of {address} is not known yet. Compare its SHA-256 "
                     "fingerprint with the one the server printed (\"TLS certificate SHA-256 "
                     "fingerprint: ...\"):\n"
                     "  {actual}")
    TLS_UNKNOWN_IN_PIPE = ("The TLS certificate of {address} is not known (SHA-256 {actual}). "
                           "Not connected: check the fingerprint with the person who runs the "
                           "server, then pin it with --tls-fingerprint, or connect once from a "
                           "terminal to trust it.")
    TLS_CHANGED = ("WARNING: THE TLS CERTIFICATE OF {address} HAS CHANGED. Someone may be "
                   "posing as the server, or it has a new certificate.\n"
                   "  known:  {known}\n"
                   "  now:    {actual}\n"
                   "Not connected. Ask the person who runs the server which fingerprint it "
                   "prints; if it is the new one, remove line {line} of {path} and connect "
                   "again.")
    TLS_REMEMBERED = "Trusted: remembered in {path}."
    TLS_NOT_TRUSTED = "Not connected: the certificate of {address} was not trusted."
    NO_SSL = "--tls: this Python has no ssl module"


def clause(reason):
    """A reason from elsewhere (the OS, OpenSSL) to go inside a sentence of ours, which has
    its own full stop: 'is not valid for '127.0.0.1'.' would end in two."""
    return str(reason).strip().rstrip(".")


class ClientExit(Exception):
    """Ends the client: ``message`` (if any) goes to stderr, ``status`` is the exit status."""

    def __init__(self, status, message=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# The client's side of the protocol: phases, no I/O.
# ---------------------------------------------------------------------------------------------

class Phase:
    """Where the client is; one at a time, changed only through Session._enter."""
    CONNECTING = "connecting"                # connected, nothing heard yet on this connection
    PASSWORD = "password"                    # the server asked for the password; not sent yet
    CHECKING_PASSWORD = "checking password"  # sent; the greeting or a refusal comes next
    NICKNAME = "nickname"                    # greeted: waiting for a nickname to try
    JOINING = "joining"                      # one nickname attempt in flight
    MEMBER = "member"                        # joined: typed lines are messages and commands
    OFFLINE = "offline"                      # the connection is gone; a reconnect is due


class Reply:
    """What the server owes for a line a member sent. Tracked on a terminal only, so that the
    'Server: ok!' before the line that repeats your own message can be left out."""
    ECHOED = "echoed"        # a message, //text, /me, /msg, /nick: ok, then a line repeating it
    CONFIRMED = "confirmed"  # /away, /back: ok alone
    ANSWERED = "answered"    # /help, /users, /quit, unknown commands: one line
    QUIET = "quiet"          # the /users the client sends itself on joining: not shown


class Awaited:
    """A line a member sent, until its answer comes: the Reply it is owed, and ``typed``: the
    input line as it stood on screen (prompt and text) when the terminal erased it for the
    server's echo. A refusal instead of the echo shows it again, so that the user sees what
    was refused."""

    __slots__ = ("reply", "typed")

    def __init__(self, reply, typed=None):
        self.reply = reply
        self.typed = typed

    def __repr__(self):
        return "<Awaited %s %r>" % (self.reply, self.typed)


def expected_reply(text):
    text = CONTROL_CHARS.sub("", text)   # the server removes them before it looks for a '/'
    if not text.startswith("/") or text.startswith("//"):
        return Reply.ECHOED
    words = text[1:].split(None, 1)
    name = words[0].lower() if words else ""
    if name in ("me", "msg", "nick"):
        return Reply.ECHOED
    if name in ("away", "back"):
        return Reply.CONFIRMED
    return Reply.ANSWERED


class Session:
    """The client's side of the protocol, without sockets or a terminal.

    ``ui`` is told what to do: ``send(text)``, ``show(line)``, ``note(text)``,
    ``show_typed(text)``, ``prompt_changed()``, ``ask_password()``, ``half_close()``,
    ``joined()``. The end of the client is a ClientExit raised from here.

    On a terminal (``interactive``) a refused nickname asks again and the lines typed while an
    attempt was in flight are not sent; in a pipe a refused nickname ends the client (status 1),
    since nobody reads the refusal and the next line would become a nickname by surprise."""

    def __init__(self, ui, nick=None, password=None, interactive=False, reconnect=False,
                 list_users=False, erases_echo=False):
        self.ui = ui
        self.interactive = interactive
        self.erases_echo = erases_echo    # the terminal can take a sent line off the screen
        self.reconnect = reconnect        # reconnect after a loss, once joined (terminal only)
        self.list_users = list_users      # send /users quietly on joining (for completion)
        self.phase = Phase.CONNECTING
        self.nick = None                  # our nickname once accepted; follows /nick
        self.next_nick = nick             # sent by itself when greeted: --nick, or to rejoin
        self.password = password          # --password-file or CHAT_PASSWORD, then as sent
        self.attempt = None               # the nickname attempt in flight
        self.held = deque()               # typed lines waiting for the phase that takes them
        # Awaited answers to the lines sent, oldest first. Not bounded: a paste of any size
        # held back by flood control is answered in full later; a bound would forget the oldest.
        self.awaiting = deque()
        self.members = {}                 # casefolded nickname -> nickname, others only
        # False once the server answered our quiet /users as a message: a version 1 server,
        # which has no commands, so every line is a message to it (this connection only).
        self.server_has_commands = True
        self.joined_once = False
        self.rejoining = False
        self.farewell = None              # 'Server is shutting down.' when the server said it
        self.goodbye = False              # the server answered /quit
        self.input_done = False
        self.half_closed = False
        self.history_left = 0             # lines of 'Recent messages' still to come

    def __repr__(self):
        return "<Session %s nick=%r held=%d awaiting=%d>" % (
            self.phase, self.nick, len(self.held), len(self.awaiting))

    # -- what the client loop calls -----------------------------------------------------------
    def connected(self):
        """A new connection is ready for lines (TCP up, TLS trusted): its first line is next."""
        self.farewell = None
        self.goodbye = False
        self.half_closed = False
        self.attempt = None
        self.awaiting.clear()
        self.members.clear()
        self.server_has_commands = True
        self.history_left = 0
        self._enter(Phase.CONNECTING)

    def server_line(self, text):
        line = ServerLine(text)
        if line.ts and line.body in Lines.FINAL_REFUSALS:
            if not self.interactive:
                self.ui.show(line)   # a terminal gets it once, as the closing message
            raise ClientExit(1, line.body)
        if line.ts and line.body == Lines.SHUTTING_DOWN:
            self.farewell = line.body
            if not self.interactive or self._will_reconnect():
                self.ui.show(line)
            return
        if self.phase == Phase.MEMBER:
            self._member_line(line)
        elif self.phase == Phase.JOINING:
            self._joining_line(line)
        else:
            self._line_before_joining(line)

    def typed(self, text):
        """A line the user typed (or a pipe gave), without its line end. An empty line is
        sent too: the server's answer ('Sorry! You send nothing.', or an incorrect nickname)
        says what became of it, where dropping it said nothing."""
        phase = self.phase
        if phase == Phase.MEMBER:
            erased = self.prompt() + text if self.replaces_echo(text) else None
            self._send_member_line(text, typed=erased)
        elif phase == Phase.NICKNAME:
            self._send_attempt(text)
        elif phase == Phase.PASSWORD:
            self._send_password(text)
        elif phase == Phase.CHECKING_PASSWORD and self.interactive:
            pass   # perhaps the password again: never shown, kept, or sent as a nickname
        elif phase == Phase.OFFLINE:
            if text.strip():   # (an empty line loses nothing: the prompt says offline)
                self.ui.note(Notes.NOT_SENT_OFFLINE.format(text=text))
        else:
            self.held.append(text)   # CONNECTING, CHECKING_PASSWORD, JOINING: not yet

    def input_ended(self):
        """The pipe ended: once every line is sent, the connection is half-closed."""
        self.input_done = True
        self._maybe_half_close()

    def connection_closed(self, reason=None):
        """The connection ended (``reason`` None: the server closed it in order). Returns when
        the client should reconnect; raises ClientExit otherwise."""
        if self.goodbye:
            raise ClientExit(0)
        if self.half_closed and self.farewell is None and reason is None:
            raise ClientExit(0)   # end of piped input, and every reply received
        if self._will_reconnect():
            self.next_nick = self.nick
            self.rejoining = True
            self.attempt = None
            self.awaiting.clear()
            for text in self.held:
                self.ui.note(Notes.NOT_SENT_OFFLINE.format(text=text))
            self.held.clear()
            self._enter(Phase.OFFLINE)
            return
        raise ClientExit(1, self.farewell or reason or Notes.CLOSED_BY_SERVER)

    def prompt(self):
        if self.phase == Phase.MEMBER:
            return "%s> " % self.nick
        if self.phase == Phase.OFFLINE or (self.rejoining and self.phase == Phase.CONNECTING):
            return "(offline) %s> " % self.nick
        if self.phase in (Phase.NICKNAME, Phase.JOINING):
            return Notes.NICKNAME_PROMPT
        if self.phase in (Phase.PASSWORD, Phase.CHECKING_PASSWORD):
            return Notes.PASSWORD_PROMPT
        return ""

    def hides_input(self):
        """Is what the user types now hidden (no echo, no history)? While the password is
        asked for and while it is checked, on a terminal."""
        return self.interactive and self.phase in (Phase.PASSWORD, Phase.CHECKING_PASSWORD)

    def waits_for_nickname(self):
        """Greeted, and no nickname to send by itself (--nick, rejoining, typed ahead)."""
        return self.phase == Phase.NICKNAME and self.next_nick is None and not self.held

    def wants_input(self):
        """Would a typed line be used now rather than held? (Input read on demand asks.)"""
        return self.phase in (Phase.NICKNAME, Phase.MEMBER, Phase.OFFLINE) or (
            self.phase == Phase.PASSWORD and not self.interactive)

    def replaces_echo(self, text):
        """On a terminal, will the server repeat this line as our own styled line? Then the
        input line readline left on the screen can go: a message costs one line. (If a
        refusal comes instead, the line is shown again above it.)"""
        return (self.erases_echo and self.phase == Phase.MEMBER and bool(text.strip())
                and self._expected_reply(text) == Reply.ECHOED)

    def completions(self, text, first_word):
        """Tab completion: command names for a first word that starts with '/', else the
        nicknames of the members present. Each ends with the space that comes next (Python's
        readline module tells readline to append nothing)."""
        if first_word and text.startswith("/"):
            return [name + " " for name in Lines.COMMANDS if name.startswith(text.lower())]
        folded = text.casefold()
        return sorted((nick + " " for key, nick in self.members.items()
                       if key.startswith(folded)), key=str.casefold)

    # -- phases -------------------------------------------------------------------------------
    def _enter(self, phase):
        self.phase = phase
        self.ui.prompt_changed()

    def _will_reconnect(self):
        return self.reconnect and self.joined_once

    def _line_before_joining(self, line):
        if line.kind != Kind.GREETING:
            self.ui.show(line)
            return
        if not self.rejoining:   # rejoining, the client answers it: 'Reconnected as' says all
            self.ui.show(line)
        if line.body == Lines.WELCOME:
            self._enter(Phase.NICKNAME)
            self._try_nickname()
        else:
            self._enter(Phase.PASSWORD)
            self._give_password()

    def _give_password(self):
        if self.password is not None:
            self._send_password(self.password)
        elif self.interactive:
            self.ui.ask_password()   # the typed password comes back through typed()
        elif self.held:
            self._send_password(self.held.popleft())   # a pipe: its first line
        else:
            self._maybe_half_close()

    def _send_password(self, text):
        self.password = text   # kept to rejoin after a reconnect
        self.ui.send(text)
        self._enter(Phase.CHECKING_PASSWORD)

    def _try_nickname(self):
        if self.next_nick is not None:
            nick, self.next_nick = self.next_nick, None
            self._send_attempt(nick)
        elif self.held:
            self._send_attempt(self.held.popleft())
        else:
            self._maybe_half_close()

    def _send_attempt(self, text):
        self.attempt = text
        self.ui.send(text)
        self._enter(Phase.JOINING)   # one attempt in flight: later lines wait for its answer
        self._maybe_half_close()

    def _joining_line(self, line):
        if line.kind == Kind.OK:
            self._joined(line)
            return
        self.ui.show(line)
        if line.kind == Kind.ERROR:
            self._refused(line)

    def _refused(self, line):
        self.attempt = None
        if not self.interactive:
            raise ClientExit(1, line.body)
        dropped, self.held = list(self.held), deque()
        for text in dropped:
            self.ui.note(Notes.NOT_SENT_NOT_JOINED.format(text=text))
        self._enter(Phase.NICKNAME)

    def _joined(self, line):
        self.nick = normalized_nick(self.attempt)
        self.attempt = None
        self.joined_once = True
        if self.rejoining:
            self.rejoining = False
            self.ui.note(Notes.RECONNECTED.format(nick=self.nick))
        else:
            self.ui.show(line)
        self._enter(Phase.MEMBER)
        self.ui.joined()
        if self.list_users:
            self._send_member_line(Lines.USERS_COMMAND, Reply.QUIET)
        while self.held:
            self._send_member_line(self.held.popleft())
        self._maybe_half_close()

    def _send_member_line(self, text, reply=None, typed=None):
        if self.interactive:
            self.awaiting.append(Awaited(reply or self._expected_reply(text), typed))
        self.ui.send(text)

    def _expected_reply(self, text):
        return expected_reply(text) if self.server_has_commands else Reply.ECHOED

    def _maybe_half_close(self):
        if not self.input_done or self.half_closed or self.held:
            return
        if self.phase in (Phase.CONNECTING, Phase.CHECKING_PASSWORD, Phase.OFFLINE):
            return   # the password or nickname this client sends by itself may still be due
        self.half_closed = True
        self.ui.half_close()

    # -- a member's lines ---------------------------------------------------------------------
    def _member_line(self, line):
        head = self.awaiting[0] if self.awaiting else None
        expected = head.reply if head is not None else None
        if expected == Reply.QUIET and self._answers_quiet_users(line):
            return
        if line.kind == Kind.OK:
            if expected == Reply.ECHOED:
                return   # the line repeating our message follows, set apart: that says it all
            if expected == Reply.CONFIRMED:
                self.awaiting.popleft()
        elif self._is_own(line):
            line.own = True
            if expected == Reply.ECHOED:
                self.awaiting.popleft()
            if line.kind == Kind.RENAMED:
                self.nick = line.other   # the prompt follows, once the line is shown
        elif line.kind == Kind.USERS:
            if head is not None:
                self.awaiting.popleft()
            self._learn_users(line)
        elif (line.kind == Kind.ERROR or line.body in (Lines.ALONE, Lines.GOODBYE)
              or line.body.startswith(Lines.COMMANDS_PREFIX)):
            if head is not None:
                self.awaiting.popleft()
                if head.typed is not None:
                    self.ui.show_typed(head.typed)   # refused: what was it?
        if line.body == Lines.GOODBYE:
            self.goodbye = True
        self._learn_members(line)
        self._mark_mention(line)
        self.ui.show(line)
        if line.own and line.kind == Kind.RENAMED:
            self.ui.prompt_changed()

    def _answers_quiet_users(self, line):
        """Is this (part of) the answer to the /users the client sent by itself on joining?
        Then it is not shown. A version 1 server answers it as a message: 'Server: ok!' and
        'YOU SEND USERS /users', or 'Server: there are no other users!' when alone."""
        if line.kind == Kind.USERS:
            self.awaiting.popleft()
            self._learn_users(line)
            return True
        if line.kind == Kind.OK:
            return True   # version 1: the repeat of '/users' follows
        if (line.kind == Kind.OWN_MESSAGE and line.said == Lines.USERS_COMMAND
                or line.body == Lines.ALONE):
            self.awaiting.popleft()
            self.server_has_commands = False
            for waiting in self.awaiting:   # commands typed meanwhile are messages there too
                waiting.reply = Reply.ECHOED
            return True
        return False

    def _is_own(self, line):
        if line.kind in (Kind.OWN_MESSAGE, Kind.OWN_PRIVATE):
            return True
        return line.kind in (Kind.ACTION, Kind.RENAMED) and same_nick(line.nick, self.nick)

    def _learn_members(self, line):
        if line.kind == Kind.JOINED and not same_nick(line.nick, self.nick):
            self.members[line.nick.casefold()] = line.nick
        elif line.kind == Kind.LEFT:
            self.members.pop(line.nick.casefold(), None)
        elif line.kind == Kind.RENAMED:
            self.members.pop(line.nick.casefold(), None)
            if not same_nick(line.other, self.nick):
                self.members[line.other.casefold()] = line.other
        elif line.kind == Kind.RECENT:
            self.history_left = line.other

    def _learn_users(self, line):
        self.members = {nick.casefold(): nick for nick in users_listed(line.said, line.other)
                        if not same_nick(nick, self.nick)}

    def _mark_mention(self, line):
        if line.kind not in (Kind.MESSAGE, Kind.ACTION, Kind.PRIVATE):
            return
        from_history = self.history_left > 0 and line.kind != Kind.PRIVATE
        if from_history:
            self.history_left -= 1
        if line.own or same_nick(line.nick, self.nick):
            return
        line.mention = mentions(line.said, self.nick)
        line.bell = (line.mention or line.kind == Kind.PRIVATE) and not from_history


# ---------------------------------------------------------------------------------------------
# How lines look on a terminal: colours, mentions, wrapping.
# ---------------------------------------------------------------------------------------------

def render(raw):
    """Bytes of one line from the wire -> text that is safe to print on a terminal."""
    return CONTROL_CHARS.sub(_visible, raw.decode("utf-8", "replace"))


def _visible(match):
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7f:
        return "^?"
    return "\\x%02x" % code


def char_width(ch):
    """Columns a character takes on a terminal: 2 for wide (East Asian W/F), 0 for combining
    marks, else 1. Where terminals disagree this errs wide, which only ends a row early."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class Style:
    """SGR parameters."""
    TIME = "90"          # grey
    QUIET = "2"          # dim: the words between nicknames
    NOTICE = "33"        # the server's notices, and the client's own
    ERROR = "1;31"       # refusals: Sorry! ..., a nickname refused
    PRIVATE = "1;35"
    MENTION = "1;7"      # reverse video: visible in any palette
    OWN_TEXT = "1"


# Nickname colours: the same nickname gets the same colour in every client (crc32 of the
# casefolded name). Red is left out: it means an error here.
NICK_COLOURS = ("32", "33", "34", "35", "36", "92", "93", "94", "95", "96")


def nick_colour(nick):
    return NICK_COLOURS[zlib.crc32(nick.casefold().encode("utf-8")) % len(NICK_COLOURS)]


class Presenter:
    """Turns a ServerLine or a note of the client into the text to print.

    ``colour``: SGR colours. ``width``: a function giving the terminal's width now (asked for
    every line, so a resize re-wraps what comes next), or None for a pipe: no wrapping.
    ``vt``: the output understands escape sequences (autowrap is turned off while our rows are
    printed: a character whose width we guess wrong can't push text to column 0 of a new row).
    ``bell``: ring on a mention or a private message."""

    def __init__(self, colour=False, width=None, vt=False, bell=False):
        self.colour = colour
        self.width = width
        self.vt = vt
        self.bell = bell

    def line(self, line):
        spans = self._spans(line) if self.colour else [(line.text, "")]
        text = self._lay_out(spans, line.prefix_len or 2)
        if self.bell and line.bell:
            text += "\a"
        return text

    def note(self, text, style=Style.NOTICE):
        """The client's own words. Each line of ``text`` is laid out by itself, its rows
        indented two more than the line itself is (the fingerprints of a warning)."""
        style = style if self.colour else ""
        return "\n".join(self._lay_out([(part, style)], len(part) - len(part.lstrip(" ")) + 2)
                         for part in text.split("\n"))

    def _spans(self, line):
        spans = [(line.text[:line.prefix_len], Style.TIME)] if line.prefix_len else []
        spans += self._body_spans(line)
        if "".join(text for text, _ in spans) != line.text:  # never show other text
            return [(line.text, "")]
        return spans

    def _body_spans(self, line):
        kind, nick, said = line.kind, line.nick, line.said
        text_style = Style.MENTION if line.mention else (Style.OWN_TEXT if line.own else "")
        if kind == Kind.MESSAGE:
            return [(nick, "1;" + nick_colour(nick)), (" sent ", Style.QUIET), (said, text_style)]
        if kind == Kind.ACTION:
            return [("* ", Style.QUIET), (nick, "1;" + nick_colour(nick)),
                    (" " + said, text_style)]
        if kind == Kind.PRIVATE:
            return [("[private] ", Style.PRIVATE), (nick, "1;" + nick_colour(nick)),
                    (" sent ", Style.QUIET), (said, text_style)]
        if kind == Kind.OWN_MESSAGE:
            return [(Lines.OWN_MESSAGE, Style.QUIET), (said, text_style)]
        if kind == Kind.OWN_PRIVATE:
            return [("[private] ", Style.PRIVATE), ("YOU SEND ", Style.QUIET),
                    (nick, nick_colour(nick)), (" " + said, text_style)]
        if kind in (Kind.JOINED, Kind.LEFT):
            return [(nick, nick_colour(nick)), (line.body[len(nick):], Style.QUIET)]
        if kind == Kind.RENAMED:
            return [(nick, nick_colour(nick)), (" is now known as ", Style.QUIET),
                    (line.other, nick_colour(line.other))]
        if kind == Kind.ERROR:
            return [(line.body, Style.ERROR)]
        if kind == Kind.OTHER:
            return [(line.body, "")]
        return [(line.body, Style.NOTICE)]

    def _lay_out(self, spans, indent):
        width = self.width() if self.width else 0
        if width < 8:
            rows = [[(ch, style) for text, style in spans for ch in text]]
        else:
            # The last column stays free: a character one column wider than we think still
            # fits, and the terminal never wraps a row by itself.
            rows = wrap_cells(spans, width - 1, indent)
        text = "\n".join(self._row_text(row) for row in rows)
        if self.vt and width >= 8:
            text = "\x1b[?7l" + text + "\x1b[?7h"   # DECAWM off while our rows are printed
        return text

    def _row_text(self, cells):
        out = []
        style, run = None, []
        for ch, cell_style in cells + [(None, None)]:
            if cell_style != style or ch is None:
                if run:
                    text = "".join(run)
                    out.append("\x1b[%sm%s\x1b[0m" % (style, text) if style and self.colour
                               else text)
                style, run = cell_style, []
            if ch is not None:
                run.append(ch)
        return "".join(out)


def wrap_cells(spans, width, indent):
    """Lay styled text out in rows of at most ``width`` columns: break at the last space of
    the row when the word after it fits on the next row, else after the last colon when what
    follows it fits (a fingerprint 'AA:BB:...' breaks between its pairs), else anywhere; wide
    characters never straddle a row end. Every row after the first starts with ``indent``
    spaces (a hanging indent), so text that continues a line can never start at column 0 and
    pose as a line of its own. Tabs become spaces to the next multiple of 8. Returns rows as
    lists of (character, style)."""
    indent = max(1, min(indent, width // 3))
    rows, row, col = [], [], 0
    start = 0   # where the row's own text begins: after the indent, on continuation rows

    def last_break(breaker, next_width):
        """Where to cut the row at its last ``breaker`` (the space goes, a colon stays), and
        what moves down; None if there is none, or what follows it would not fit."""
        for i in range(len(row) - 1, start, -1):
            if row[i][0] == breaker:
                tail = row[i + 1:]
                if indent + sum(char_width(ch) for ch, _ in tail) + next_width <= width:
                    return (i if breaker == " " else i + 1), tail
                return None
        return None

    def break_before(next_width):
        nonlocal row, col, start
        cut, carried = (last_break(" ", next_width) or last_break(":", next_width)
                        or (len(row), []))   # nowhere to break: break right here
        rows.append(row[:cut])
        row = [(" ", "")] * indent + carried
        col = indent + sum(char_width(ch) for ch, _ in carried)
        start = indent

    for text, style in spans:
        for ch in text:
            for c in (" " * (8 - col % 8) if ch == "\t" else ch):
                w = char_width(c)
                if col + w > width:
                    break_before(w)
                row.append((c, style))
                col += w
    rows.append(row)
    return rows


def input_rows(text, width):
    """Rows that readline's display of ``text`` (prompt and input) takes at ``width`` columns.
    Errs low where unsure (zero-width characters): erasing a row too few leaves a stale row,
    one too many would erase a line of the conversation."""
    rows, col = 1, 0
    for ch in text:
        w = 0 if unicodedata.category(ch) in ("Mn", "Me", "Cf") else char_width(ch)
        if col + w > width:
            rows, col = rows + 1, 0
        col += w
    return rows


def cursor_row(text, width):
    """The row (from 0) where the cursor stands after ``text`` laid out at ``width``."""
    row, col = 0, 0
    for ch in text:
        w = char_width(ch)
        if col + w > width:
            row, col = row + 1, 0
        col += w
    return row + 1 if col >= width else row


def terminal_reflows(environ):
    """Does the terminal rewrap its rows when its width changes? Most do now (tmux, VTE,
    kitty, iTerm2, Windows Terminal); xterm (XTERM_VERSION), the Linux console and a dumb
    terminal (which moves no cursor for us anyway) don't."""
    return not environ.get("XTERM_VERSION") and environ.get("TERM") not in ("linux", "dumb")


def colour_wanted(choice, stream, environ):
    """--color: always, never, or auto: a terminal, NO_COLOR unset (or empty), TERM not dumb."""
    if choice != "auto":
        return choice == "always"
    return (stream_is_tty(stream) and not environ.get("NO_COLOR")
            and environ.get("TERM") != "dumb")


def stream_is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def enable_windows_vt():
    """Windows consoles understand escape sequences once asked to
    (ENABLE_VIRTUAL_TERMINAL_PROCESSING); False where that fails: then no colour at all."""
    if os.name != "nt":
        return True   # CHAT_PLATFORM=windows on another system: nothing to switch on
    try:
        import ctypes
        from ctypes import wintypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.GetStdHandle(-11)   # STD_OUTPUT_HANDLE
        mode = wintypes.DWORD()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        if mode.value & 4:                    # ENABLE_VIRTUAL_TERMINAL_PROCESSING
            return True
        return bool(kernel32.SetConsoleMode(handle, mode.value | 4))
    except (ImportError, OSError, AttributeError):
        return False


def terminal_width(stream):
    def width():
        try:
            return os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 0
    return width


# ---------------------------------------------------------------------------------------------
# Output and input.
# ---------------------------------------------------------------------------------------------

class LineOutput:
    """Prints lines as they come: a pipe, or a terminal without readline (a Windows console,
    a POSIX terminal whose Python has no GNU readline)."""

    can_rewrite = False   # what is printed stays: the console's own echo may be below it

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()

    def ask(self, question):
        self.stream.write(question)
        self.stream.flush()

    def close(self):
        pass


class LineSplitter:
    """Bytes in, complete lines (without \\n) out; keeps the incomplete tail."""

    def __init__(self):
        self.tail = b""

    def feed(self, data):
        lines = (self.tail + data).split(b"\n")
        self.tail = lines.pop()
        return lines

    def rest(self):
        tail, self.tail = self.tail, b""
        return [tail] if tail else []


def decode_input(raw):
    # surrogateescape: bytes of a pipe that are not UTF-8 go to the server as they came
    return raw.decode("utf-8", "surrogateescape")


def encode_line(text):
    try:
        return text.encode("utf-8", "surrogateescape") + b"\n"
    except UnicodeEncodeError:   # a lone surrogate from a console
        return text.encode("utf-8", "replace") + b"\n"


class FdInput:
    """Standard input read in the select loop as lines: a pipe, or a terminal without readline
    (there a password is read with echo turned off)."""

    def __init__(self, fd, tty=False, output=None):
        self.fd = fd
        self.tty = tty
        self.output = output
        self.splitter = LineSplitter()
        self.saved_mode = None   # the terminal's mode while echo is off for a password
        self.ended = False

    def fileno(self):
        return self.fd

    def read(self):
        """Lines typed since the last call; None for the end of input."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        if not data:
            self.end_secret()
            return [decode_input(line) for line in self.splitter.rest()] + [None]
        lines = [decode_input(line) for line in self.splitter.feed(data)]
        if lines and self.saved_mode is not None:
            self.output.ask("\n")   # Enter was not echoed either
        return lines

    def begin_secret(self, prompt):
        """Echo off until end_secret(): the password, and whatever is typed while the server
        checks it."""
        if not self.tty or self.saved_mode is not None:
            return
        import termios
        self.saved_mode = termios.tcgetattr(self.fd)
        quiet = list(self.saved_mode)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        self.output.ask(prompt)

    def end_secret(self):
        if self.saved_mode is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved_mode)
            self.saved_mode = None

    def close(self):
        self.end_secret()


class ThreadedInput:
    """Standard input read by a daemon thread, one line per request, for Windows (a console
    can't be selected) and for files select refuses. The loop asks for a line when it can use
    one; the answer comes through a queue, and a byte on a socketpair wakes the loop. Reading on
    request lets a Windows console read the password without echo (getpass) when asked."""

    def __init__(self, stream=None, console=False):
        self.stream = stream or sys.stdin
        self.console = console
        self.requests = queue.Queue()
        self.results = queue.Queue()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.outstanding = False
        self.ended = False
        threading.Thread(target=self._serve, name="stdin", daemon=True).start()

    def fileno(self):
        return self.wake_reader.fileno()

    def request(self, secret_prompt=None):
        if not self.outstanding and not self.ended:
            self.outstanding = True
            self.requests.put(secret_prompt)

    def begin_secret(self, prompt):
        self.request(prompt if self.console else None)

    def end_secret(self):
        pass   # getpass read the password alone, echo already back on

    def _serve(self):
        import getpass
        while True:
            secret_prompt = self.requests.get()
            try:
                if secret_prompt is not None:
                    line = getpass.getpass(secret_prompt) + "\n"
                else:
                    line = self.stream.readline()
            except (OSError, ValueError, EOFError, KeyboardInterrupt):
                line = ""   # stdin closed (or Ctrl-C in getpass): the end of input
            self.results.put(line)
            try:
                self.wake_writer.send(b"!")
            except OSError:
                return
            if not line:
                return

    def read(self):
        try:
            while self.wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass
        lines = []
        while True:
            try:
                line = self.results.get_nowait()
            except queue.Empty:
                return lines
            self.outstanding = False
            if not line:
                self.ended = True
                lines.append(None)
            else:
                lines.append(line[:-1] if line.endswith("\n") else line)

    def close(self):
        self.wake_reader.close()
        self.wake_writer.close()


# ---------------------------------------------------------------------------------------------
# GNU readline's callback interface, through ctypes.
# ---------------------------------------------------------------------------------------------

class Readline:
    """GNU readline's callback interface, from the library the ``readline`` module loaded.

    CPython's module offers no callback API, so the functions it lacks are bound with ctypes;
    ``load()`` returns None where anything is missing (no readline, libedit without them), and
    the client then reads plain lines instead."""

    NEEDED = ("rl_callback_handler_install", "rl_callback_read_char",
              "rl_callback_handler_remove", "rl_save_prompt", "rl_restore_prompt",
              "rl_replace_line", "rl_redisplay", "rl_forced_update_display", "rl_set_prompt",
              "rl_resize_terminal", "rl_get_screen_size", "rl_set_screen_size",
              "rl_cleanup_after_signal", "rl_reset_after_signal", "rl_echo_signal_char")

    @classmethod
    def load(cls):
        try:
            import ctypes
            import readline
            lib = ctypes.CDLL(readline.__file__)
            for name in cls.NEEDED + ("rl_point", "rl_line_buffer", "rl_catch_signals"):
                getattr(lib, name)
        except (ImportError, OSError, AttributeError):
            return None
        return cls(ctypes, readline, lib)

    def __init__(self, ctypes, readline, lib):
        self.ctypes = ctypes
        self.module = readline
        self.lib = lib
        lib.rl_callback_handler_install.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.rl_replace_line.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.rl_set_prompt.argtypes = [ctypes.c_char_p]
        lib.rl_echo_signal_char.argtypes = [ctypes.c_int]
        lib.rl_get_screen_size.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
        lib.rl_set_screen_size.argtypes = [ctypes.c_int, ctypes.c_int]
        self.point = ctypes.c_int.in_dll(lib, "rl_point")
        self.line_buffer = ctypes.c_char_p.in_dll(lib, "rl_line_buffer")
        # Signals are the loop's business (see TerminalSignals): Ctrl-C must reach Python as
        # KeyboardInterrupt, and readline must not act on SIGWINCH or SIGTSTP by itself.
        ctypes.c_int.in_dll(lib, "rl_catch_signals").value = 0
        self._set_int("rl_catch_sigwinch", 0)
        self._set_int("rl_erase_empty_line", 1)   # Enter on an empty line leaves no row
        self._free = ctypes.CDLL(None).free
        self._free.argtypes = [ctypes.c_void_p]
        self._callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        self._callback = None
        self.prompt = ""
        self.lines = []            # completed lines, None for end of input (Ctrl-D)
        self.keep_history = True
        self.replaces_echo = None  # line -> bool: erase the echoed input line?

    def _set_int(self, name, value):
        try:
            self.ctypes.c_int.in_dll(self.lib, name).value = value
        except ValueError:
            pass

    def set_completer(self, complete):
        module = self.module
        module.set_completer(complete)
        module.set_completer_delims(" \t\n")
        if "libedit" in (module.__doc__ or ""):
            module.parse_and_bind("bind ^I rl_complete")
        else:
            module.parse_and_bind("tab: complete")

    def install(self, prompt):
        self.prompt = prompt

        def on_line(pointer):
            # Runs inside rl_callback_read_char: an exception here would only be printed, so
            # nothing in it may raise.
            if pointer is None:
                self.lines.append(None)
                return
            raw = self.ctypes.string_at(pointer)
            self._free(pointer)  # readline hands the line over; it is ours to free
            line = raw.decode("utf-8", "replace")
            if self.keep_history and line.strip():
                # Here, not later: readline moves its history position to the end as soon as
                # this callback returns, and Up must find this line.
                self.module.add_history(line)
            try:
                if self.replaces_echo and self.replaces_echo(line):
                    self._erase_echo(line)
            except Exception:   # noqa: BLE001 -- cosmetic; never lose the line for it
                pass
            self.lines.append(line)
        self._callback = self._callback_type(on_line)  # kept referenced while installed
        self.lib.rl_callback_handler_install(prompt.encode(), self._callback)

    def _erase_echo(self, line):
        """After Enter readline leaves 'alice> hello' on screen and the cursor at the start of
        the next row: go up over those rows and clear them. The server's repeat of the line,
        timestamped and set apart, takes their place."""
        rows = input_rows(self.prompt + line, self.screen_width())
        sys.stdout.write("\x1b[%dA\r\x1b[J" % rows)
        sys.stdout.flush()

    def screen_width(self):
        rows, cols = self.ctypes.c_int(), self.ctypes.c_int()
        self.lib.rl_get_screen_size(self.ctypes.byref(rows), self.ctypes.byref(cols))
        return cols.value if cols.value > 0 else 80

    def read_char(self):
        self.lib.rl_callback_read_char()

    def take_lines(self):
        lines, self.lines = self.lines, []
        return lines

    def remove(self):
        self.lib.rl_callback_handler_remove()  # also puts the terminal back as it was

    def _blank_input(self):
        """Take the input off the screen (readline redraws it empty, without a prompt, which
        leaves the cursor at column 0 of its first row); returns what to put back."""
        saved = (self.line_buffer.value or b"", self.point.value)
        self.lib.rl_save_prompt()
        self.lib.rl_replace_line(b"", 0)
        self.lib.rl_redisplay()
        self.lib.rl_restore_prompt()
        return saved

    def _put_back(self, saved):
        line, point = saved
        self.lib.rl_replace_line(line, 0)
        self.point.value = point
        self.lib.rl_forced_update_display()   # prompt and input again, cursor where it was

    def print_above(self, text, replacing=0):
        """Print text above the prompt and redraw the prompt with the half-typed input. With
        ``replacing``, the text takes the place of that many rows right above the input."""
        saved = self._blank_input()
        if replacing:
            sys.stdout.write("\x1b[%dA\r\x1b[J" % replacing)
        sys.stdout.write("\r" + text + "\n")
        sys.stdout.flush()
        self._put_back(saved)

    def set_prompt(self, prompt, line=None):
        """A new prompt, the input kept (or replaced by ``line``, bytes)."""
        if prompt == self.prompt and line is None:
            return
        saved = self._blank_input()
        self.prompt = prompt
        self.lib.rl_set_prompt(prompt.encode())
        if line is not None:
            saved = (line, len(line))
        self._put_back(saved)

    def current_input(self):
        return (self.line_buffer.value or b"", self.point.value)

    # -- terminal signals -------------------------------------------------------------------
    def resized(self, reflows):
        """The terminal has a new size. Readline's own answer (rl_resize_terminal) assumes the
        rows already on screen stay as they were; terminals that reflow (tmux, VTE, kitty,
        Windows Terminal) rewrap the soft-wrapped input rows to the new width and move the
        cursor with its character. There the input now starts (cursor offset // new width)
        rows up: clear from there down and draw it again at the new width."""
        if not reflows:
            self.lib.rl_resize_terminal()
            return
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
        except OSError:
            return
        if size.columns <= 0:
            return
        line, point = self.current_input()
        before_cursor = self.prompt + line[:point].decode("utf-8", "replace")
        up = cursor_row(before_cursor, size.columns)
        sys.stdout.write(("\x1b[%dA" % up if up else "") + "\r\x1b[J")
        sys.stdout.flush()
        self.lib.rl_set_screen_size(size.lines, size.columns)
        self.lib.rl_forced_update_display()

    def suspend(self, signum):
        """Before stopping (Ctrl-Z): the terminal back to how the shell wants it."""
        self.lib.rl_echo_signal_char(signum)
        self.lib.rl_cleanup_after_signal()
        sys.stdout.flush()

    def resume(self, on_fresh_row):
        """After continuing: readline's terminal mode again, and the input redrawn."""
        self.lib.rl_reset_after_signal()
        if not on_fresh_row:
            sys.stdout.write("\r\n")
            sys.stdout.flush()
        self.lib.rl_forced_update_display()


class ReadlineTerminal:
    """A POSIX terminal with readline: output printed above the input line, the input line
    edited by readline, a password read without any echo, and the signals a terminal sends.

    ``vt``: the terminal understands escape sequences. A dumb one (TERM=dumb: Emacs' shell,
    some IDE consoles) gets none from us: readline itself draws there with carriage returns
    and spaces only, on one row that scrolls sideways, and nothing is erased upwards."""

    def __init__(self, readline, fd, vt=True):
        self.rl = readline
        self.fd = fd
        self.vt = vt
        self.can_rewrite = vt   # the rows printed last can be printed over
        self.secret = None          # bytes of a password being typed
        self.secret_saved = None    # the input line to give back after the password
        self._escape = False        # skipping an escape sequence (arrow keys) in a password
        self.ended = False

    def start(self, prompt):
        self.rl.install(prompt)

    def fileno(self):
        return self.fd

    def read(self):
        if self.secret is not None:
            return self._read_secret()
        self.rl.read_char()
        return self.rl.take_lines()

    def write(self, text):
        self.rl.print_above(text)

    def rewrite(self, text, rows):
        """Print ``text`` over the last ``rows`` rows printed (nothing came after them)."""
        self.rl.print_above(text, replacing=rows)

    def set_prompt(self, prompt):
        if self.secret is None:
            self.rl.set_prompt(prompt)

    def ask(self, question):
        self.rl.set_prompt(question)

    # -- a password: readline stays installed (its raw mode echoes nothing) but does not get
    #    the keys, so the password is never on screen nor in the history. So it stays until
    #    end_secret(), after the server has checked the password: what is typed meanwhile
    #    (the password again, perhaps) is not shown either.
    def begin_secret(self, prompt):
        if self.secret is not None:
            return
        self.secret_saved = self.rl.current_input()
        self.secret = bytearray()
        self.rl.set_prompt(prompt, line=b"")

    def _read_secret(self):
        try:
            data = os.read(self.fd, 1024)
        except (BlockingIOError, InterruptedError):
            return []
        if not data:
            return [None]
        lines = []
        for byte in data:
            if self._escape:
                self._escape = not (0x40 <= byte <= 0x7e and byte != ord("["))
                continue
            if byte == 0x1b:
                self._escape = True
            elif byte in (0x0d, 0x0a):                  # Enter
                lines.append(bytes(self.secret).decode("utf-8", "replace"))
                del self.secret[:]
            elif byte in (0x7f, 0x08):                  # Backspace: one character off
                while self.secret and (self.secret.pop() & 0xc0) == 0x80:
                    pass
            elif byte == 0x15:                          # Ctrl-U
                del self.secret[:]
            elif byte == 0x04 and not self.secret:      # Ctrl-D on nothing: leave
                return lines + [None]
            elif byte >= 0x20:
                self.secret.append(byte)
        return lines

    def end_secret(self):
        """Back to readline, with the input line as it was before the password."""
        if self.secret is None:
            return
        del self.secret[:]
        self.secret = None
        saved, self.secret_saved = self.secret_saved, None
        self.rl.set_prompt(self.rl.prompt, line=saved[0])

    def close(self):
        self.rl.remove()
        # Wipe the prompt readline redrew: the shell's comes next. (A dumb terminal: spaces
        # over the one row readline draws on.)
        sys.stdout.write("\r\x1b[K" if self.vt else "\r%s\r" % (" " * (self.rl.screen_width()
                                                                         - 1)))
        sys.stdout.flush()


class KilledBySignal(Exception):
    """SIGTERM or SIGHUP: the terminal is put back as it was, then the process dies of it."""

    def __init__(self, signum):
        Exception.__init__(self, signum)
        self.signum = signum


class TerminalSignals:
    """SIGWINCH, SIGTSTP, SIGCONT, SIGTERM and SIGHUP reach the select loop as bytes on a
    socketpair (signal.set_wakeup_fd): a Python handler may run in the middle of a redisplay,
    so the handlers do nothing and the loop acts between two events."""

    NAMES = ("SIGWINCH", "SIGTSTP", "SIGCONT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.old_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.old_handlers = {}
        for name in self.NAMES:
            number = getattr(signal, name)
            self.old_handlers[number] = signal.signal(number, self._wake_only)

    @staticmethod
    def _wake_only(signum, frame):
        pass

    def fileno(self):
        return self.reader.fileno()

    def received(self):
        numbers = []
        try:
            while True:
                data = self.reader.recv(256)
                if not data:
                    break
                numbers.extend(data)
        except (BlockingIOError, InterruptedError):
            pass
        return numbers

    def stop_self(self):
        """Stop as Ctrl-Z asks (the default action), and return once continued: whether we
        really stopped (a SIGCONT came; a process group without a shell is never stopped),
        and the other signals that came meanwhile."""
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)
        finally:
            signal.signal(signal.SIGTSTP, self._wake_only)
        # SIGCONT's handler ran before kill() returned: its byte is already here.
        others = self.received()
        stopped = signal.SIGCONT in others
        return stopped, [n for n in others if n not in (signal.SIGCONT, signal.SIGTSTP)]

    def close(self):
        signal.set_wakeup_fd(self.old_fd)
        for number, handler in self.old_handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.reader.close()
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# The connection: TCP, then TLS when asked, never blocking.
# ---------------------------------------------------------------------------------------------

class ConnectFailed(Exception):
    """No connection: ``reason`` says why; ``refused`` when nothing listens there."""

    def __init__(self, reason, refused=False):
        Exception.__init__(self, reason)
        self.reason = reason
        self.refused = refused


class ConnectionLost(Exception):
    pass


def format_address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def format_fingerprint(digest):
    """32 bytes -> 'AA:BB:...', as the server and `openssl x509 -fingerprint -sha256` print."""
    return ":".join("%02X" % byte for byte in digest)


def fingerprint_digits(text):
    """'aa:BB ...' -> 'AABB...' (colons, spaces and case ignored); None if not 64 hex digits."""
    digits = re.sub(r"[\s:]", "", text).upper()
    return digits if re.match(r"[0-9A-F]{64}\Z", digits) else None


_IN_PROGRESS = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY,
                10035}   # 10035: WSAEWOULDBLOCK, a non-blocking connect on Windows


class Connection:
    """One connection to the server, driven by the caller's selector.

    States: CONNECTING (TCP, each address in turn), HANDSHAKING (TLS), OPEN, CLOSED.
    ``events()`` says what to wait for; ``ready(mask)`` makes progress and returns what
    happened: 'open', bytes received, or b'' for the end.

    The socket stays plain and non-blocking; TLS runs in an ssl.SSLObject between two memory
    BIOs, and this class alone carries bytes between them and the socket. Every step is then
    explicit: TLS wanting more bytes (SSLWantReadError) means 'wait until readable'; all that
    TLS can decrypt is read out after each receive, so nothing waits inside it unseen by
    select; and a half-close sends close_notify without TLS reading the socket behind our
    back (SSLSocket.unwrap() does, and throws away application data already there: the
    server's last lines)."""

    CONNECTING, HANDSHAKING, OPEN, CLOSED = "connecting", "handshaking", "open", "closed"

    def __init__(self, host, port, tls_context=None):
        self.host = host
        self.address = format_address(host, port)
        self.tls_context = tls_context
        self.state = self.CONNECTING
        self.sock = None
        self.tls = None                # the SSLObject, once TCP is up
        # Bytearrays: appending is amortised O(1), and so is deleting what was sent from the
        # front. (bytes made each append copy all that was waiting: quadratic in a big pipe.)
        self.plain_out = bytearray()   # TLS: bytes to encrypt
        self.raw_out = bytearray()     # bytes for the kernel (encrypted, with TLS)
        self.reading = True            # False while the user decides whether to trust TLS
        self.received_any = False
        self.write_shut = False        # half-close asked; done once everything is sent
        self._shut_done = False
        self._peer_done = False        # TLS: the server's close_notify came first
        # Why sending failed. A send happens while the user's line is handled, where a loss
        # must not be raised: the loop takes it from here between two events.
        self.error = None
        try:
            self._candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ConnectFailed(getattr(exc, "strerror", None) or str(exc))
        self._last_error = None
        self._try_next_address()

    def __repr__(self):
        return "<Connection %s %s out=%d>" % (self.address, self.state,
                                              len(self.plain_out) + len(self.raw_out))

    @property
    def is_tls(self):
        return self.tls_context is not None

    @property
    def unsent(self):
        return len(self.plain_out) + len(self.raw_out)

    def _try_next_address(self):
        while self._candidates:
            family, kind, proto, _, sockaddr = self._candidates.pop(0)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                self._last_error = exc.errno
                continue
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
            if err == 0 or err in _IN_PROGRESS:
                self.sock = sock
                return
            sock.close()
            self._last_error = err
        err = self._last_error
        raise ConnectFailed(os.strerror(err) if err else "no address",
                            refused=err == errno.ECONNREFUSED)

    def events(self):
        if self.state == self.CONNECTING:
            return selectors.EVENT_WRITE
        if self.state == self.CLOSED:
            return 0
        reading = self.reading or self.state == self.HANDSHAKING
        return ((selectors.EVENT_READ if reading else 0)
                | (selectors.EVENT_WRITE if self.raw_out else 0))

    def ready(self, mask):
        if self.error:
            raise ConnectionLost(self.error)
        if self.state == self.CONNECTING:
            return self._connected()
        if mask & selectors.EVENT_WRITE:
            self._send_raw()
        if mask & selectors.EVENT_READ:
            return self._receive()
        return []

    def _connected(self):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.sock.close()
            self._last_error = err
            self._try_next_address()
            return []
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if not self.is_tls:
            self.state = self.OPEN
            return ["open"]
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.tls_context.wrap_bio(self.incoming, self.outgoing,
                                             server_hostname=self.host)
        self.state = self.HANDSHAKING
        return self._handshake()

    def _handshake(self):
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._move_tls_output()
            return []
        except ssl.SSLCertVerificationError as exc:
            raise ClientExit(1, Notes.TLS_NOT_VERIFIED.format(
                address=self.address, reason=clause(exc.verify_message or exc.reason)))
        except ssl.SSLError as exc:
            if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                              "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"):
                raise ClientExit(1, Notes.NOT_TLS.format(address=self.address))
            reason = exc.reason or ("connection closed" if isinstance(exc, ssl.SSLEOFError)
                                    else exc)
            raise ClientExit(1, Notes.TLS_FAILED.format(address=self.address,
                                                        reason=clause(reason)))
        self._move_tls_output()
        self.state = self.OPEN
        # The server's first line may have come with the handshake's last bytes.
        return ["open"] + self._decrypt()

    def fingerprint(self):
        return format_fingerprint(hashlib.sha256(self.tls.getpeercert(binary_form=True))
                                  .digest())

    def _receive(self):
        if self._peer_done:
            return [b""]
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if self.state == self.HANDSHAKING:
                raise ClientExit(1, Notes.TLS_FAILED.format(address=self.address,
                                                           reason=clause(reason)))
            raise ConnectionLost(reason)
        if self.tls is None:
            if data and not self.received_any and (
                    data[:1] in (b"\x15", b"\x16") and data[1:2] == b"\x03"   # a TLS record
                    or data.startswith(Lines.TLS_HINT.encode())):   # or a version 3 server's
                raise ClientExit(1, Notes.EXPECTS_TLS.format(address=self.address))
            self.received_any = self.received_any or bool(data)
            return [data]
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        if self.state == self.HANDSHAKING:
            return self._handshake()
        return self._decrypt()

    def _decrypt(self):
        """All that TLS can decrypt now: [bytes] and b'' last for the end."""
        data, ended = [], False
        while True:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True            # close_notify, or a bare FIN
                break
            except ssl.SSLError as exc:
                raise ConnectionLost(exc.reason or str(exc))
            if not chunk:
                ended = True
                break
            data.append(chunk)
        self._encrypt()                 # TLS may have a write of its own (key updates)
        events = [b"".join(data)] if data else []
        if data:
            self.received_any = True
        return events + ([b""] if ended else [])

    def send(self, data):
        if self.is_tls:
            self.plain_out += data
            if self.state == self.OPEN:
                self._encrypt()
        else:
            self.raw_out += data
            if self.state == self.OPEN:
                self._send_raw()

    def _encrypt(self):
        if self.plain_out:
            try:
                written = self.tls.write(self.plain_out)
            except ssl.SSLWantReadError:   # TLS 1.2 renegotiating: after the next read
                written = 0
            except ssl.SSLError as exc:
                self.error = exc.reason or str(exc)
                return
            del self.plain_out[:written]
        self._move_tls_output()

    def _move_tls_output(self):
        self.raw_out += self.outgoing.read()
        self._send_raw()

    def _send_raw(self):
        while self.raw_out:
            try:
                sent = self.sock.send(self.raw_out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error = exc.strerror or str(exc) or type(exc).__name__
                del self.raw_out[:]
                return
            del self.raw_out[:sent]
        if self.write_shut and not self._shut_done and not self.plain_out:
            self._shut_write()

    def _shut_write(self):
        """Half-close, keeping the reading side for the server's last lines: TCP's FIN, or
        with TLS its close_notify (a bare FIN makes an OpenSSL server answer at once with a
        fatal alert, and its last lines are lost)."""
        self._shut_done = True
        if not self.is_tls:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        try:
            self.tls.unwrap()   # close_notify, then 'wait for the server's': SSLWantReadError
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass
        else:
            self._peer_done = True
        self._move_tls_output()

    def half_close(self):
        self.write_shut = True
        if self.state == self.OPEN:
            self._send_raw()

    def close(self):
        self.state = self.CLOSED
        if self.sock is not None:
            self.sock.close()


class KnownServers:
    """host:port -> certificate fingerprint, one 'address fingerprint' per line, like
    OpenSSH's known_hosts. Lines are numbered from 1 so a warning can name the one to remove."""

    def __init__(self, path):
        self.path = path

    def lookup(self, address):
        """(line number, fingerprint) of ``address``, or None."""
        try:
            with open(self.path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    fields = line.split()
                    if len(fields) >= 2 and fields[0] == address:
                        return number, fields[1]
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError) as exc:
            raise ClientExit(1, "Cannot read %s: %s." % (self.path,
                                                         getattr(exc, "strerror", exc)))
        return None

    def remember(self, address, fingerprint):
        try:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, mode=0o700, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("%s %s\n" % (address, fingerprint))
        except OSError as exc:
            raise ClientExit(1, "Cannot write %s: %s." % (self.path, exc.strerror or exc))


def default_known_servers():
    if platform_name() == "windows":
        base = os.environ.get("APPDATA") or os.path.expanduser("~")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".config")
    return os.path.join(base, "chat_client", "known_servers")


class Backoff:
    """Seconds to wait before each reconnect attempt: 1, 2, 4, 8, 16, then 30 each time."""

    def __init__(self, delays=RECONNECT_DELAYS):
        self.delays = delays
        self.attempt = 0

    def next(self):
        delay = self.delays[min(self.attempt, len(self.delays) - 1)]
        self.attempt += 1
        return delay

    def reset(self):
        self.attempt = 0


# ---------------------------------------------------------------------------------------------
# The client: one selectors loop.
# ---------------------------------------------------------------------------------------------

def platform_name():
    """'windows' or 'posix'. CHAT_PLATFORM=windows lets the tests run the Windows paths on Linux."""
    forced = os.environ.get("CHAT_PLATFORM")
    if forced in ("windows", "posix"):
        return forced
    return "windows" if os.name == "nt" else "posix"


class Client:
    """The connection, standard input and (on a POSIX terminal) signals in one selectors loop,
    with the Session deciding what the lines mean. It is the session's ``ui``."""

    def __init__(self, options, output, user_input, presenter, interactive, signals=None):
        self.options = options
        self.output = output
        self.input = user_input
        self.presenter = presenter
        self.interactive = interactive
        self.signals = signals
        self.readline = getattr(output, "rl", None)
        self.session = Session(self, nick=options.nick, password=options.password,
                               interactive=interactive,
                               reconnect=interactive and options.reconnect,
                               list_users=self.readline is not None,
                               erases_echo=self.readline is not None and presenter.vt)
        self.selector = selectors.DefaultSelector()
        self.watched = {}              # fd -> (mask, handler)
        self.connection = None
        self.incoming = LineSplitter()
        self.backoff = Backoff()
        self.connect_deadline = self.probe_at = self.reconnect_at = None
        self.question = None           # answers the next typed line (trusting a certificate)
        # Rows of the reconnect status while it is the last thing printed above the input
        # (0: it is not): the next attempt's status then takes its place.
        self.status_rows = 0
        self.known = KnownServers(options.known_servers)

    # -- the loop -------------------------------------------------------------------------
    def run(self):
        try:
            if self.readline:
                self.readline.replaces_echo = self.session.replaces_echo
                self.readline.set_completer(self._complete)
                self.output.start(self.session.prompt())
            self._open_connection()
            while True:
                self._watch()
                for key, mask in self.selector.select(self._timeout()):
                    key.data(mask)
                if self.connection is not None and self.connection.error:
                    self._lost(Notes.CONNECTION_LOST.format(
                        reason=clause(self.connection.error)))
                self._run_timers()
        finally:
            self._close()

    def _watch(self):
        """Register with the selector what should be watched now, and nothing else."""
        wanted = {}
        conn = self.connection
        if conn is not None and conn.events():
            wanted[conn.sock.fileno()] = (conn.events(), self._on_connection, conn.sock)
        if self._input_welcome():
            wanted[self.input.fileno()] = (selectors.EVENT_READ, self._on_input, self.input)
        if self.signals is not None:
            wanted[self.signals.fileno()] = (selectors.EVENT_READ, self._on_signals,
                                             self.signals)
        for fd, watch in list(self.watched.items()):
            # A closed socket's number may come back for the next one: compare owners too.
            if fd not in wanted or wanted[fd][2] is not watch[2]:
                self.selector.unregister(fd)
                del self.watched[fd]
        for fd, (mask, handler, owner) in wanted.items():
            if fd not in self.watched:
                self.selector.register(fd, mask, handler)
            elif self.watched[fd][:2] != (mask, handler):
                self.selector.modify(fd, mask, handler)
            self.watched[fd] = (mask, handler, owner)

    def _input_welcome(self):
        """Should standard input be read now? Not while MAX_UNSENT bytes of it wait to be sent:
        a pipe faster than the server then waits in the pipe, not in our memory."""
        if isinstance(self.input, ThreadedInput):
            if self.question is not None or (self.session.wants_input()
                                             and not self._input_backlogged()):
                self.input.request()
            return True   # its socketpair: answers to requests, and the end of input
        return not self.input.ended and not self._input_backlogged()

    def _input_backlogged(self):
        unsent = self.connection.unsent if self.connection is not None else 0
        return unsent + sum(len(line) for line in self.session.held) >= MAX_UNSENT

    def _timeout(self):
        deadlines = [t for t in (self.connect_deadline, self.probe_at, self.reconnect_at)
                     if t is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if isinstance(self.input, ThreadedInput):
            # Windows' select can't be interrupted by Ctrl-C: wake up to let it through.
            timeout = THREAD_POLL if timeout is None else min(timeout, THREAD_POLL)
        return timeout

    def _run_timers(self):
        now = time.monotonic()
        if self.connect_deadline is not None and now >= self.connect_deadline:
            self.connect_deadline = None
            self._connect_failed(ConnectFailed("timed out"))
        if self.probe_at is not None and now >= self.probe_at:
            self.probe_at = None
            if self.connection is not None and not self.connection.received_any:
                self.connection.send(PLAIN_PROBE)
        if self.reconnect_at is not None and now >= self.reconnect_at:
            self.reconnect_at = None
            self._open_connection()

    def _close(self):
        self._drop_connection()
        closing_order = (self.output, self.input, self.signals)
        for i, closing in enumerate(closing_order):
            if closing is not None and closing not in closing_order[:i]:
                try:
                    closing.close()
                except OSError:
                    pass
        self.selector.close()

    # -- the connection -------------------------------------------------------------------
    def _open_connection(self):
        self.incoming = LineSplitter()
        try:
            self.connection = Connection(self.options.host, self.options.port,
                                         self.options.tls_context)
        except ConnectFailed as failure:
            self._connect_failed(failure)
            return
        self.connect_deadline = time.monotonic() + CONNECT_TIMEOUT

    def _drop_connection(self):
        conn, self.connection = self.connection, None
        self.connect_deadline = self.probe_at = None
        if conn is not None:
            fd = conn.sock.fileno() if conn.sock is not None else -1
            if fd in self.watched:
                self.selector.unregister(fd)
                del self.watched[fd]
            conn.close()

    def _connect_failed(self, failure):
        address = self.connection.address if self.connection else format_address(
            self.options.host, self.options.port)
        self._drop_connection()
        if self.session.phase == Phase.OFFLINE:
            self._schedule_reconnect()
            return
        message = Notes.CANNOT_CONNECT.format(address=address, reason=clause(failure.reason))
        raise ClientExit(1, message + (Notes.REFUSED_HINT if failure.refused else ""))

    def _schedule_reconnect(self):
        delay = self.backoff.next()
        self.reconnect_at = time.monotonic() + delay
        self._show_reconnecting(delay)

    def _show_reconnecting(self, delay):
        """One status line per outage, not one per attempt: where the terminal can, each
        attempt's status replaces the last one's (while nothing came below it); elsewhere
        the first attempt's is all that is said."""
        template = (Notes.RECONNECTING_AFTER_SHUTDOWN if self.session.farewell
                    else Notes.RECONNECTING)
        text = self.presenter.note(template.format(delay=delay))
        self._signals_first()   # (a resize forgets the status's rows)
        if self.status_rows and self.output.can_rewrite:
            self.output.rewrite(text, self.status_rows)
        elif self.backoff.attempt == 1 or self.output.can_rewrite:
            self.output.write(text)
        else:
            return
        self.status_rows = text.count("\n") + 1
    def _on_connection(self, mask):
        conn = self.connection
        if conn is None:   # dropped by an earlier event of the same turn
            return
        try:
            events = conn.ready(mask)
        except ConnectFailed as failure:
            self._connect_failed(failure)
            return
        except ConnectionLost as lost:
            self._lost(Notes.CONNECTION_LOST.format(reason=clause(lost)))
            return
        for event in events:
            if event == "open":
                self._opened()
            elif event:
                self.probe_at = None
                for line in self.incoming.feed(event):
                    self.session.server_line(render(line))
                    if self.connection is not conn:
                        return
            else:
                for line in self.incoming.rest():
                    self.session.server_line(render(line))
                self._lost(None)
                return

    def _opened(self):
        self.connect_deadline = None
        if self.connection.is_tls:
            self._check_certificate()
        else:
            self.probe_at = time.monotonic() + PLAIN_PROBE_AFTER
            self.session.connected()

    def _lost(self, reason):
        conn = self.connection
        if reason is None and conn is not None and not conn.is_tls and not conn.received_any:
            # Closed without a word in plain text: a TLS server refusing us. A verdict, not a
            # loss, even when reconnecting: every attempt would meet the same server.
            raise ClientExit(1, Notes.EXPECTS_TLS.format(address=conn.address))
        self._drop_connection()
        self.session.connection_closed(reason)   # raises ClientExit unless reconnecting
        self._schedule_reconnect()

    # -- TLS trust --------------------------------------------------------------------------
    def _check_certificate(self):
        conn, options = self.connection, self.options
        actual = conn.fingerprint()
        if options.tls_fingerprint:
            if actual.replace(":", "") != options.tls_fingerprint:
                raise ClientExit(1, Notes.TLS_PIN_MISMATCH.format(
                    address=conn.address, actual=actual,
                    pinned=format_fingerprint(bytes.fromhex(options.tls_fingerprint))))
        elif not options.tls_ca:
            known = self.known.lookup(conn.address)
            if known is not None and known[1].upper() != actual:
                raise ClientExit(1, Notes.TLS_CHANGED.format(
                    address=conn.address, known=known[1], actual=actual, line=known[0],
                    path=self.known.path))
            if known is None:
                self._ask_trust(actual)
                return
        self.session.connected()

    def _ask_trust(self, actual):
        conn = self.connection
        if not self.interactive:
            raise ClientExit(1, Notes.TLS_UNKNOWN_IN_PIPE.format(address=conn.address,
                                                                 actual=actual))
        conn.reading = False   # the server's lines wait in the kernel until this is answered
        self.note(Notes.TLS_FIRST_USE.format(address=conn.address, actual=actual))
        if self.readline:
            self.readline.keep_history = False

        def answer(text):
            self.question = None
            if self.readline:
                self.readline.keep_history = True
            if text.strip().lower() not in ("y", "yes"):
                raise ClientExit(1, Notes.TLS_NOT_TRUSTED.format(address=conn.address))
            self.known.remember(conn.address, actual)
            self.note(Notes.TLS_REMEMBERED.format(path=self.known.path))
            conn.reading = True
            self.session.connected()
        self.question = answer
        self.output.ask(Notes.TRUST_PROMPT)

    # -- standard input -------------------------------------------------------------------
    def _on_input(self, mask):
        for line in self.input.read():
            if line is None:
                self._input_ended()
                return
            if self.question is not None:
                self.question(line)
            else:
                self.session.typed(line)

    def _input_ended(self):
        self.input.ended = True
        if self.interactive:
            raise ClientExit(0)   # Ctrl-D: the user leaves
        self.session.input_ended()

    def _complete(self, text, state):
        import readline
        first_word = not readline.get_line_buffer()[:readline.get_begidx()].strip()
        matches = self.session.completions(text, first_word)
        return matches[state] if state < len(matches) else None

    # -- signals (POSIX terminal) -------------------------------------------------------------
    def _on_signals(self, mask):
        pending = self.signals.received()
        if pending:
            self.status_rows = 0   # rows may have moved (a resize, the shell's lines after ^Z)
        while pending:
            number = pending.pop(0)
            if number == signal.SIGWINCH:
                self.readline.resized(terminal_reflows(os.environ))
            elif number == signal.SIGTSTP:
                self.readline.suspend(number)
                stopped, others = self.signals.stop_self()
                self.readline.resume(on_fresh_row=stopped)
                pending.extend(others)
            elif number == signal.SIGCONT:
                # Stopped from outside (SIGSTOP): the shell may have put the terminal back in
                # cooked mode meanwhile. Set readline's mode again.
                self.readline.suspend(0)
                self.readline.resume(on_fresh_row=False)
            elif number in (signal.SIGTERM, signal.SIGHUP):
                raise KilledBySignal(number)

    # -- what the session asks ------------------------------------------------------------
    def send(self, text):
        if self.connection is not None:
            self.connection.send(encode_line(text))

    def show(self, line):
        self._signals_first()
        self.output.write(self.presenter.line(line))
        self.status_rows = 0

    def note(self, text, style=Style.NOTICE):
        self._signals_first()
        self.output.write(self.presenter.note(text, style))
        self.status_rows = 0

    def show_typed(self, text):
        """An input line the terminal erased, shown again as it stood: the server refused it
        instead of repeating it."""
        self.note(CONTROL_CHARS.sub(_visible, text), style="")

    def _signals_first(self):
        """A resize that came with this line must be handled before it is printed: the
        terminal has already rewrapped the input rows, and readline's idea of them must match
        before it clears them to print above."""
        if self.signals is not None:
            self._on_signals(selectors.EVENT_READ)

    def prompt_changed(self):
        if self.question is not None:
            return
        if not self.session.hides_input():
            self.input.end_secret()   # the password is checked: typing shows again
        if self.readline is None:
            # Without readline there is no prompt line to keep drawn under the output, but a
            # terminal must still say when it wants a nickname (the password: getpass says it).
            if self.interactive and self.session.waits_for_nickname():
                self.output.ask(Notes.NICKNAME_PROMPT)
            return
        self.output.set_prompt(self.session.prompt())

    def ask_password(self):
        self.input.begin_secret(Notes.PASSWORD_PROMPT)

    def half_close(self):
        if self.connection is not None:
            self.connection.half_close()

    def joined(self):
        self.backoff.reset()


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr naming the option, exit status 2, in the server's
    form: "chat_client: error: --port: 'abc' is not a port number (1 to 65535) (see --help)"."""

    def error(self, message):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def port_number(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (1 to 65535)" % text)
    return value


def nickname(text):
    if not text.strip() or CONTROL_CHARS.search(text):
        raise argparse.ArgumentTypeError("%r is not a nickname (letters and digits)" % text)
    return text


def fingerprint(text):
    digits = fingerprint_digits(text)
    if digits is None:
        raise argparse.ArgumentTypeError(
            "%r is not a SHA-256 fingerprint (64 hex digits, colons allowed)" % text)
    return digits


def parse_args(argv):
    parser = OneLineParser(prog="chat_client",
                           description="Terminal client for the console chat.")
    parser.add_argument("--version", action="version", version="chat_client " + VERSION)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="server address (default %(default)s)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="server port (default %(default)s)")
    parser.add_argument("--nick", type=nickname, metavar="NAME",
                        help="join with this nickname (on a terminal, asked again if refused)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="the chat's password: the first line of this file "
                             "(or set CHAT_PASSWORD)")
    parser.add_argument("--tls", action="store_true", help="speak TLS to the server")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="verify the server's certificate with these CA certificates "
                             "(chain and host name; implies --tls)")
    parser.add_argument("--tls-fingerprint", type=fingerprint, metavar="HEX",
                        help="accept only a certificate with this SHA-256 fingerprint "
                             "(implies --tls)")
    parser.add_argument("--known-servers", metavar="PATH",
                        help="the file of trusted certificate fingerprints (default %s)"
                             % default_known_servers().replace("%", "%%"))
    parser.add_argument("--color", default="auto",
                        choices=("auto", "always", "never"),
                        help="colours: auto (a terminal, NO_COLOR unset), always, never")
    parser.add_argument("--no-bell", action="store_true",
                        help="no bell when your nickname is mentioned or a private message "
                             "comes")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="on a terminal, end when the connection is lost instead of "
                             "reconnecting")
    return parser.parse_args(argv)


class Options:
    """What the command line and the environment ask for, checked."""

    def __init__(self, args, environ):
        self.host = args.host
        self.port = args.port
        self.nick = args.nick
        self.password = self._password(args.password_file, environ)
        self.tls_fingerprint = args.tls_fingerprint
        self.tls_ca = args.tls_ca
        self.tls_context = None
        if args.tls or args.tls_ca or args.tls_fingerprint:
            self.tls_context = self._tls_context(args.tls_ca)
        self.known_servers = args.known_servers or default_known_servers()
        self.color = args.color
        self.bell = not args.no_bell
        self.reconnect = not args.no_reconnect

    @staticmethod
    def _password(path, environ):
        if path is None:
            return environ.get("CHAT_PASSWORD")
        try:
            with open(path, "rb") as f:
                first = f.readline()
        except OSError as exc:   # not a usage error: the option was right, the file is not
            raise ClientExit(1, "chat_client: --password-file: cannot read %s: %s"
                             % (path, exc.strerror or exc))
        # A UTF-8 byte order mark is not part of the password: PowerShell 5 writes one
        # (Set-Content -Encoding UTF8), and the server reads the same file as utf-8-sig.
        if first.startswith(codecs.BOM_UTF8):
            first = first[len(codecs.BOM_UTF8):]
        return decode_input(first.rstrip(b"\r\n"))

    @staticmethod
    def _tls_context(ca_file):
        if ssl is None:
            raise ClientExit(1, "chat_client: " + Notes.NO_SSL)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if ca_file:
            try:
                context.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:   # ssl.SSLError: no certificate in it
                raise ClientExit(1, "chat_client: --tls-ca: cannot load %s: %s"
                                 % (ca_file, os_error_text(exc)))
        else:
            # Checked by fingerprint instead (pinned, or trusted on first use).
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def os_error_text(exc):
    """An OSError (ssl.SSLError included) as words: 'No such file or directory', 'no
    certificate or crl found', without the library's codes and source lines."""
    if isinstance(exc, ssl.SSLError) if ssl is not None else False:
        text = str(exc.args[1] if len(exc.args) > 1 else exc)
        return re.sub(r" \(_ssl\.c:\d+\)\Z", "", re.sub(r"\A\[[^\]]*\] ", "", text))
    return exc.strerror or str(exc)


def stdin_is_selectable():
    if platform_name() == "windows":
        return False
    try:
        selector = selectors.DefaultSelector()
        try:
            selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
        finally:
            selector.close()
        return True
    except (ValueError, OSError, AttributeError):
        return False  # no stdin, or a file epoll refuses (a regular file): use the thread


def make_client(options, environ):
    """Pick the pieces for where we run: a terminal or a pipe, POSIX or Windows."""
    stdout_tty = stream_is_tty(sys.stdout)
    interactive = stream_is_tty(sys.stdin) and stdout_tty
    windows = platform_name() == "windows"
    vt = stdout_tty and environ.get("TERM") != "dumb" and (enable_windows_vt() if windows
                                                          else True)
    colour = colour_wanted(options.color, sys.stdout, environ) and (vt or not stdout_tty)
    presenter = Presenter(colour=colour, width=terminal_width(sys.stdout) if stdout_tty else None,
                          vt=vt, bell=stdout_tty and options.bell)
    selectable = stdin_is_selectable()
    readline = Readline.load() if interactive and selectable else None
    if readline is not None:
        terminal = ReadlineTerminal(readline, sys.stdin.fileno(), vt=vt)
        return Client(options, terminal, terminal, presenter, interactive, TerminalSignals())
    output = LineOutput()
    if selectable:
        user_input = FdInput(sys.stdin.fileno(), tty=interactive, output=output)
    else:
        user_input = ThreadedInput(sys.stdin, console=interactive)
    return Client(options, output, user_input, presenter, interactive)


def configure_stdio():
    """UTF-8 on standard input, output and error unless they are a console, as on the wire.

    A pipe or a file on Windows uses the ANSI code page (cp1252 and the like), so piped Cyrillic
    was sent as mojibake and printed as '????'. A console (or a POSIX terminal) keeps the
    encoding Python chose for it: on Windows that is the console's own Unicode I/O. A character
    that cannot be shown becomes '?' instead of ending the client; invalid UTF-8 piped in, U+FFFD.
    Standard error too: the last words can hold a nickname, a path or the system's own words.
    """
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            if stream.isatty():
                if stream is not sys.stdin:
                    stream.reconfigure(errors="replace")
            else:
                stream.reconfigure(encoding="utf-8", errors="replace")
        except (AttributeError, ValueError, OSError):
            pass  # no such stream (pythonw), or one replaced by something that is not text I/O


def last_words(message):
    """Why the client ends, for standard error: on a terminal wrapped to its width at spaces
    (a fingerprint between its pairs), as a note is; elsewhere as it is."""
    if not stream_is_tty(sys.stderr):
        return message
    return Presenter(width=terminal_width(sys.stderr)).note(message)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_stdio()
    try:
        make_client(Options(args, os.environ), os.environ).run()
    except ClientExit as done:
        if done.message:
            sys.stderr.write(last_words(done.message) + "\n")
            sys.stderr.flush()
        return done.status
    except KeyboardInterrupt:
        return 0  # Ctrl-C: leave quietly
    except KilledBySignal as killed:
        # The terminal is restored (run() cleaned up): now die of the signal, as without us.
        signal.signal(killed.signum, signal.SIG_DFL)
        os.kill(os.getpid(), killed.signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
