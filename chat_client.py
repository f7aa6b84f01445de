#!/usr/bin/env python3
"""Terminal client for the console chat (chat_server.py, or any server of docs/PROTOCOL.md).

How it is built, top to bottom:

* ``Lines`` and ``ServerLine``: the protocol's strings in one place (copies of chat_server.Lines,
  under the same names: each .pyz holds one module), each a template that ``shape()`` makes a
  pattern, and a line from the server taken apart (timestamp, kind, nickname, room, text).
* ``COMMANDS``: every command of protocol version 3 as a ``Command`` record: its names, whether
  operators only may use it, what the server owes for it (an ok, the line that repeats it, a
  list), what Tab completes after it, and whether it carries a password. Tab completion and the
  session's matching of answers to lines both read this one table.
* ``Session``: the client's side of the protocol as explicit phases (CONNECTING, PASSWORD,
  NICKNAME, JOINING, NICK_PASSWORD, MEMBER, OFFLINE, ...). It gets the server's lines and the
  lines the user typed, and decides what to send, what to show and when the client ends; it
  knows the room, the members, the rooms, which lines the server has not answered yet (so that
  none is lost in silence when a connection dies) and a long paste's pace. No sockets, no
  terminal, no clock: the tests drive it in memory.
* ``Presenter``: how a line looks on a terminal: nicknames in colours of their own, your own
  lines and the server's notices set apart, mentions highlighted, what was said before you came
  dimmed, long lines wrapped to the width with a hanging indent so that no text of a message can
  pose as a line of its own. Pipes get the server's lines exactly as they are.
* Terminals and inputs: on POSIX terminals GNU readline's callback interface (bound with ctypes)
  edits the input line inside the select loop; pipes are read as lines; on Windows (and for files
  select can't watch) a thread reads standard input and wakes the loop through a socketpair.
* ``Connection``: TCP (with keepalive), then TLS when asked, never blocking: the handshake, reads
  and writes are driven by the selector, and bytes TLS already decrypted (``pending()``) are
  drained.
* ``LoginTokens``: the login tokens /token gets, in a JSON file of their own (readable by the
  user only, replaced whole), which answer a registered nickname's password question.
* ``Client``: one selectors loop over the connection, the input and (POSIX terminals) the
  signals; timers for connecting, reconnecting (to the next server, when there are several), the
  plain-text probe, the answer the server owes, a nickname held by a lost connection, and
  returns to sum up.
* The command line: options, the environment (CHAT_SERVER, CHAT_NICK, the passwords) and the
  settings file, the command line winning.

Whatever the server sends is made harmless before it reaches the screen: invalid UTF-8 becomes
U+FFFD, control characters are shown as ^X, so no escape sequence from the wire reaches the
terminal. Standard library only, Python 3.8 or newer: zipped alone into chat_client.pyz.
"""

import argparse
import bisect
import codecs
import errno
import hashlib
import json
import os
import queue
import re
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
import unicodedata
import zlib
from collections import deque

try:
    import ssl
except ImportError:  # some minimal Python builds have no ssl: only --tls needs it
    ssl = None

VERSION = "3.0.0"

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
    """What the server says: the client's copies of chat_server.Lines, under the same names
    (the server's module can't be imported: each .pyz holds one module). A ``{field}`` is a
    part that varies; ``shape()`` makes each template a pattern. Lines without a timestamp are
    the greeting, the password prompt and the TLS hint; every other line starts with '{ts}: '."""

    # Without a timestamp
    WELCOME = "Wellcome! Please enter your nickname"
    PASSWORD_PROMPT = "This chat is protected. Please enter the password"
    TLS_HINT = "This server speaks TLS: use chat_client --tls, or openssl s_client."
    # Version 1 and 2
    OK = "Server: ok!"
    ALONE = "Server: there are no other users!"
    GOODBYE = "Goodbye!"
    SHUTTING_DOWN = "Server is shutting down."
    FULL = "Sorry! The chat is full."
    JOIN_TIMEOUT = "Sorry! You took too long to choose a nickname."
    WRONG_PASSWORD = "Sorry! Wrong password."
    LOCKED_OUT = "Sorry! Too many wrong passwords. Try again later."
    NICK_BUSY = '"{nick}" is already busy.'
    ECHO = "YOU SEND USERS {message}"
    SENT = "{nick} sent {message}"
    ACTION = "* {nick} {text}"
    PRIVATE_SENT = "[private] {nick} sent {text}"
    PRIVATE_ECHO = "[private] YOU SEND {target} {text}"
    CONNECTED = "{nick} connected!"
    DISCONNECTED = "{nick} disconnected!"
    RENAMED = "{old} is now known as {new}"
    USERS = "Users ({count}): {nicks}"
    HISTORY = "Recent messages ({count}):"
    UNKNOWN_COMMAND = 'Sorry! Unknown command "/{name}". Type /help for the list.'
    # Version 3: rooms
    IN_ROOM_NOW = "You are in {room} now ({count} users)."
    LEFT_FOR = "{nick} left for {room}."
    JOINED_ROOM = "{nick} joined {room}."
    ROOMS = "Rooms ({count}): {rooms}"
    TOPIC = "Topic of {room}: {topic}"
    NO_TOPIC = "{room} has no topic."
    TOPIC_SET = "{nick} set the topic of {room}: {topic}"
    TOPIC_CLEARED = "{nick} cleared the topic of {room}."
    ROOM_CLOSED = "{room} was closed by {op}."
    # Version 3: what was kept
    CATCH_UP = "Messages since you left ({count}):"
    CATCH_UP_SOME = "Messages since you left ({shown} of {count}):"
    WAITING = "Private messages while you were away ({count}):"
    SEARCH_FOUND = 'Found {count} messages with "{text}" in {room}:'
    SEARCH_FOUND_MANY = 'Found {count} messages with "{text}" in {room}; the last {shown}:'
    SEARCH_NONE = 'No messages with "{text}" in {room}.'
    OFFLINE = "{target} is offline; they will get it when they join."
    # Version 3: accounts
    NICK_PASSWORD_PROMPT = '"{nick}" is registered. Please enter its password'
    WRONG_NICK_PASSWORD = 'Sorry! Wrong password for "{nick}".'
    REGISTERED = ('"{nick}" is registered to you. Next time you join with it you will be asked'
                  ' for its password.')
    UNREGISTERED = '"{nick}" is no longer registered.'
    LOGIN_TOKEN = 'Login token for "{nick}": {token}'
    REPLACED = "You joined from somewhere else."
    # Version 3: moderation
    KICKED = "You were kicked by {op}."
    KICKED_FOR = "You were kicked by {op}: {reason}"
    BANNED = "You were banned by {op}."
    BANNED_FOR = "You were banned by {op}: {reason}"
    WAS_KICKED = "{nick} was kicked by {op}."
    WAS_KICKED_FOR = "{nick} was kicked by {op}: {reason}"
    WAS_BANNED = "{nick} was banned by {op}."
    WAS_BANNED_FOR = "{nick} was banned by {op}: {reason}"
    ADDRESS_BANNED = "Sorry! You are banned."
    ADDRESS_BANNED_UNTIL = "Sorry! You are banned until {until}."
    BANS = "Bans ({count}): {entries}"
    NO_BANS = "Bans (0)."
    # Version 3: a cluster and small refusals
    PAUSED = "The chat is paused: this server can't reach the others."
    BACK = "The chat is back."
    PAUSED_JOIN = "Sorry! The chat is paused. Try again in a moment."
    PASSWORD_TIMEOUT = "Sorry! You took too long to give the password."

    # The client's own use of them
    # Refusals after which the server closes the connection: the client ends (status 1).
    FINAL_REFUSALS = (FULL, JOIN_TIMEOUT, PASSWORD_TIMEOUT, WRONG_PASSWORD, LOCKED_OUT, REPLACED)
    ERROR_PREFIXES = ("Sorry! ", "Your nickname must ")
    HELP_START = "Commands: "           # the start of the answer to /help
    TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d): ")


# What the fields of a template may hold. A nickname is str.isalnum(): word characters but the
# underscore; a room is # and letters, digits, - or _; any other field is any text.
_NICK_CHARS = r"[^\W_]+"
_FIELD_PATTERNS = {"nick": _NICK_CHARS, "old": _NICK_CHARS, "new": _NICK_CHARS,
                   "target": _NICK_CHARS, "op": _NICK_CHARS, "room": r"#[\w-]+",
                   "count": r"\d+", "shown": r"\d+", "until": r"\d{4}-\d\d-\d\d \d\d:\d\d",
                   "token": r"[A-Za-z0-9_-]{43}"}
_NICK = r"(%s)" % _NICK_CHARS


def shape(template):
    """A template of Lines as a compiled pattern of the whole line body, one named group per
    field: 'Users ({count}): {nicks}' matches 'Users (2): a, b' with count '2'."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0
                      else "(?P<%s>%s)" % (part, _FIELD_PATTERNS.get(part, ".*"))
                      for i, part in enumerate(parts))
    return re.compile(pattern + r"\Z", re.DOTALL)


class Kind:
    """What a line from the server is, as far as the client cares."""
    GREETING = "greeting"          # no timestamp: the welcome and the password prompt
    OK = "ok"
    MESSAGE = "message"            # {nick} sent {text}
    ACTION = "action"              # * {nick} {text}
    PRIVATE = "private"            # [private] {nick} sent {text}
    OWN_MESSAGE = "own message"    # YOU SEND USERS {text}
    OWN_PRIVATE = "own private"    # [private] YOU SEND {target} {text}
    JOINED = "joined"              # {nick} connected!, {nick} joined {room}.
    LEFT = "left"                  # disconnected!, left for, was kicked, was banned
    RENAMED = "renamed"
    USERS = "users"                # Users ({n}): a, b (away), ...
    ROOMS = "rooms"                # Rooms ({n}): #main (5), #ops (2, key)
    HEADING = "heading"            # the lines that follow were said before: Recent messages,
                                   # Messages since you left, Found ..., waiting privates
    ROOM_NOW = "room now"          # You are in {room} now
    TOPIC = "topic"                # Topic of {room}: ..., {room} has no topic.
    TOPIC_SET = "topic set"        # {nick} set (or cleared) the topic of {room}
    ROOM_CLOSED = "room closed"
    NICK_QUESTION = "nick question"   # "{nick}" is registered. Please enter its password
    REGISTERED = "registered"      # "{nick}" is registered to you. / ... no longer registered.
    LOGIN_TOKEN = "login token"    # Login token for "{nick}": {token} (never shown)
    KICKED_YOU = "kicked you"
    BANNED_YOU = "banned you"      # also a banned address's refusal
    HELP = "help"                  # Commands: ...
    BANS = "bans"
    ERROR = "error"                # Sorry! ..., and the nickname refusals
    NOTICE = "notice"              # any other line with a timestamp
    OTHER = "other"                # any other line without one


# Each kind of line and the templates it comes in, tried in this order (a message, which any
# member can fill with text, first: nothing it holds can make it another kind).
_TEMPLATES = (
    (Kind.OWN_MESSAGE, Lines.ECHO),
    (Kind.OWN_PRIVATE, Lines.PRIVATE_ECHO),
    (Kind.PRIVATE, Lines.PRIVATE_SENT),
    (Kind.MESSAGE, Lines.SENT),
    (Kind.ACTION, Lines.ACTION),
    (Kind.JOINED, Lines.CONNECTED),
    (Kind.LEFT, Lines.DISCONNECTED),
    (Kind.RENAMED, Lines.RENAMED),
    (Kind.USERS, Lines.USERS),
    (Kind.HEADING, Lines.HISTORY),
    (Kind.ERROR, Lines.NICK_BUSY),
    (Kind.ERROR, Lines.WRONG_NICK_PASSWORD),
    (Kind.ROOM_NOW, Lines.IN_ROOM_NOW),
    (Kind.LEFT, Lines.LEFT_FOR),
    (Kind.JOINED, Lines.JOINED_ROOM),
    (Kind.ROOMS, Lines.ROOMS),
    (Kind.TOPIC, Lines.TOPIC),
    (Kind.TOPIC, Lines.NO_TOPIC),
    (Kind.TOPIC_SET, Lines.TOPIC_SET),
    (Kind.TOPIC_SET, Lines.TOPIC_CLEARED),
    (Kind.ROOM_CLOSED, Lines.ROOM_CLOSED),
    (Kind.HEADING, Lines.CATCH_UP),
    (Kind.HEADING, Lines.CATCH_UP_SOME),
    (Kind.HEADING, Lines.WAITING),
    (Kind.HEADING, Lines.SEARCH_FOUND),
    (Kind.HEADING, Lines.SEARCH_FOUND_MANY),
    (Kind.NICK_QUESTION, Lines.NICK_PASSWORD_PROMPT),
    (Kind.REGISTERED, Lines.REGISTERED),
    (Kind.REGISTERED, Lines.UNREGISTERED),
    (Kind.LOGIN_TOKEN, Lines.LOGIN_TOKEN),
    (Kind.KICKED_YOU, Lines.KICKED),
    (Kind.KICKED_YOU, Lines.KICKED_FOR),
    (Kind.BANNED_YOU, Lines.BANNED),
    (Kind.BANNED_YOU, Lines.BANNED_FOR),
    (Kind.BANNED_YOU, Lines.ADDRESS_BANNED),
    (Kind.BANNED_YOU, Lines.ADDRESS_BANNED_UNTIL),
    (Kind.LEFT, Lines.WAS_KICKED),
    (Kind.LEFT, Lines.WAS_KICKED_FOR),
    (Kind.LEFT, Lines.WAS_BANNED),
    (Kind.LEFT, Lines.WAS_BANNED_FOR),
    (Kind.BANS, Lines.BANS),
    (Kind.BANS, Lines.NO_BANS),
)
_SHAPES = tuple((kind, shape(template)) for kind, template in _TEMPLATES)

_PATTERNS = {template: pattern for (_, template), (_, pattern) in zip(_TEMPLATES, _SHAPES)}


def is_line(line, template):
    """Is this ServerLine the protocol's line of ``template``?"""
    return bool(line.ts) and _PATTERNS[template].match(line.body) is not None


class ServerLine:
    """One line from the server (already made harmless by render()), taken apart.

    ``fields`` holds the parts of its template by name. ``nick`` is whom the line is about
    (sender, newcomer, old nickname, private target), ``other`` the new nickname of a rename
    or the count of a list or heading, ``said`` the text of a message, ``room`` the room it
    names. The session marks ``own``, ``mention`` and ``bell`` for the presenter."""

    __slots__ = ("text", "ts", "prefix_len", "body", "kind", "fields", "nick", "other", "said",
                 "room", "own", "mention", "bell")

    def __init__(self, text):
        self.text = text
        match = Lines.TIMESTAMP.match(text)
        self.ts = match.group(1) if match else None
        self.prefix_len = match.end() if match else 0
        self.body = text[self.prefix_len:]
        self.fields = {}
        self.nick = self.other = self.said = self.room = None
        self.own = self.mention = self.bell = False
        self.kind = self._classify()

    def _classify(self):
        body = self.body
        if self.ts is None:
            return Kind.GREETING if body in (Lines.WELCOME, Lines.PASSWORD_PROMPT) else Kind.OTHER
        if body == Lines.OK:
            return Kind.OK
        for kind, pattern in _SHAPES:
            match = pattern.match(body)
            if match:
                self._take(match.groupdict())
                return kind
        if body.startswith(Lines.HELP_START):
            return Kind.HELP
        if body.startswith(Lines.ERROR_PREFIXES):
            return Kind.ERROR
        return Kind.NOTICE

    def _take(self, fields):
        self.fields = fields
        self.nick = fields.get("nick") or fields.get("old") or fields.get("target")
        self.other = fields.get("new")
        if fields.get("count") is not None:
            self.other = int(fields["shown"] if fields.get("shown") else fields["count"])
        self.said = next((fields[name] for name in ("message", "text", "nicks", "rooms")
                          if fields.get(name) is not None), None)
        self.room = fields.get("room")

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


# Shared copy: chat_server.py has this function too, word for word (each .pyz holds one module).
def normalise_nickname(text):
    """A nickname attempt as the protocol reads it: stripped, then NFKC (fullwidth letters become
    ASCII, a decomposed accent composes)."""
    return unicodedata.normalize("NFKC", text.strip())


# ---------------------------------------------------------------------------------------------
# The commands, as the client knows them: one table gives Tab completion and what each line
# sent is owed by the server.
# ---------------------------------------------------------------------------------------------

class Command:
    """A command of the protocol (docs/PROTOCOL.md), as the client sees it.

    ``names``: its name and aliases, without the '/'. ``operator``: only operators may use it.
    ``ok_first``: a 'Server: ok!' comes first. ``answers``: the kinds of line that then answer
    it (the repeat of your own line, a list, ...); empty: the ok alone, or a single line of any
    kind for a command without ok_first. ``bare``: (ok_first, answers) instead, when it is typed
    with no argument. ``completes``: what Tab completes after it ('nick', 'room'). ``secret``:
    its arguments are passwords, never kept in the history nor left on the screen.
    A refusal ('Sorry! ...', 'there are no other users!') answers any line."""

    __slots__ = ("names", "operator", "ok_first", "answers", "bare", "completes", "secret")

    def __init__(self, names, ok_first=False, answers=(), operator=False, bare=None,
                 completes=None, secret=False):
        self.names = names
        self.operator = operator
        self.ok_first = ok_first
        self.answers = answers
        self.bare = bare
        self.completes = completes
        self.secret = secret

    @property
    def name(self):
        return self.names[0]

    def owed(self, bare):
        """(ok_first, answers) for this command typed with or without arguments."""
        return self.bare if bare and self.bare is not None else (self.ok_first, self.answers)

    def __repr__(self):
        return "<Command /%s>" % self.name


NICK, ROOM = "nick", "room"

# Every command of protocol version 3, in the order of /help (operators' last).
COMMANDS = (
    Command(("help",), answers=(Kind.HELP,)),
    Command(("users", "who", "names"), answers=(Kind.USERS,)),
    Command(("msg",), ok_first=True, answers=(Kind.OWN_PRIVATE,), completes=NICK),
    Command(("me",), ok_first=True, answers=(Kind.ACTION,)),
    Command(("nick",), ok_first=True, answers=(Kind.RENAMED,)),
    Command(("away",), ok_first=True),
    Command(("back",), ok_first=True),
    Command(("quit",), answers=(Kind.NOTICE,)),
    Command(("join",), ok_first=True, answers=(Kind.ROOM_NOW,), completes=ROOM),
    Command(("part", "leave"), ok_first=True, answers=(Kind.ROOM_NOW,)),
    Command(("rooms",), answers=(Kind.ROOMS,)),
    Command(("topic",), ok_first=True, answers=(Kind.TOPIC_SET,), bare=(False, (Kind.TOPIC,))),
    Command(("search",), answers=(Kind.HEADING, Kind.NOTICE)),
    Command(("register",), ok_first=True, answers=(Kind.REGISTERED,), secret=True),
    Command(("password",), ok_first=True, secret=True),
    Command(("unregister",), ok_first=True, answers=(Kind.REGISTERED,), secret=True),
    Command(("token",), ok_first=True, answers=(Kind.LOGIN_TOKEN,)),
    Command(("kick",), ok_first=True, operator=True, completes=NICK),
    Command(("ban",), ok_first=True, operator=True, completes=NICK),
    Command(("unban",), ok_first=True, operator=True),
    Command(("bans",), answers=(Kind.BANS,), operator=True),
    Command(("mute",), ok_first=True, operator=True, completes=NICK),
    Command(("unmute",), ok_first=True, operator=True, completes=NICK),
    Command(("op",), ok_first=True, operator=True, completes=NICK),
    Command(("deop",), ok_first=True, operator=True, completes=NICK),
    Command(("drop",), ok_first=True, operator=True, completes=ROOM),
)
COMMANDS_BY_NAME = {name: command for command in COMMANDS for name in command.names}
COMMAND_NAMES = tuple("/" + name for command in COMMANDS for name in command.names)
# A message (a line that is not a command, or //text) and a command the client does not know.
MESSAGE = Command((), ok_first=True, answers=(Kind.OWN_MESSAGE,))
UNKNOWN = Command(())
USERS = COMMANDS_BY_NAME["users"]
ROOMS = COMMANDS_BY_NAME["rooms"]
JOIN = COMMANDS_BY_NAME["join"]
NICK_COMMAND = COMMANDS_BY_NAME["nick"]


def parse_command(text):
    """(Command, arguments) of a line as the server reads it: MESSAGE for a message."""
    text = CONTROL_CHARS.sub("", text)   # the server removes them before it looks for a '/'
    if not text.startswith("/") or text.startswith("//"):
        return MESSAGE, ""
    words = text[1:].split(None, 1)
    name = words[0].lower() if words else ""
    return COMMANDS_BY_NAME.get(name, UNKNOWN), (words[1].strip() if len(words) > 1 else "")


def masked(text):
    """A line with a secret command's arguments hidden: '/register ***'."""
    command, arguments = parse_command(text)
    if not command.secret or not arguments:
        return text
    return text.split(None, 1)[0] + " ***"


# ---------------------------------------------------------------------------------------------
# What the client itself says, and how it ends.
# ---------------------------------------------------------------------------------------------

class Notes:
    CLOSED_BY_SERVER = "Connection closed by the server."
    CANNOT_CONNECT = "Cannot connect to {address}: {reason}."
    REFUSED_HINT = " Is the server running?"
    CONNECTION_LOST = "Connection lost: {reason}."
    NO_ANSWER = "no answer from {address} in {seconds} s"
    RECONNECTING = "Connection lost. Reconnecting in {delay} s (Ctrl-C to quit)..."
    # After 'Server is shutting down.', which says why already:
    RECONNECTING_AFTER_SHUTDOWN = "Reconnecting in {delay} s (Ctrl-C to quit)..."
    LOCKED_OUT_WAITING = ("Too many wrong passwords from this address. Trying again in {delay} s "
                          "(Ctrl-C to quit)...")
    RECONNECTED = "Reconnected as {nick}."
    RECONNECTED_TO = "Reconnected to {address} as {nick}."
    CONNECTED_TO = "Connected to {address}."
    NICK_HELD = '"{nick}" is still held by the old connection. Trying again in {delay} s...'
    NOT_SENT_OFFLINE = "Not sent, the connection is down (Up brings the line back): {text}"
    NOT_SENT_NOT_JOINED = "Not sent, you have not joined yet: {text}"
    # A line the server never answered before the connection was lost: it may have been taken.
    NOT_CONFIRMED = "Not confirmed, perhaps not sent: {text}"
    NOT_CONFIRMED_LAST = "Not confirmed, perhaps not sent (Enter sends it again): {text}"
    WITH_YOU = "With you in {room}: {nicks}."
    RETURNED = "Back after the reconnect ({count}): {nicks}."
    NOBODY_ELSE = "Nobody else is in {room}."
    PASTE_QUESTION = "Send {count} lines? [y/N] "
    PASTE_DROPPED = "Not sent: the {count} pasted lines."
    SENDING = " (sending {number} of {count} lines)"
    DROP_QUESTION = "Drop the {count} pasted lines not sent yet? [y/N] "
    PASTE_NOT_SENT = "Not sent, the connection is down: {count} pasted lines."
    PASSWORD_PROMPT = "password> "
    NICK_PASSWORD_PROMPT = "password for {nick}> "
    # A secret command typed alone (/register, /password, /unregister): its passwords asked
    # for one by one, never shown (SECRET_PROMPTS); an empty answer sends nothing.
    NEW_PASSWORD_PROMPT = "new password for {nick}> "
    OLD_PASSWORD_PROMPT = "current password for {nick}> "
    OWN_PASSWORD_PROMPT = "password of {nick}> "
    SECRET_NOT_SENT = "Not sent: /{command}."
    SECRET_LOST = "Not sent: /{command} (the connection was lost while you typed)."
    OLD_PASSWORD_SPACES = ("Not sent: /password takes a current password of one word (for one"
                           " with spaces: /unregister, then /register).")
    NICKNAME_PROMPT = "nickname> "
    TRUST_PROMPT = "Trust it? [y/N] "
    # Login tokens (LoginTokens): the token itself is never shown.
    TOKEN_SAVED = ("Login token saved in {path}: next time you join as {nick} on this server, "
                   "it answers the password question.")
    TOKEN_REFUSED = ("The login token saved for {nick} no longer works (its password was "
                     "changed, or the token was ended): forgotten.")
    TOKENS_NOT_WRITTEN = "Cannot write the login tokens in {path}: {reason}."
    TOKENS_DAMAGED = ("Login tokens in {path} not used: {reason}. The next /token moves it to "
                      "{kept} and starts a new file.")
    TOKENS_NOT_OURS = "it is not a file of login tokens"
    # TLS
    NOT_TLS = "{address} does not speak TLS (it answered in plain text): leave out --tls."
    EXPECTS_TLS = ("{address} closed the connection without a greeting in plain text: "
                   "it expects TLS, add --tls.")
    TLS_FAILED = "TLS handshake with {address} failed: {reason}."
    TLS_NOT_VERIFIED = ("The TLS certificate of {address} failed the --tls-ca check: {reason}. "
                        "{change} Not connected. If the server has a new certificate, ask the "
                        "person who runs it for the certificate of the authority that signed it "
                        "and give that file to --tls-ca instead of {ca}.")
    TLS_CHANGE_UNSIGNED = ("The server now shows a certificate that no authority in {ca} "
                           "signed.")
    TLS_CHANGE_EXPIRED = "The server's certificate is out of its dates."
    TLS_CHANGE_HOST = "The server's certificate is for another name than {host}."
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


# What a secret command typed alone asks for, in its arguments' order (docs/CLIENT.md).
SECRET_PROMPTS = {
    "register": (Notes.NEW_PASSWORD_PROMPT,),
    "password": (Notes.OLD_PASSWORD_PROMPT, Notes.NEW_PASSWORD_PROMPT),
    "unregister": (Notes.OWN_PASSWORD_PROMPT,),
}


def clause(reason):
    """A reason from elsewhere (the OS, OpenSSL) to go inside a sentence of ours, which has
    its own full stop: 'is not valid for '127.0.0.1'.' would end in two."""
    return str(reason).strip().rstrip(".")


class ExitStatus:
    """How the client ends, for scripts (the README's table of exit statuses)."""
    DONE = 0        # the user left (Ctrl-D, Ctrl-C, /quit), or a pipe ended fully answered
    FAILED = 1      # refused, closed, no server, TLS, a file that can't be read
    USAGE = 2       # a bad option (argparse's own status)
    LOST = 3        # the connection was lost with lines the server never confirmed
    KICKED = 4      # an operator kicked you
    BANNED = 5      # an operator banned you (or your address is banned)


class ClientExit(Exception):
    """Ends the client: ``message`` (if any) goes to stderr, ``status`` is the exit status."""

    def __init__(self, status, message=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# The client's side of the protocol: phases, no I/O.
# ---------------------------------------------------------------------------------------------

# Timing of the protocol's answers. The server answers every line a member sends at once
# (Server: ok!, a refusal, an echo), so a line unanswered this long means a dead connection.
ANSWER_TIMEOUT = 6.0         # seconds
PASTE_ASK_OVER = 5           # a terminal paste of more lines asks before sending them
# Of a long paste, at most this many lines are unanswered at a time: the rest waits in the
# client, where the prompt counts it down and Ctrl-C can drop it (what the server's flood control
# holds back in the network could not be taken back).
PASTE_WINDOW = 5
PASSWORD_TRIES = 3           # a terminal asks for the chat's password at most this many times
LOCKOUT_WAIT = 61            # seconds: the server's lockout ends 60 s after the last wrong one
NICK_RETRY_DELAY = 2         # seconds between attempts at a nickname the old connection holds
NICK_RETRIES = 10            # (a node's lease holds it at most 15 s after the node is gone)
RETURNS_QUIET = 2            # seconds without another return before they are summed up
RETURNS_WINDOW = 10          # seconds after a reconnect in which returns are summed up


class Phase:
    """Where the client is; one at a time, changed only through Session._enter."""
    CONNECTING = "connecting"                # connected, nothing heard yet on this connection
    PASSWORD = "password"                    # the server asked for the password; not sent yet
    CHECKING_PASSWORD = "checking password"  # sent; the greeting or a refusal comes next
    NICKNAME = "nickname"                    # greeted: waiting for a nickname to try
    JOINING = "joining"                      # one nickname attempt in flight
    NICK_PASSWORD = "nick password"          # a registered nickname's password is asked for
    CHECKING_NICK_PASSWORD = "checking nick password"   # sent; its answer comes next
    MEMBER = "member"                        # joined: typed lines are messages and commands
    OFFLINE = "offline"                      # the connection is gone; a reconnect is due


class Awaited:
    """A line a member sent, until its answer comes. ``text``: the line. ``ok_first`` and
    ``answers``: what it is owed (Command.owed). ``answered``: the server has answered it (it
    was taken). ``typed``: the input line as it stood on screen (prompt and text) when the
    terminal erased it for the server's echo; a refusal instead of the echo shows it again, so
    that the user sees what was refused. ``quiet``: the client sent it by itself (its answer
    is not shown)."""

    __slots__ = ("text", "command", "ok_first", "answers", "answered", "got_ok", "typed",
                 "quiet", "pasted")

    def __init__(self, text, typed=None, quiet=False, commands=True):
        command, arguments = parse_command(text) if commands else (MESSAGE, "")
        self.text = text
        self.command = command
        self.ok_first, self.answers = command.owed(bare=not arguments)
        self.answered = False
        self.got_ok = False
        self.pasted = False      # part of a long paste (Session.paste)
        self.typed = typed
        self.quiet = quiet

    @property
    def echoed(self):
        """Is it owed 'Server: ok!' and then a line that repeats it?"""
        return self.ok_first and bool(self.answers)

    def __repr__(self):
        return "<Awaited %r %s%s>" % (self.text, "answered " if self.answered else "",
                                      "quiet" if self.quiet else "")


class Session:
    """The client's side of the protocol, without sockets or a terminal.

    ``ui`` is told what to do: ``send(text)``, ``show(line)``, ``note(text)``,
    ``show_typed(text)``, ``prompt_changed()``, ``ask_password(prompt)``, ``half_close()``,
    ``joined()``, ``unconfirmed(text)``, ``offer_again(text)``, ``retry_nickname(delay)``,
    ``set_aside_input()``, ``returns_pending(delay)``.
    The end of the client is a ClientExit raised from here. ``tokens``: the LoginTokens that
    keep the login tokens the server gives and answer its password questions with them (None:
    none kept); ``tls``: the connections are TLS (a token is kept for plain or TLS apart).

    On a terminal (``interactive``) a refused nickname asks again and the lines typed while an
    attempt was in flight are not sent; in a pipe a refused nickname ends the client (status 1),
    since nobody reads the refusal and the next line would become a nickname by surprise."""

    def __init__(self, ui, nick=None, password=None, interactive=False, reconnect=False,
                 list_users=False, erases_echo=False, nick_password=None, servers=1,
                 tokens=None, tls=False):
        self.ui = ui
        self.servers = servers            # how many servers the client may reach
        self.address = None               # the one of this connection
        self.interactive = interactive
        self.erases_echo = erases_echo    # the terminal can take a sent line off the screen
        self.reconnect = reconnect        # reconnect after a loss, once joined
        self.list_users = list_users      # send /users (and /rooms) quietly, for completion
        self.phase = Phase.CONNECTING
        self.nick = None                  # our nickname once accepted; follows /nick
        self.next_nick = nick             # sent by itself when greeted: --nick, or to rejoin
        self.password = password          # --password-file or CHAT_PASSWORD, then as sent
        self.wrong_passwords = 0          # the chat's password, refused on a terminal
        self.password_again = False       # refused: asked again on the next connection
        # A secret command typed alone on a terminal: (its name, the passwords given so far);
        # the next ones are asked for with echo off (SECRET_PROMPTS)
        self.secret_entry = None
        # ...cut short by a lost connection: (its name, the prompt then): what is typed up to
        # the next Enter stays hidden, and is dropped (typing blind, it would go out as a line)
        self.secret_lost = None
        # Registered nicknames' passwords, kept in memory to answer again after a reconnect:
        # casefolded nickname -> password. The option's (None: none) answers any nickname once.
        self.nick_passwords = {}
        self.nick_password = nick_password
        self.asked_for = None             # the registered nickname whose password is asked
        self.tokens = tokens
        self.tls = tls
        self.token_sent = None            # the login token that answered, until its verdict
        self.tokens_refused = set()       # never sent again (even if the file keeps them)
        self.attempt = None               # the nickname attempt in flight
        self.nick_retries = 0
        self.held = deque()               # typed lines waiting for the phase that takes them
        # Awaited answers to the lines sent, oldest first. Not bounded: a paste of any size
        # held back by flood control is answered in full later; a bound would forget the oldest.
        self.awaiting = deque()
        self.unconfirmed = []             # lines a lost connection never answered, to show
        self.lost_lines = False           # some were lost for good: the exit status says so
        self.members = {}                 # casefolded nickname -> nickname, others only
        self.rooms = {}                   # casefolded room -> room, learned from /rooms
        self.room = None                  # the room we are in, once joined
        self.room_key = None              # the key we gave to get in
        self.key_given = None             # the key of the /join being answered
        # False once the server answered our quiet /users as a message: a version 1 server,
        # which has no commands, so every line is a message to it (this connection only).
        self.server_has_commands = True
        self.joined_once = False
        self.rejoining = False
        self.paused = False               # a cluster node cut off: nothing answered meanwhile
        self.retry_after = None           # seconds: reconnect after that, whatever happened
        self.retry_note = None            # and what to say meanwhile
        self.farewell = None              # 'Server is shutting down.' when the server said it
        self.goodbye = False              # the server answered /quit
        self.input_done = False
        self.half_closed = False
        self.past_left = 0                # lines still to come after a heading of the past
        # After a reconnect, the members who were there before come back too (a restarted
        # server): their returns are summed up in one line, not one 'connected!' each.
        self.returning = {}               # casefolded nickname -> nickname, not back yet
        self.returned = []                # back, not told yet
        self.pasting = deque()            # a long paste's lines not sent yet
        self.paste_total = 0              # its size, while any of it is unanswered

    def __repr__(self):
        return "<Session %s nick=%r room=%r held=%d awaiting=%d>" % (
            self.phase, self.nick, self.room, len(self.held), len(self.awaiting))

    # -- what the client loop calls -----------------------------------------------------------
    def connected(self, address=None):
        """A new connection is ready for lines (TCP up, TLS trusted): its first line is next."""
        self.address = address
        self.farewell = None
        self.goodbye = False
        self.half_closed = False
        self.attempt = None
        self.token_sent = None
        self.awaiting.clear()
        self.members.clear()
        self.server_has_commands = True
        self.paused = False
        self.retry_after = self.retry_note = None
        self.nick_retries = 0
        self.past_left = 0
        self._enter(Phase.CONNECTING)

    def server_line(self, text):
        line = ServerLine(text)
        if line.ts and self._ends_or_waits(line):
            return
        if line.ts and line.body in (Lines.PAUSED, Lines.BACK):
            self.paused = line.body == Lines.PAUSED
        if self.token_sent is not None and self._token_verdict(line):
            return
        if self.phase == Phase.MEMBER:
            self._member_line(line)
            if self.paste_total:
                self._feed_paste()
        elif self.phase == Phase.CHECKING_NICK_PASSWORD and self.attempt is None:
            self._enter(Phase.MEMBER)   # a /nick to a registered nickname: answered now
            self._member_line(line)
        elif self.phase in (Phase.JOINING, Phase.CHECKING_NICK_PASSWORD):
            self._joining_line(line)
        else:
            self._line_before_joining(line)

    def _ends_or_waits(self, line):
        """The lines after which this connection ends: the client too, or it reconnects after a
        while. True when the line is dealt with."""
        body = line.body
        if body == Lines.SHUTTING_DOWN:
            self.farewell = body
            if not self.interactive or self._will_reconnect():
                self.ui.show(line)
            return True
        if body == Lines.WRONG_PASSWORD and self.interactive:
            self.wrong_passwords += 1
            if self.wrong_passwords < PASSWORD_TRIES:
                self.ui.show(line)
                self.password = None      # asked again on the next connection, at once
                self.password_again = True
                self._retry(0)
                return True
        if body == Lines.LOCKED_OUT and self.joined_once:
            self._retry(LOCKOUT_WAIT, Notes.LOCKED_OUT_WAITING)   # it ends by itself
            return True
        status = {Kind.KICKED_YOU: ExitStatus.KICKED,
                  Kind.BANNED_YOU: ExitStatus.BANNED}.get(line.kind)
        if status is None and body in Lines.FINAL_REFUSALS:
            status = ExitStatus.FAILED
        if status is None:
            return False
        if not self.interactive:
            self.ui.show(line)   # a terminal gets it once, as the closing message
        raise ClientExit(status, body)

    def _retry(self, delay, note=None):
        self.retry_after, self.retry_note = delay, note

    def typed(self, text):
        """A line the user typed (or a pipe gave), without its line end. An empty line is
        sent too: the server's answer ('Sorry! You send nothing.', or an incorrect nickname)
        says what became of it, where dropping it said nothing."""
        phase = self.phase
        if self.secret_lost is not None:
            self.ui.note(Notes.SECRET_LOST.format(command=self.secret_lost[0]))
            self.secret_lost = None
            self.ui.prompt_changed()
        elif phase == Phase.MEMBER:
            if self.secret_entry is not None:
                self._secret_answered(text)
            elif not self._secret_entry_begun(text):
                self._send_member_line(text, typed=self._erased(text))
        elif phase == Phase.NICKNAME:
            self._send_attempt(text)
        elif phase == Phase.PASSWORD:
            self._send_password(text)
        elif phase == Phase.NICK_PASSWORD:
            self._send_nick_password(text)
        elif phase in (Phase.CHECKING_PASSWORD, Phase.CHECKING_NICK_PASSWORD) \
                and self.interactive:
            pass   # perhaps the password again: never shown, kept, or sent as a nickname
        elif self.password_again and self.interactive:
            # Typed before the question came again: it is the password, and never shown.
            self.password = text if self.password is None else self.password
        elif phase == Phase.OFFLINE and self.interactive:
            if text.strip():   # (an empty line loses nothing: the prompt says offline)
                self.ui.note(Notes.NOT_SENT_OFFLINE.format(text=masked(text)))
        else:
            self.held.append(text)   # not yet: a pipe's lines wait for the next connection too

    def _secret_entry_begun(self, text):
        """'/register' typed alone on a terminal: its password asked for, never on screen
        (typed after the command, it would be, until Enter)."""
        command, arguments = parse_command(text)
        if not (self.interactive and command.secret) or arguments:
            return False
        self.secret_entry = (command.name, [])
        self.ui.ask_password(self.prompt())
        return True

    def _secret_answered(self, text):
        """A password for the secret command typed alone: the next asked for, or the command
        sent, masked on screen; an empty one sends nothing."""
        name, answers = self.secret_entry
        if not text.strip():
            self.secret_entry = None
            self.ui.note(Notes.SECRET_NOT_SENT.format(command=name))
        elif name == "password" and not answers and len(text.split()) > 1:
            self.secret_entry = None   # (the server takes OLD to be the first word)
            self.ui.note(Notes.OLD_PASSWORD_SPACES)
        else:
            answers.append(text)
            if len(answers) == len(SECRET_PROMPTS[name]):
                self.secret_entry = None
                line = "/%s %s" % (name, " ".join(answers))
                self._send_member_line(line, typed=self._erased(line))
            else:
                self.ui.ask_password(self.prompt())   # (a console reads each on request)
        self.ui.prompt_changed()

    def _erased(self, text):
        """What the terminal erased of a line sent (prompt and text, secrets masked), or None.
        A secret command is shown again at once, masked: its password never stays on screen."""
        if not self.replaces_echo(text):
            return None
        typed = self.prompt() + masked(text)
        if parse_command(text)[0].secret:
            self.ui.show_typed(typed)
            return None
        return typed

    def input_ended(self):
        """The pipe ended: once every line is sent, the connection is half-closed."""
        self.input_done = True
        self._maybe_half_close()

    def expects_answer(self):
        """Is the server owed to say something now? (A dead connection is one that doesn't.)"""
        if self.paused:
            return False   # a cluster node waits for Redis: lines wait, nothing is answered
        if self.phase in (Phase.CONNECTING, Phase.CHECKING_PASSWORD, Phase.JOINING,
                          Phase.CHECKING_NICK_PASSWORD):
            return True
        return any(not waiting.answered for waiting in self.awaiting)

    def connection_closed(self, reason=None):
        """The connection ended (``reason`` None: the server closed it in order). Returns when
        the client should reconnect; raises ClientExit otherwise."""
        lost = [w.text for w in self.awaiting if not w.answered and not w.quiet]
        status = ExitStatus.LOST if self.lost_lines else ExitStatus.DONE
        if self.goodbye:
            raise ClientExit(status)
        if self.half_closed and self.farewell is None and reason is None and not lost:
            raise ClientExit(status)   # end of piped input, and every reply received
        if self.retry_after is not None:
            self._go_offline([])
            return
        if self._will_reconnect():
            self._go_offline(lost)
            return
        self._tell_unconfirmed(lost)
        raise ClientExit(ExitStatus.LOST if lost else ExitStatus.FAILED,
                         self.farewell or reason or Notes.CLOSED_BY_SERVER)

    def _go_offline(self, lost):
        if self.secret_entry is not None:   # (half given: typed again from the command)
            self.secret_lost = (self.secret_entry[0], self.prompt())
            self.secret_entry = None
        if self.interactive and self.joined_once:
            self.returning.update(self.members)
        if self.pasting and self.interactive:
            self.ui.note(Notes.PASTE_NOT_SENT.format(count=len(self.pasting)))
        self.pasting.clear()
        self.paste_total = 0
        if self.joined_once:
            self.next_nick = self.nick
            self.rejoining = True
        self.attempt = None
        self.awaiting.clear()
        if self.interactive:
            # Shown once back, the last one in the input line; added to those of an earlier
            # connection still waiting to be shown (a retry that failed has none of its own).
            self.unconfirmed += lost
            for text in self.held:
                self.ui.note(Notes.NOT_SENT_OFFLINE.format(text=masked(text)))
            self.held.clear()
        else:
            self._tell_unconfirmed(lost)   # a pipe's lines not sent yet wait for the next one
        self._enter(Phase.OFFLINE)

    def _tell_unconfirmed(self, lost):
        for text in lost:
            self.lost_lines = True
            self.ui.unconfirmed(masked(text))

    def prompt(self):
        if self.secret_lost is not None:
            return self.secret_lost[1]
        if self.password_again:
            return Notes.PASSWORD_PROMPT
        if self.secret_entry is not None and self.phase == Phase.MEMBER:
            name, answers = self.secret_entry
            return SECRET_PROMPTS[name][len(answers)].format(nick=self.nick)
        if self.phase == Phase.MEMBER:
            return "%s> " % self._where()
        if self.phase == Phase.OFFLINE or (self.rejoining and self.phase == Phase.CONNECTING):
            return "(offline) %s> " % self._where() if self.nick else "(offline)> "
        if self.phase in (Phase.NICKNAME, Phase.JOINING):
            return Notes.NICKNAME_PROMPT
        if self.phase in (Phase.PASSWORD, Phase.CHECKING_PASSWORD):
            return Notes.PASSWORD_PROMPT
        if self.phase in (Phase.NICK_PASSWORD, Phase.CHECKING_NICK_PASSWORD):
            return Notes.NICK_PASSWORD_PROMPT.format(nick=self.asked_for)
        return ""

    def _where(self):
        """'alice', or 'alice #ops' outside #main; and how far a long paste has gone."""
        where = self.nick
        if self.room is not None and self.room.casefold() != MAIN_ROOM:
            where = "%s %s" % (self.nick, self.room)
        if self.paste_total:
            where += Notes.SENDING.format(number=self._pasted_done() + 1, count=self.paste_total)
        return where

    # -- a long paste, paced ------------------------------------------------------------------
    def paste(self, lines):
        """Send pasted lines in order, each as typed, PASTE_WINDOW unanswered at a time."""
        if self.phase != Phase.MEMBER:
            for text in lines:
                self.typed(text)
            return
        self.pasting.extend(lines)
        self.paste_total += len(lines)
        self._feed_paste()
        self.ui.prompt_changed()   # the count shows

    def paste_waiting(self):
        """How many pasted lines are not sent yet (Ctrl-C offers to drop them)."""
        return len(self.pasting)

    def drop_paste(self):
        dropped = len(self.pasting)
        self.pasting.clear()
        self.paste_total -= dropped
        self._feed_paste()
        return dropped

    def _pasted_done(self):
        return self.paste_total - len(self.pasting) - self._pasted_in_flight()

    def _pasted_in_flight(self):
        return sum(1 for waiting in self.awaiting if waiting.pasted and not waiting.answered)

    def _feed_paste(self):
        before = self.prompt()
        in_flight = self._pasted_in_flight()
        while self.pasting and in_flight < PASTE_WINDOW and self.phase == Phase.MEMBER:
            self._send_member_line(self.pasting.popleft(), pasted=True)
            in_flight += 1
        if self.paste_total and not self.pasting and not in_flight:
            self.paste_total = 0   # all of it answered: the prompt is itself again
        if self.prompt() != before:
            self.ui.prompt_changed()

    def hides_input(self):
        """Is what the user types now hidden (no echo, no history)? While a password is asked
        for and while it is checked, on a terminal."""
        return self.interactive and (self.password_again or self.phase in (
            Phase.PASSWORD, Phase.CHECKING_PASSWORD, Phase.NICK_PASSWORD,
            Phase.CHECKING_NICK_PASSWORD) or self.secret_lost is not None or (
            self.secret_entry is not None and self.phase == Phase.MEMBER))

    def keeps_in_history(self, text):
        """May the input history keep this line? Not a command that carries a password."""
        return not parse_command(text)[0].secret

    def waits_for_nickname(self):
        """Greeted, and no nickname to send by itself (--nick, rejoining, typed ahead)."""
        return self.phase == Phase.NICKNAME and self.next_nick is None and not self.held

    def wants_input(self):
        """Would a typed line be used now rather than held? (Input read on demand asks.)"""
        if self.phase == Phase.OFFLINE:
            return self.interactive   # a pipe waits in the pipe for the next connection
        return self.phase in (Phase.NICKNAME, Phase.MEMBER) or (
            self.phase in (Phase.PASSWORD, Phase.NICK_PASSWORD) and not self.interactive)

    def replaces_echo(self, text):
        """On a terminal, will the server repeat this line as our own styled line? Then the
        input line readline left on the screen can go: a message costs one line. (If a
        refusal comes instead, the line is shown again above it.) A secret command's line
        goes too, and comes back masked."""
        if not (self.erases_echo and self.phase == Phase.MEMBER and text.strip()
                and "\n" not in text):
            return False
        waiting = Awaited(text, commands=self.server_has_commands)
        return waiting.echoed or waiting.command.secret

    def completions(self, text, words_before):
        """Tab completion of ``text``, after the words typed before it on the line: command
        names for a first word that starts with '/'; after /join and /drop the rooms known;
        else the nicknames of the members present. Each ends with the space that comes next
        (Python's readline module tells readline to append nothing)."""
        if not words_before and text.startswith("/"):
            return [name + " " for name in COMMAND_NAMES if name.startswith(text.lower())]
        command = parse_command(words_before[0])[0] if words_before else MESSAGE
        if command.completes == ROOM and len(words_before) == 1:
            known, text = self.rooms, text if text.startswith("#") else "#" + text
        else:
            known = self.members
        folded = text.casefold()
        return sorted((name + " " for key, name in known.items() if key.startswith(folded)),
                      key=str.casefold)

    def retry_nickname(self):
        """The client's timer: try the nickname the old connection held once more."""
        if self.phase == Phase.NICKNAME and self.next_nick is not None:
            self._try_nickname()

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
            self.ui.ask_password(Notes.PASSWORD_PROMPT)   # it comes back through typed()
        elif self.held:
            self._send_password(self.held.popleft())   # a pipe: its first line
        else:
            self._maybe_half_close()

    def _send_password(self, text):
        self.password = text   # kept to rejoin after a reconnect
        self.password_again = False
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
        if line.kind == Kind.NICK_QUESTION:
            self._nick_password_asked(line)
            return
        if line.kind == Kind.ERROR and self._nickname_held(line):
            return
        self.ui.show(line)
        if line.kind == Kind.ERROR:
            self._refused(line)

    def _nickname_held(self, line):
        """Rejoining, our nickname may still be held by the connection that was lost (until
        the server or its node notices), and a paused node refuses every nickname for a
        moment: try it again in a while rather than ask for another or end."""
        held = self.rejoining and is_line(line, Lines.NICK_BUSY) and \
            same_nick(line.nick, self.attempt)
        if not (held or line.body == Lines.PAUSED_JOIN) or self.nick_retries >= NICK_RETRIES:
            return False
        self.nick_retries += 1
        if self.interactive:
            if self.nick_retries == 1:
                self.ui.note(Notes.NICK_HELD.format(nick=self.attempt, delay=NICK_RETRY_DELAY)
                             if held else line.body)
        else:
            self.ui.show(line)
        self.next_nick, self.attempt = self.attempt, None
        self._enter(Phase.NICKNAME)
        if self.interactive:
            self.ui.set_aside_input()   # (the prompt asks a nickname meanwhile)
        self.ui.retry_nickname(NICK_RETRY_DELAY)
        return True

    def _nick_password_asked(self, line):
        """'"alice" is registered. Please enter its password': the next line is its password.
        Answered with a saved login token, or from memory (or --nick-password-file) where we
        can; else a terminal asks, and a pipe's next line is the answer."""
        if not self.interactive and self.phase != Phase.JOINING:
            self.ui.show(line)   # a member's /nick in a pipe: the script's next line answers
            return
        if not self.rejoining:
            self.ui.show(line)
        self.asked_for = line.nick
        self._enter(Phase.NICK_PASSWORD)
        known = self.nick_passwords.get(line.nick.casefold(), self.nick_password)
        token = self._saved_token(line.nick, known)
        if token is not None:
            self.token_sent = token
            self.ui.send(token)   # (not kept as the password: a refused one is forgotten)
            self._enter(Phase.CHECKING_NICK_PASSWORD)
        elif known is not None:
            self._send_nick_password(known)
        elif self.interactive:
            self.ui.ask_password(Notes.NICK_PASSWORD_PROMPT.format(nick=line.nick))
        elif self.held:
            self._send_nick_password(self.held.popleft())
        else:
            self._maybe_half_close()

    def _send_nick_password(self, text):
        self.nick_passwords[self.asked_for.casefold()] = text
        self.ui.send(text)
        self._enter(Phase.CHECKING_NICK_PASSWORD)

    def _saved_token(self, nick, known):
        """The login token that answers ``nick``'s password question, or None.

        A saved token answers first, even where the client knows the password (typed earlier
        this run, or --nick-password-file): the server checks a token in microseconds and a
        password in a tenth of a second of hashing, for which a crowd reconnecting at once
        waits in line; and a nickname's tokens are its password's (/password ends them all), so
        a token lets in only whoever the password would. A refused one is forgotten, and the
        question, asked again, gets the password (_token_verdict). Not where a pipe's next line
        is the answer, though: that line is the script's password, and would go out as a
        message in the chat if a token took its place."""
        if self.tokens is None or (not self.interactive and known is None
                                   and not self.rejoining):
            return None
        token = self.tokens.token(self._server(), nick)
        return None if token in self.tokens_refused else token

    def _token_verdict(self, line):
        """The server's verdict on the login token sent: 'Server: ok!' (right) or the wrong
        password line (the password was changed, or the token ended). A refused token is
        forgotten, said once, and the same nickname attempt (or /nick) is sent again: its
        question comes back, and a terminal asks for the password (or the one known answers).
        With nothing to answer it but a pipe's next line, it is a wrong password as any: the
        client ends. True when the line is dealt with."""
        if line.kind == Kind.OK:
            self.token_sent = None
            return False
        if not (is_line(line, Lines.WRONG_NICK_PASSWORD) and same_nick(line.nick,
                                                                      self.asked_for)):
            return False
        refused, self.token_sent = self.token_sent, None
        self.tokens_refused.add(refused)
        self.tokens.forget(self._server(), line.nick, refused)
        self.ui.note(Notes.TOKEN_REFUSED.format(nick=line.nick))
        known = self.nick_passwords.get(line.nick.casefold(), self.nick_password)
        if not self.interactive and known is None:
            return False
        if self.attempt is not None:
            self._send_attempt(self.attempt)
            return True
        self._enter(Phase.MEMBER)   # a member's /nick: it kept its nickname, and asks again
        for waiting in self.awaiting:
            if waiting.command is NICK_COMMAND:
                self.awaiting.remove(waiting)
                self._send_member_line(waiting.text)
                break
        return True

    def _server(self):
        return LoginTokens.server(self.address, self.tls)

    def _refused(self, line):
        self.attempt = None
        if is_line(line, Lines.WRONG_NICK_PASSWORD):
            self.nick_passwords.pop(line.nick.casefold(), None)
            if self.nick_password is not None:
                self.nick_password = None   # the option's was wrong: ask, or end
        if not self.interactive:
            raise ClientExit(ExitStatus.FAILED, line.body)
        if self.rejoining:
            self.ui.set_aside_input()   # (what was typed for the chat is no nickname)
        self.rejoining = False   # a nickname of one's own choosing, then
        dropped, self.held = list(self.held), deque()
        for text in dropped:
            self.ui.note(Notes.NOT_SENT_NOT_JOINED.format(text=masked(text)))
        self._enter(Phase.NICKNAME)

    def _joined(self, line):
        self.nick = normalise_nickname(self.attempt)
        self.attempt = None
        self.joined_once = True
        rejoined_room, key = self.room, self.room_key
        self.room, self.room_key = MAIN_ROOM_NAME, None
        if self.rejoining:
            self.rejoining = False
            self.ui.note(Notes.RECONNECTED_TO.format(address=self.address, nick=self.nick)
                         if self.servers > 1 else Notes.RECONNECTED.format(nick=self.nick))
            if self.returning:
                self.ui.returns_pending(RETURNS_WINDOW)
        else:
            self.ui.show(line)
        self._enter(Phase.MEMBER)
        self.ui.joined()
        if rejoined_room is not None and rejoined_room.casefold() != MAIN_ROOM:
            self._send_member_line(" ".join(["/join", rejoined_room] + ([key] if key else [])))
        elif self.list_users:
            self._learn_room()
        while self.held:
            self._send_member_line(self.held.popleft())
        self._offer_unconfirmed()
        self._maybe_half_close()

    def _offer_unconfirmed(self):
        """After a reconnect: the lines the lost connection never answered, each shown as not
        confirmed, and the last one back in the input line (never sent again by itself: the
        server may have taken it before the connection died)."""
        lost, self.unconfirmed = self.unconfirmed, []
        for i, text in enumerate(lost):
            last = i == len(lost) - 1
            self.ui.note((Notes.NOT_CONFIRMED_LAST if last else Notes.NOT_CONFIRMED)
                         .format(text=masked(text)))
        if lost:
            self.ui.offer_again(lost[-1])

    def _learn_room(self):
        """Who is in the room, and which rooms there are: asked quietly (a terminal only)."""
        self._send_member_line(USERS_COMMAND, quiet=True)

    def _send_member_line(self, text, typed=None, quiet=False, pasted=False):
        waiting = Awaited(text, typed, quiet, commands=self.server_has_commands)
        waiting.pasted = pasted
        self.awaiting.append(waiting)
        self.ui.send(text)

    def _maybe_half_close(self):
        if not self.input_done or self.half_closed or self.held:
            return
        if self.phase not in (Phase.NICKNAME, Phase.JOINING, Phase.MEMBER, Phase.PASSWORD,
                              Phase.NICK_PASSWORD):
            return   # the password or nickname this client sends by itself may still be due
        self.half_closed = True
        self.ui.half_close()

    # -- a member's lines ---------------------------------------------------------------------
    def _member_line(self, line):
        head = self.awaiting[0] if self.awaiting else None
        if head is not None and head.quiet and self._answers_quiet(line, head):
            return
        if line.kind == Kind.NICK_QUESTION:
            if head is not None:
                head.answered = True   # the /nick: its password is asked
            self._nick_password_asked(line)
            return
        if not self._account(line, head):
            return
        if line.kind == Kind.LOGIN_TOKEN and self.tokens is not None:
            if head is not None and head.typed is not None and line.own:
                # The terminal erased the line typed for the server's repeat, which stays
                # off the screen here: the line typed comes back instead.
                self.ui.show_typed(head.typed)
            self._keep_token(line)
            return
        if self._a_return(line):
            return
        if line.body == Lines.GOODBYE:
            self.goodbye = True
        self._learn(line)
        self._mark_mention(line)
        self.ui.show(line)
        if line.own and line.kind in (Kind.RENAMED, Kind.ROOM_NOW):
            self.ui.prompt_changed()
        if line.own and line.kind == Kind.ROOM_NOW and self.list_users:
            self._learn_room()

    def _account(self, line, head):
        """Match the line with the oldest line awaiting an answer (the head); False to leave it
        out (the 'Server: ok!' before the repeat of your own line, on a terminal).

        A line is ``answered`` once the server has said anything for it (it was taken: the
        lines left unanswered when a connection dies are the ones it may have lost). An ok, a
        refusal or the answer the command is owed finds it; and for a command owed no ok, any
        answer-like line, so that no surprise in the answers leaves a line unanswered for ever
        and a live connection taken for dead."""
        if line.kind == Kind.OK:
            while head is not None and head.got_ok:
                # Its ok came before: what it was owed after it never came (a version 1
                # server's echo of a command): the ok is the next line's.
                self.awaiting.popleft()
                head = self.awaiting[0] if self.awaiting else None
            if head is None:
                return True
            head.got_ok = head.answered = True
            if head.command.secret:
                self._password_kept(head.text)
            if not head.answers:
                self.awaiting.popleft()   # the ok alone answers it
                return True
            return not (self.interactive and head.echoed)
        if self._is_own(line):
            line.own = True
            if head is not None and line.kind in head.answers:
                self._answered(head, line)
            return True
        if head is None:
            return True
        refusal = line.kind == Kind.ERROR or line.body == Lines.ALONE
        if refusal or (not head.ok_first and (line.kind in head.answers or not head.answers)):
            self._answered(head, line)
            if refusal and head.typed is not None:
                self.ui.show_typed(head.typed)   # refused: what was it?
        elif not head.ok_first and line.kind in _ANSWER_KINDS and \
                line.body not in (Lines.PAUSED, Lines.BACK):
            head.answered = True   # (not the answer it is owed: it was taken all the same)
        return True

    def _password_kept(self, text):
        """'Server: ok!' for /register, /password or /unregister: the nickname's password from
        now on, the one a reconnect answers its question with (or none: not registered)."""
        if self.nick is None:
            return
        command, arguments = parse_command(text)
        key = self.nick.casefold()
        if command.names[0] == "unregister":
            self.nick_passwords.pop(key, None)
        elif command.names[0] == "register":
            self.nick_passwords[key] = arguments
        else:   # /password OLD NEW: NEW is the rest of the line (as the server reads it)
            new = arguments.split(None, 1)[1:]
            if new:
                self.nick_passwords[key] = new[0].strip()

    def _keep_token(self, line):
        """'Login token for "alice": ...', the answer to /token: saved in the token file, and
        never shown (nor is the 'Server: ok!' before it, on a terminal), so that it stays off
        the screen, the terminal's scrollback and a pipe's output."""
        if self.tokens.save(self._server(), line.nick, line.fields["token"]):
            self.ui.note(Notes.TOKEN_SAVED.format(path=self.tokens.path, nick=line.nick))

    def _answered(self, head, line):
        head.answered = True
        self.awaiting.popleft()
        if line.kind == Kind.ROOM_NOW and head.command is JOIN:
            self.key_given = (head.text.split(None, 2)[2:] or [None])[0]

    def _a_return(self, line):
        """Someone who was here before the reconnect, coming back: learnt, told later."""
        if line.kind != Kind.JOINED or self.rejoining or \
                self.returning.pop(line.nick.casefold(), None) is None:
            return False
        self._learn(line)
        self.returned.append(line.nick)
        if self.returning:
            self.ui.returns_pending(RETURNS_QUIET)
        else:
            self.tell_returns()
        return True

    def tell_returns(self):
        """One line for the members who came back (the client's timer, or the last of them)."""
        if self.returned:
            self.ui.note(Notes.RETURNED.format(count=len(self.returned),
                                               nicks=", ".join(self.returned)))
        self.returned = []
        self.returning = {}   # the burst is over: later joins are shown as they come

    def _answers_quiet(self, line, head):
        """Is this (part of) the answer to a line the client sent by itself: the /users on
        joining, then the /rooms? Then it is not shown. A version 1 server answers /users as a
        message: 'Server: ok!' and 'YOU SEND USERS /users', or 'Server: there are no other
        users!' when alone; a version 2 server knows no /rooms."""
        if head.command is USERS:
            if line.kind == Kind.USERS:
                self.awaiting.popleft()
                self._learn_users(line)
                for key in self.members:
                    self.returning.pop(key, None)   # back already: no return to tell
                self._send_member_line(ROOMS_COMMAND, quiet=True)
                return True
            if line.kind == Kind.OK:
                return True   # version 1: the repeat of '/users' follows
            if line.kind == Kind.OWN_MESSAGE and line.said == USERS_COMMAND \
                    or line.body == Lines.ALONE:
                self.awaiting.popleft()
                self.server_has_commands = False
                for waiting in self.awaiting:   # commands typed meanwhile are messages there too
                    waiting.command, waiting.ok_first, waiting.answers = \
                        MESSAGE, MESSAGE.ok_first, MESSAGE.answers
                return True
        elif head.command is ROOMS:
            if line.kind in (Kind.ROOMS, Kind.ERROR):   # (version 2: 'Unknown command')
                self.awaiting.popleft()
                if line.kind == Kind.ROOMS:
                    self.rooms = {room.casefold(): room for room in rooms_listed(line.said)}
                self._say_who_is_here()   # once both are known: Tab completes from them now
                return True
        return False

    def _say_who_is_here(self):
        nicks = sorted(self.members.values(), key=str.casefold)
        room = self.room or MAIN_ROOM_NAME
        self.ui.note(Notes.WITH_YOU.format(room=room, nicks=", ".join(nicks)) if nicks
                     else Notes.NOBODY_ELSE.format(room=room))

    def _is_own(self, line):
        if line.kind in (Kind.OWN_MESSAGE, Kind.OWN_PRIVATE, Kind.ROOM_NOW, Kind.REGISTERED,
                         Kind.LOGIN_TOKEN):
            return True
        return line.kind in (Kind.ACTION, Kind.RENAMED, Kind.TOPIC_SET) and \
            same_nick(line.nick, self.nick)

    def _learn(self, line):
        kind = line.kind
        if kind == Kind.JOINED and not same_nick(line.nick, self.nick):
            self.members[line.nick.casefold()] = line.nick
        elif kind == Kind.LEFT:
            self.members.pop(line.nick.casefold(), None)
        elif kind == Kind.RENAMED:
            self.members.pop(line.nick.casefold(), None)
            if line.own:
                self.nick = line.other   # the prompt follows, once the line is shown
            elif not same_nick(line.other, self.nick):
                self.members[line.other.casefold()] = line.other
        elif kind == Kind.HEADING:
            self.past_left = line.other or 0
        elif kind == Kind.ROOM_NOW:
            self.room = line.room
            self.members.clear()   # the quiet /users that follows tells who is there
            self.rooms.setdefault(line.room.casefold(), line.room)
            self.room_key, self.key_given = self.key_given, None   # (none after a /drop)
        elif kind == Kind.ROOMS:
            self.rooms = {room.casefold(): room for room in rooms_listed(line.said)}
        elif kind == Kind.ROOM_CLOSED:
            self.rooms.pop(line.room.casefold(), None)

    def _learn_users(self, line):
        self.members = {nick.casefold(): nick for nick in users_listed(line.said, line.other)
                        if not same_nick(nick, self.nick)}

    def _mark_mention(self, line):
        if line.kind not in (Kind.MESSAGE, Kind.ACTION, Kind.PRIVATE):
            return
        from_the_past = self.past_left > 0
        if from_the_past:
            self.past_left -= 1
        if line.own or same_nick(line.nick, self.nick):
            return
        line.mention = mentions(line.said, self.nick)
        line.bell = (line.mention or line.kind == Kind.PRIVATE) and not from_the_past


# Lines that answer a line a member sent (besides 'there are no other users!' and one's own).
_ANSWER_KINDS = frozenset((Kind.OK, Kind.ERROR, Kind.USERS, Kind.ROOMS, Kind.HELP, Kind.TOPIC,
                           Kind.HEADING, Kind.BANS, Kind.NOTICE))
MAIN_ROOM_NAME = "#main"
MAIN_ROOM = MAIN_ROOM_NAME.casefold()
USERS_COMMAND = "/users"
ROOMS_COMMAND = "/rooms"
_ROOM_ENTRY = re.compile(r"(#[\w-]+) \(\d+(?:, key)?\)(?:, |\Z)")


def rooms_listed(text):
    """The room names of 'Rooms ({n}): #main (5), #ops (2, key)'."""
    return _ROOM_ENTRY.findall(text or "")


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
    PAST = "2;33"        # dim: the headings of what was said before you came, and the topic
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
            return [(line.body[:len(line.body) - len(said)], Style.QUIET), (said, text_style)]
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
        if kind in (Kind.HEADING, Kind.TOPIC):
            return [(line.body, Style.PAST)]   # what follows (or the topic) was said before
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
        checks it (asked again while it is off: the next password's prompt)."""
        if not self.tty:
            return
        if self.saved_mode is None:
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
        # Signals are the loop's business (see TerminalSignals): Ctrl-C reaches the loop, which
        # acts on it between events, and readline must not act on SIGWINCH or SIGTSTP itself.
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
        self.keeps_line = None     # line -> bool: may the history keep it? (no passwords)
        self.replaces_echo = None  # line -> bool: erase the echoed input line?

    def _set_int(self, name, value):
        try:
            self.ctypes.c_int.in_dll(self.lib, name).value = value
        except ValueError:
            pass

    def mark_pastes(self):
        """A paste comes whole (and more than a few lines are asked about first) only if the
        terminal marks it, which it does once readline asks (ESC [?2004h): Python 3.10 and
        later turn that off in their readline setup (bpo-42819), so it is turned on again."""
        if "libedit" not in (self.module.__doc__ or ""):
            self.module.parse_and_bind("set enable-bracketed-paste on")

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
            if self.keep_history and line.strip() and (self.keeps_line is None
                                                       or self.keeps_line(line)):
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
        self.aside = None           # the input line set aside while a nickname is asked
        self._escape = False        # skipping an escape sequence (arrow keys) in a password
        self.ended = False
        if vt:
            readline.mark_pastes()

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

    def set_aside(self):
        """The input line out of the way (kept, not lost) until bring_back()."""
        line, _ = self.rl.current_input()
        if line and self.aside is None:
            self.aside = line
            self.rl.set_prompt(self.rl.prompt, line=b"")

    def bring_back(self):
        """The line set aside, back in place of whatever is there (typed at the nickname
        prompt: a nickname the client's own retry made needless)."""
        aside, self.aside = self.aside, None
        if aside:
            self.rl.set_prompt(self.rl.prompt, line=aside)

    def offer(self, text):
        """``text`` in the input line, ready for Enter, unless something is typed there."""
        if not self.rl.current_input()[0]:
            self.rl.set_prompt(self.rl.prompt, line=text.encode("utf-8", "replace"))

    # -- a password: readline stays installed (its raw mode echoes nothing) but does not get
    #    the keys, so the password is never on screen nor in the history. So it stays until
    #    end_secret(), after the server has checked the password: what is typed meanwhile
    #    (the password again, perhaps) is not shown either.
    def begin_secret(self, prompt):
        if self.secret is not None:
            self.rl.set_prompt(prompt, line=b"")   # (the next password's question)
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
    """SIGINT, SIGWINCH, SIGTSTP, SIGCONT, SIGTERM and SIGHUP reach the select loop as bytes on
    a socketpair (signal.set_wakeup_fd): a Python handler may run in the middle of a redisplay,
    or of the server's lines (a KeyboardInterrupt there lost the rest of what was read, and an
    answer with it: the line it answered was later taken for unanswered and the connection for
    dead), so the handlers do nothing and the loop acts between two events."""

    NAMES = ("SIGINT", "SIGWINCH", "SIGTSTP", "SIGCONT", "SIGTERM", "SIGHUP")

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


# Shared copy: chat_server.py has this function too, word for word (each .pyz holds one module).
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

    def __init__(self, host, port, tls_context=None, ca_path=None):
        self.host = host
        self.address = format_address(host, port)
        self.tls_context = tls_context
        self.ca_path = ca_path         # --tls-ca: named when the certificate fails its check
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
        keep_alive(self.sock)
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
                address=self.address, reason=clause(exc.verify_message or exc.reason),
                change=self._what_changed(exc.verify_code), ca=self.ca_path))
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

    def _what_changed(self, code):
        """What the verification error says of the server's certificate, in words a person
        can act on (OpenSSL's X509_V_ERR codes)."""
        if code in (9, 10):        # not yet valid, expired
            return Notes.TLS_CHANGE_EXPIRED
        if code in (62, 64):       # host name, IP address mismatch
            return Notes.TLS_CHANGE_HOST.format(host=self.host)
        return Notes.TLS_CHANGE_UNSIGNED.format(ca=self.ca_path)

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


# TCP keepalive: an idle connection whose server vanished (a laptop's network gone, a server's
# machine off) is found dead within KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL
# seconds, and sent data unacknowledged for USER_TIMEOUT seconds ends it (Linux).
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
USER_TIMEOUT = 30


# macOS's numbers for the keepalive options Python names only from 3.10 (netinet/tcp.h).
MACOS_KEEPALIVE_OPTIONS = {"TCP_KEEPALIVE": 0x10, "TCP_KEEPINTVL": 0x101, "TCP_KEEPCNT": 0x102}


def keep_alive(sock):
    """Turn TCP keepalive on with our timings, as far as the platform lets us."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        return
    options = (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPALIVE", KEEPALIVE_IDLE),   # (macOS)
               ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL), ("TCP_KEEPCNT", KEEPALIVE_COUNT),
               ("TCP_USER_TIMEOUT", USER_TIMEOUT * 1000))
    for name, value in options:
        option = getattr(socket, name, None)
        if option is None and sys.platform == "darwin":   # (named by Python only from 3.10)
            option = MACOS_KEEPALIVE_OPTIONS.get(name)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass
    if hasattr(socket, "SIO_KEEPALIVE_VALS") and not hasattr(socket, "TCP_KEEPIDLE"):
        try:   # older Windows: idle and interval in milliseconds
            sock.ioctl(socket.SIO_KEEPALIVE_VALS,
                       (1, KEEPALIVE_IDLE * 1000, KEEPALIVE_INTERVAL * 1000))
        except (OSError, ValueError):
            pass


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


def client_folder():
    """Where the client keeps its files: %APPDATA%\\chat_client on Windows, else
    $XDG_CONFIG_HOME/chat_client (~/.config/chat_client)."""
    if platform_name() == "windows":
        base = os.environ.get("APPDATA") or os.path.expanduser("~")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".config")
    return os.path.join(base, "chat_client")


def default_known_servers():
    return os.path.join(client_folder(), "known_servers")


class LoginTokens:
    """The login tokens the servers gave this user (/token), in a JSON file of their own:
    {"127.0.0.1:8000": {"alice": TOKEN}, "10.0.0.5:9000 tls": {...}}, the server as the client
    names it, ' tls' after it for a TLS connection (a token given over TLS never goes out in
    plain text, where anyone on the way could read it), then the casefolded nickname.

    A token joins as the nickname, as its password does: the file is made readable by this
    user only (mode 0600 from its creation on POSIX; on Windows, the rights of the folder) and
    always written whole, to a new file renamed over the old one, so that a crash or a full
    disk never leaves half of it. A file that can't be read or is not such an object counts as
    empty, said once (``note``); the next token moves it aside (``.damaged`` after its name)
    rather than write over it: a mistyped --token-file may name a file of the user's. Read at
    each use,
    never kept: another client may have changed it meanwhile. (Two clients saving a token at
    the same moment: the last one's file wins, and the other's nickname is asked for its
    password next time, as before its /token.)"""

    TOKEN = re.compile(_FIELD_PATTERNS["token"] + r"\Z")
    DAMAGED = ".damaged"

    def __init__(self, path, note):
        self.path = path
        self.note = note
        self.damaged = False        # the file, as last read, is not ours to write over
        self.damage_told = False

    @staticmethod
    def server(address, tls):
        return address + " tls" if tls else address

    def token(self, server, nick):
        """The token saved for ``nick`` on ``server``, or None."""
        return self._read().get(server, {}).get(nick.casefold())

    def save(self, server, nick, token):
        """Keep ``token``; False (and said why) if the file can't be written."""
        tokens = self._read()
        tokens.setdefault(server, {})[nick.casefold()] = token
        return self._write(tokens)

    def forget(self, server, nick, token):
        """Forget ``token`` (refused), if the file still has it: not a newer one another
        client saved meanwhile."""
        tokens = self._read()
        if tokens.get(server, {}).get(nick.casefold()) != token:
            return
        del tokens[server][nick.casefold()]
        if not tokens[server]:
            del tokens[server]
        self._write(tokens)

    def _read(self):
        self.damaged = False
        try:
            with open(self.path, encoding="utf-8") as f:
                tokens = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:   # (ValueError: not UTF-8, JSON)
            return self._damaged(getattr(exc, "strerror", None) or exc)
        if not (isinstance(tokens, dict) and all(
                isinstance(nicks, dict) and all(isinstance(token, str) and self.TOKEN.match(token)
                                                for token in nicks.values())
                for nicks in tokens.values())):
            # (A token is checked too: it is sent as a line, and must not be two lines.)
            return self._damaged(Notes.TOKENS_NOT_OURS)
        return tokens

    def _damaged(self, reason):
        self.damaged = True
        if not self.damage_told:
            self.damage_told = True
            self.note(Notes.TOKENS_DAMAGED.format(path=self.path, reason=clause(reason),
                                                  kept=self._aside()))
        return {}

    def _move_aside(self):
        """The damaged file, renamed to a name not taken (``.damaged``, ``.damaged.2``...):
        never over an earlier one, and never a folder (--token-file naming one: the write
        then fails, and says so)."""
        if not os.path.isfile(self.path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.path)
        os.rename(self.path, self._aside())
        self.damaged = False

    def _aside(self):
        aside, n = self.path + self.DAMAGED, 1
        while os.path.lexists(aside):
            n += 1
            aside = "%s%s.%d" % (self.path, self.DAMAGED, n)
        return aside

    def _write(self, tokens):
        folder = os.path.dirname(os.path.abspath(self.path))
        temp = None
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if self.damaged:
                self._move_aside()
            # mkstemp: os.open with O_EXCL and mode 0o600, under a name no other client uses.
            fd, temp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(self.path) + ".")
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(tokens, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
            return True
        except OSError as exc:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
            self.note(Notes.TOKENS_NOT_WRITTEN.format(path=self.path,
                                                      reason=clause(exc.strerror or exc)))
            return False


def default_token_file():
    return os.path.join(client_folder(), "login_tokens")


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

# Shared copy: chat_server.py has this function too, word for word (each .pyz holds one module).
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
        several = len(options.servers) > 1
        self.session = Session(self, nick=options.nick, password=options.password,
                               nick_password=options.nick_password,
                               interactive=interactive,
                               # A pipe reconnects too when it has another server to go to.
                               reconnect=options.reconnect and (interactive or several),
                               list_users=self.readline is not None,
                               erases_echo=self.readline is not None and presenter.vt,
                               servers=len(options.servers),
                               tokens=LoginTokens(options.token_file, self.note),
                               tls=options.tls_context is not None)
        self.selector = selectors.DefaultSelector()
        self.watched = {}              # fd -> (mask, handler)
        self.connection = None
        self.server_at = 0             # which of options.servers the connection goes to
        self.cannot_connect = []       # why each server failed, until one answers
        self.incoming = LineSplitter()
        self.backoff = Backoff()
        self.connect_deadline = self.probe_at = self.reconnect_at = self.nick_retry_at = None
        self.returns_at = None
        # A dead connection is one that leaves the server's answer owed too long: since when
        # one is owed, and when the server last said anything.
        self.owed_since = None
        self.heard_at = 0.0
        self.question = None           # answers the next typed line (trust, a long paste)
        self.interrupted = False       # Ctrl-C came: acted on once the turn's events are done
        # Rows of the reconnect status while it is the last thing printed above the input
        # (0: it is not): the next attempt's status then takes its place.
        self.status_rows = 0
        self.known = KnownServers(options.known_servers)

    # -- the loop -------------------------------------------------------------------------
    def run(self):
        try:
            if self.readline:
                self.readline.replaces_echo = self.session.replaces_echo
                self.readline.keeps_line = self.session.keeps_in_history
                self.readline.set_completer(self._complete)
                self.output.start(self.session.prompt())
            self._open_connection()
            while True:
                try:
                    self._turn()
                except KeyboardInterrupt:
                    self._interrupted()
        finally:
            self._close()

    def _turn(self):
        self._watch()
        for key, mask in self.selector.select(self._timeout()):
            key.data(mask)
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt   # (run() asks or leaves: between events, nothing half done)
        if self.connection is not None and self.connection.error:
            self._lost(Notes.CONNECTION_LOST.format(reason=clause(self.connection.error)))
        self._run_timers()

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
        deadlines = [t for t in (self.connect_deadline, self.probe_at, self.reconnect_at,
                                 self.nick_retry_at, self.returns_at, self._answer_deadline())
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
        if self.nick_retry_at is not None and now >= self.nick_retry_at:
            self.nick_retry_at = None
            self.session.retry_nickname()
        if self.returns_at is not None and now >= self.returns_at:
            self.returns_at = None
            self.session.tell_returns()
        answer_due = self._answer_deadline()
        if answer_due is not None and now >= answer_due:
            self._lost(Notes.CONNECTION_LOST.format(reason=Notes.NO_ANSWER.format(
                address=self.connection.address, seconds=int(ANSWER_TIMEOUT))))

    def _answer_deadline(self):
        """When the connection is to be taken for dead: ANSWER_TIMEOUT after an answer became
        owed, or after the server last said something, whichever is later. (TCP keepalive
        finds a dead peer of an idle connection; this finds one as soon as it matters, and a
        server that stopped without closing, which keepalive never finds.)"""
        conn = self.connection
        if conn is None or conn.state != Connection.OPEN or self.question is not None \
                or not self.session.expects_answer():
            self.owed_since = None
            return None
        if self.owed_since is None:
            self.owed_since = time.monotonic()
        return max(self.owed_since, self.heard_at) + ANSWER_TIMEOUT

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
        self.owed_since = None
        host, port = self.options.servers[self.server_at]
        try:
            self.connection = Connection(host, port, self.options.tls_context,
                                         ca_path=self.options.tls_ca)
        except ConnectFailed as failure:
            self._connect_failed(failure)
            return
        self.connect_deadline = time.monotonic() + CONNECT_TIMEOUT

    def _next_server(self):
        self.server_at = (self.server_at + 1) % len(self.options.servers)

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
            *self.options.servers[self.server_at])
        self._drop_connection()
        if self.session.phase == Phase.OFFLINE:
            if self.session.retry_after is None:
                self._next_server()
            self._schedule_reconnect()
            return
        # A first connection: the next server at once, while one is left to try.
        message = Notes.CANNOT_CONNECT.format(address=address, reason=clause(failure.reason))
        self.cannot_connect.append(message)
        if len(self.cannot_connect) < len(self.options.servers):
            self._next_server()
            self._open_connection()
            return
        raise ClientExit(ExitStatus.FAILED, "\n".join(self.cannot_connect)
                         + (Notes.REFUSED_HINT if failure.refused else ""))

    def _schedule_reconnect(self):
        """The next attempt: after the back-off's delay, or after the delay the session asked
        for (at once for a password typed wrong, after a lockout's end)."""
        session = self.session
        if session.retry_after is not None:
            delay, template = session.retry_after, session.retry_note
        else:
            delay, template = self.backoff.next(), None
        self.reconnect_at = time.monotonic() + delay
        if delay or template:
            self._show_reconnecting(delay, template)

    def _show_reconnecting(self, delay, template=None):
        """One status line per outage, not one per attempt: where the terminal can, each
        attempt's status replaces the last one's (while nothing came below it); elsewhere
        the first attempt's is all that is said."""
        if template is None:
            template = (Notes.RECONNECTING_AFTER_SHUTDOWN if self.session.farewell
                        else Notes.RECONNECTING)
        text = self.presenter.note(template.format(delay=delay))
        if not self.interactive:
            self._to_stderr(text)   # a pipe with another server to go to: its stdout is the chat's
            return
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
                self.heard_at = time.monotonic()
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
        if self.cannot_connect and not self.session.joined_once:
            self.note(Notes.CONNECTED_TO.format(address=self.connection.address))
        self.cannot_connect = []
        if self.connection.is_tls:
            self._check_certificate()
        else:
            self.probe_at = time.monotonic() + PLAIN_PROBE_AFTER
            self.session.connected(self.connection.address)

    def _lost(self, reason):
        conn = self.connection
        if reason is None and conn is not None and not conn.is_tls and not conn.received_any:
            # Closed without a word in plain text: a TLS server refusing us. A verdict, not a
            # loss, even when reconnecting: every attempt would meet the same server.
            raise ClientExit(1, Notes.EXPECTS_TLS.format(address=conn.address))
        self._drop_connection()
        self.nick_retry_at = None
        self.session.connection_closed(reason)   # raises ClientExit unless reconnecting
        if self.session.retry_after is None and len(self.options.servers) > 1:
            self._next_server()   # (a password retried, a lockout waited: the same server)
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
        self.session.connected(conn.address)

    def _ask_trust(self, actual):
        conn = self.connection
        if not self.interactive:
            raise ClientExit(1, Notes.TLS_UNKNOWN_IN_PIPE.format(address=conn.address,
                                                                 actual=actual))
        conn.reading = False   # the server's lines wait in the kernel until this is answered
        self.note(Notes.TLS_FIRST_USE.format(address=conn.address, actual=actual))

        def answer(text):
            if text.strip().lower() not in ("y", "yes"):
                raise ClientExit(1, Notes.TLS_NOT_TRUSTED.format(address=conn.address))
            self.known.remember(conn.address, actual)
            self.note(Notes.TLS_REMEMBERED.format(path=self.known.path))
            conn.reading = True
            self.session.connected(conn.address)
        self.ask(Notes.TRUST_PROMPT, answer)

    # -- standard input -------------------------------------------------------------------
    def _on_input(self, mask):
        for line in self.input.read():
            if line is None:
                self._input_ended()
                return
            if self.question is not None:
                self.question(line)
            elif self.interactive and "\n" in line:
                self._pasted(line.split("\n"))
            else:
                self.session.typed(line)

    def _pasted(self, lines):
        """A paste of several lines (readline's bracketed paste hands it over whole): each
        line goes as a message of its own, in order; more than PASTE_ASK_OVER are sent only
        once the user says so."""
        if lines and not lines[-1].strip():
            lines.pop()   # the paste ended with a line end
        if len(lines) <= PASTE_ASK_OVER:
            for text in lines:
                self.session.typed(text)
            return

        def answer(text):
            if text.strip().lower() in ("y", "yes"):
                self.session.paste(lines)
            else:
                self.note(Notes.PASTE_DROPPED.format(count=len(lines)))
        self.ask(Notes.PASTE_QUESTION.format(count=len(lines)), answer)

    def ask(self, question, answer):
        """Ask the user something: the next line typed goes to ``answer`` (kept out of the
        history), and the prompt comes back after it."""
        if self.readline:
            self.readline.keep_history = False

        def answered(text):
            self.question = None
            if self.readline:
                self.readline.keep_history = True
            self.prompt_changed()
            answer(text)
        self.question = answered
        self.output.ask(question)

    def _interrupted(self):
        """Ctrl-C: leave, unless a long paste is still being sent: then ask whether to drop
        the rest of it."""
        waiting = self.session.paste_waiting()
        if not waiting or self.question is not None:
            self._leaving()
            raise KeyboardInterrupt

        def answer(text):
            if text.strip().lower() in ("y", "yes"):
                self.note(Notes.PASTE_DROPPED.format(count=self.session.drop_paste()))
        self.ask(Notes.DROP_QUESTION.format(count=waiting), answer)

    def _leaving(self):
        """The user leaves (Ctrl-C, Ctrl-D). While reconnecting, the lines the lost connection
        never answered are told first, on standard error, and the status says they were lost."""
        lost = self.session.unconfirmed
        if lost:
            raise ClientExit(ExitStatus.LOST, "\n".join(
                Notes.NOT_CONFIRMED.format(text=masked(text)) for text in lost))

    def _input_ended(self):
        self.input.ended = True
        if self.interactive:
            self._leaving()
            raise ClientExit(0)   # Ctrl-D: the user leaves
        self.session.input_ended()

    def _complete(self, text, state):
        import readline
        words_before = readline.get_line_buffer()[:readline.get_begidx()].split()
        matches = self.session.completions(text, words_before)
        return matches[state] if state < len(matches) else None

    # -- signals (POSIX terminal) -------------------------------------------------------------
    def _on_signals(self, mask):
        pending = self.signals.received()
        if pending:
            self.status_rows = 0   # rows may have moved (a resize, the shell's lines after ^Z)
        while pending:
            number = pending.pop(0)
            if number == signal.SIGINT:
                self.interrupted = True   # not here: this may be in the middle of a line shown
            elif number == signal.SIGWINCH:
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
        """The client's own words: on a terminal among the lines; from a pipe, on standard
        error (standard output is the server's lines, exactly)."""
        if not self.interactive:
            self._to_stderr(text)
            return
        self._signals_first()
        self.output.write(self.presenter.note(text, style))
        self.status_rows = 0

    @staticmethod
    def _to_stderr(text):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

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

    def ask_password(self, prompt):
        self.input.begin_secret(prompt)

    def unconfirmed(self, text):
        """A line the lost connection never answered, when the client ends (or, in a pipe,
        goes on to another server): standard error in a pipe, a note on a terminal."""
        self.note(Notes.NOT_CONFIRMED.format(text=text))

    def offer_again(self, text):
        """Put a line back in the input line, where Enter sends it (readline only; where the
        input line is empty: what the user typed meanwhile stays)."""
        if self.readline is not None:
            self.output.offer(text)

    def retry_nickname(self, delay):
        self.nick_retry_at = time.monotonic() + delay

    def set_aside_input(self):
        """Back after a reconnect, our nickname was refused: a nickname is asked for, and the
        half-typed line (Enter would send it as one) waits out of the input line until joined."""
        if self.readline is not None:
            self.output.set_aside()

    def returns_pending(self, delay):
        """More members may come back: sum them up once none has for ``delay`` seconds."""
        self.returns_at = time.monotonic() + delay

    def half_close(self):
        if self.connection is not None:
            self.connection.half_close()

    def joined(self):
        self.backoff.reset()
        if self.readline is not None:
            self.output.bring_back()


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

# Shared copy: chat_server.py has this class too, word for word (each .pyz holds one module).
class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr naming the option, exit status 2."""

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


_SERVER = re.compile(r"\[(?P<v6>[^\]]+)\](?::(?P<v6port>[^:]*))?\Z|(?P<host>[^:\[\]]+)"
                     r"(?::(?P<port>[^:]*))?\Z|(?P<bare6>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)\Z")


def server_list(text):
    """'HOST[:PORT][,HOST[:PORT]...]' -> [(host, port or None)]; an IPv6 address with a port
    goes in brackets ('[::1]:8000')."""
    servers = []
    for entry in text.split(","):
        entry = entry.strip()
        match = _SERVER.match(entry)
        if not entry or not match:
            raise argparse.ArgumentTypeError("%r is not HOST or HOST:PORT" % entry)
        host = match.group("v6") or match.group("host") or match.group("bare6")
        port = match.group("v6port") if match.group("v6") else match.group("port")
        servers.append((host, None if port is None else port_number(port)))
    return servers


def yes_or_no(text):
    value = text.strip().lower()
    if value not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        raise argparse.ArgumentTypeError("%r is not yes or no" % text)
    return value in ("yes", "true", "on", "1")


def default_config_file():
    """The settings file, beside the known-servers file in the user's config folder."""
    return os.path.join(client_folder(), "client.ini")


# The settings file's [chat_client] section: each setting, the option it stands for, and how
# its text is read. The environment comes before the file, the command line before both.
SETTINGS = (
    ("server", "server", server_list),
    ("nick", "nick", nickname),
    ("password-file", "password_file", str),
    ("nick-password-file", "nick_password_file", str),
    ("tls", "tls", yes_or_no),
    ("tls-ca", "tls_ca", str),
    ("tls-fingerprint", "tls_fingerprint", fingerprint),
    ("known-servers", "known_servers", str),
    ("token-file", "token_file", str),
)
ENVIRONMENT = (("CHAT_SERVER", "server", server_list), ("CHAT_NICK", "nick", nickname))


def parse_args(argv, environ=None):
    environ = os.environ if environ is None else environ
    parser = OneLineParser(
        prog="chat_client", description="Terminal client for the console chat.",
        epilog="Defaults for server, nick, password-file, nick-password-file, tls, tls-ca, "
               "tls-fingerprint, known-servers and token-file may be kept in %s (an INI file: a "
               "[chat_client] section, one 'setting = value' a line); CHAT_SERVER and CHAT_NICK "
               "come before it, the command line before both." % default_config_file()
               .replace("%", "%%"))
    parser.add_argument("--version", action="version", version="chat_client " + VERSION)
    parser.add_argument("--server", type=server_list, action="append", metavar="HOST[:PORT]",
                        help="a server to connect to; give it more than once (or HOST:PORT,"
                             "HOST:PORT) for others to fail over to (or set CHAT_SERVER)")
    parser.add_argument("--host", help="server address (default %s)" % DEFAULT_HOST)
    parser.add_argument("--port", type=port_number,
                        help="server port (default %d)" % DEFAULT_PORT)
    parser.add_argument("--nick", type=nickname, metavar="NAME",
                        help="join with this nickname (on a terminal, asked again if refused; "
                             "or set CHAT_NICK)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="the chat's password: the first line of this file "
                             "(or set CHAT_PASSWORD)")
    parser.add_argument("--nick-password-file", metavar="PATH",
                        help="the password of your registered nickname: the first line of "
                             "this file (or set CHAT_NICK_PASSWORD)")
    parser.add_argument("--tls", action="store_true", default=None,
                        help="speak TLS to the server")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="verify the server's certificate with these CA certificates "
                             "(chain and host name; implies --tls)")
    parser.add_argument("--tls-fingerprint", type=fingerprint, metavar="HEX",
                        help="accept only a certificate with this SHA-256 fingerprint "
                             "(implies --tls)")
    parser.add_argument("--known-servers", metavar="PATH",
                        help="the file of trusted certificate fingerprints (default %s)"
                             % default_known_servers().replace("%", "%%"))
    parser.add_argument("--token-file", metavar="PATH",
                        help="keep the login tokens /token gives in this file, to answer the "
                             "password question of your registered nickname (default %s)"
                             % default_token_file().replace("%", "%%"))
    parser.add_argument("--config", metavar="PATH",
                        help="the settings file (default %s)"
                             % default_config_file().replace("%", "%%"))
    parser.add_argument("--color", default="auto",
                        choices=("auto", "always", "never"),
                        help="colours: auto (a terminal, NO_COLOR unset), always, never")
    parser.add_argument("--no-bell", action="store_true",
                        help="no bell when your nickname is mentioned or a private message "
                             "comes")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="end when the connection is lost instead of reconnecting (a "
                             "terminal, or a pipe given more than one server)")
    args = parser.parse_args(argv)
    if args.server:
        args.server = [entry for servers in args.server for entry in servers]
    elif args.host is not None or args.port is not None:
        args.server = [(args.host or DEFAULT_HOST, None)]
    defaults = read_settings(args.config or default_config_file(), args.config is not None)
    defaults.update(read_environment(environ))
    for _, name, _ in SETTINGS:
        if getattr(args, name) is None and name in defaults:
            setattr(args, name, defaults[name])
    port = args.port or DEFAULT_PORT
    args.server = [(host, entry_port or port)
                   for host, entry_port in (args.server or [(DEFAULT_HOST, None)])]
    return args


def read_settings(path, named):
    """The settings file's values by option name; {} when there is none (an error if the file
    was named with --config)."""
    import configparser
    config = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8-sig") as f:
            config.read_file(f)
    except FileNotFoundError:
        if named:
            raise ClientExit(ExitStatus.FAILED, "chat_client: --config: cannot read %s: No such "
                                                "file or directory" % path)
        return {}
    except (OSError, UnicodeError, configparser.Error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise ClientExit(ExitStatus.FAILED, "chat_client: cannot read %s: %s" % (path, reason))
    known = {setting: (name, read) for setting, name, read in SETTINGS}
    values = {}
    for section in config.sections():
        if section != "chat_client":
            raise ClientExit(ExitStatus.FAILED, "chat_client: %s: unknown section [%s] (the "
                                                "settings go in [chat_client])" % (path, section))
        for setting, text in config.items(section):
            if setting not in known:
                raise ClientExit(ExitStatus.FAILED, "chat_client: %s: unknown setting %r (known: "
                                 "%s)" % (path, setting, ", ".join(known)))
            name, read = known[setting]
            try:
                values[name] = read(text)
            except argparse.ArgumentTypeError as exc:
                raise ClientExit(ExitStatus.FAILED, "chat_client: %s: %s: %s"
                                 % (path, setting, exc))
    return values


def read_environment(environ):
    values = {}
    for variable, name, read in ENVIRONMENT:
        if environ.get(variable):
            try:
                values[name] = read(environ[variable])
            except argparse.ArgumentTypeError as exc:
                raise ClientExit(ExitStatus.FAILED, "chat_client: %s: %s" % (variable, exc))
    return values


class Options:
    """What the command line, the environment and the settings file ask for, checked."""

    def __init__(self, args, environ):
        self.servers = args.server
        self.host, self.port = self.servers[0]
        self.nick = args.nick
        self.password = first_line("--password-file", args.password_file,
                                   environ.get("CHAT_PASSWORD"))
        self.nick_password = first_line("--nick-password-file", args.nick_password_file,
                                        environ.get("CHAT_NICK_PASSWORD") or None)
        self.tls_fingerprint = args.tls_fingerprint
        self.tls_ca = args.tls_ca
        self.tls_context = None
        if args.tls or args.tls_ca or args.tls_fingerprint:
            self.tls_context = self._tls_context(args.tls_ca)
        self.known_servers = args.known_servers or default_known_servers()
        self.token_file = args.token_file or default_token_file()
        self.color = args.color
        self.bell = not args.no_bell
        self.reconnect = not args.no_reconnect

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


def first_line(option, path, fallback):
    """A password: the first line of the file ``path`` names, or ``fallback`` (from the
    environment) when there is no file."""
    if path is None:
        return fallback
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError as exc:   # not a usage error: the option was right, the file is not
        raise ClientExit(1, "chat_client: %s: cannot read %s: %s"
                         % (option, path, exc.strerror or exc))
    # A UTF-8 byte order mark is not part of the password: PowerShell 5 writes one
    # (Set-Content -Encoding UTF8), and the server reads the same file as utf-8-sig.
    if first.startswith(codecs.BOM_UTF8):
        first = first[len(codecs.BOM_UTF8):]
    return decode_input(first.rstrip(b"\r\n"))


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
    configure_stdio()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
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
