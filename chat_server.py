#!/usr/bin/env python3
r"""Console chat server: one thread, one non-blocking selectors loop, a line protocol.

The protocol is docs/PROTOCOL.md. The file reads top to bottom in this order:

* settings, then the protocol's lines, spelled once (``Lines``), the reasons a connection ends
  (``Reason``), and the phases of a connection with the moves between them (``Phase``,
  ``PHASE_MOVES``);
* text rules: control characters, nicknames and their look-alike skeletons, room names, password
  hashing (scrypt, on worker threads: ``ThreadHashing``), the clock;
* the room core (``Chat``, with ``Peer`` and ``Room``): a line from a connection in, queued bytes
  for each connection out, and the phase the connection moves to. It never touches a socket (the
  shape of h11), so its rules are testable without a network. ``Chat`` is made of parts, each a
  class: Delivering, Keeping, Arriving, Talking, Registering, Moderating, Leaving, Applying.
  Commands are records in one table (``COMMANDS``), from which /help is made. Every change of the
  chat's state is an entry of the room log (``Entry``): the core decides, a sequencer orders,
  ``Chat.apply`` applies;
* the store: what outlives a connection, behind one small interface, in three homes: memory
  (``MemoryStore``), a SQLite file (``SQLiteStore``, the default), Redis (``ClusterStore``);
* the loop (``Server``, cut along a connection's life: Loop (the turn), Accepting, Handshaking,
  Reading, Writing, Closing, Timers, Watching, Stopping). It enforces the limits (line length,
  send queue, flood control) and writes every connection with new output once per turn just
  before it sleeps in ``select`` (the shape of Redis's beforeSleep);
* what the loop uses: TLS, the logs, a small Redis client (RESP2, non-blocking, in the loop);
* the cluster (``ClusterNode``): the sequencer of several servers, one log stream in Redis;
* the platform, then the command line;
* an appendix: the tables of invisible and look-alike letters.

The room log. An entry is a tuple ``(kind, room, peer, data)``: a message, a /me, a join, a leave,
a rename, a move between rooms, an account's change, an operator's deed (``Entry`` lists all
seventeen kinds and what ``data`` holds for each), ``peer`` being the member it is about. Only the
room core appends entries, and only once it has decided the change is allowed; the sequencer
gives each entry its place in the order and hands it back to be applied, so what a member
receives is the log applied in log order. In one process the sequencer (``LocalSequencer``)
applies at once; in a cluster (``ClusterNode``) an entry is applied when it comes back from
Redis, on every node alike.

A connection lives through explicit phases (``Phase``), each entered in one place (``_move``),
along the moves of ``PHASE_MOVES``:

    NEW -> HANDSHAKE (TLS only) -> PASSWORD (with a password only) -> NICKNAME -> MEMBER
      \________________\______________________\_____________\_____> CLOSING -> LINGERING -> CLOSED

    NICKNAME <-> NICK_PASSWORD   (a registered nickname: its password asked; MEMBER once right)
    MEMBER <-> RENAME_PASSWORD   (/nick to a registered nickname: the same question)

Standard library only, Python 3.8 or newer: this file is zipped alone into chat_server.pyz.
"""

import argparse
import binascii
import collections
import errno
import functools
import heapq
import math
import os
import re
import select
import selectors
import signal
import socket
import struct
import sys
import time
import unicodedata

# Run as a script (`python3 chat_server.py`), CPython keeps the script's whole syntax tree until
# the script ends (pyrun_file frees it only then): 14 MiB for this file, a third of a server
# with 10,000 members. Imported, a module's tree is freed as soon as it is compiled (and the
# bytecode is cached in __pycache__ for the next start). So, started as a script on POSIX, the
# server at once becomes (exec: the same process, the same pid) the interpreter importing this
# file by its path and calling main(), before anything else is done. Not on Windows (its exec
# is a new process), nor when something other than the interpreter itself ran the script (a
# debugger, coverage: another loader), nor with no executable to run.
# (The script's folder first on sys.path, as for the script, before importing; then the file by
# its path, so that no other chat_server.py on the path stands in for it.)
_IMPORT_AND_RUN = ("import os,sys;p=sys.argv[1]\n"
                   "if sys.path[:1]==['']:sys.path[0]=os.path.dirname(os.path.abspath(p))\n"
                   "import importlib.util as u;s=u.spec_from_file_location('chat_server',p)\n"
                   "m=u.module_from_spec(s);sys.modules[s.name]=m;s.loader.exec_module(m)\n"
                   "del sys.argv[0];sys.exit(m.main())")


def _started_as_script():
    loader = globals().get("__loader__")
    return (__name__ == "__main__" and globals().get("__spec__") is None
            and type(loader).__name__ == "SourceFileLoader"
            and os.name == "posix" and bool(sys.executable) and __file__.endswith(".py")
            and not sys.flags.inspect   # (-i: the prompt after it is the user's)
            and os.path.basename(sys.argv[0] if sys.argv else "") == os.path.basename(__file__))


def _start_as_module():
    import subprocess   # (for its one helper: the interpreter's own options, -X and -W too)
    flags = subprocess._args_from_interpreter_flags()
    try:
        os.execv(sys.executable, [sys.executable] + flags
                 + ["-c", _IMPORT_AND_RUN, __file__] + sys.argv[1:])
    except OSError:
        pass   # (could not: it goes on as the script, with its tree)


if _started_as_script():
    _start_as_module()

# ssl and hmac are imported only when TLS or a password is used: each loads OpenSSL, about
# 5 MiB of memory that a plain chat does without.
ssl = None

VERSION = "3.0.0"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_CLIENTS = 10000
# select() handles at most FD_SETSIZE sockets: 512 in Windows builds of Python, 1024 on POSIX.
SELECT_MAX_CLIENTS = 500
DEFAULT_MAX_LINE_BYTES = 4096
DEFAULT_MAX_SEND_QUEUE = 1024 * 1024
DEFAULT_JOIN_TIMEOUT = 60.0
DEFAULT_HISTORY = 20
DEFAULT_KEEP = 10000      # messages kept per room (memory or data file)
DEFAULT_DATA = "chat.db"
DEFAULT_CLUSTER = "chat"  # --cluster: the prefix of every Redis key of one chat
DEFAULT_MAX_ROOMS = 1000  # rooms at once, #main included
SEARCH_SHOWN = 20         # the most lines /search shows (the last that match)
PRUNE_EVERY = 20          # a room's kept messages are pruned each time a 20th of --keep come
CHECKPOINT_EVERY = 0.2    # seconds: how often the data file's WAL is folded into it, at most
PRESENCE_DELAY = 2.0      # seconds before a registered member's presence in a room is written
JOURNAL_HOLDS = 0.5       # seconds a turn's lines wait in the "-lines" journal (TurnJournal)
JOURNAL_MOST_BYTES = 4 * 1024 * 1024   # past this, its lines go into the data file at once
JOURNAL_FAILING_MOST_BYTES = 64 * 1024 * 1024   # while the data file fails: no more than this
WAL_MOST_PAGES = 10000    # past this (some 40 MB), the loop folds the WAL in itself (see Checkpointer)
WAL_FILE_MOST_BYTES = 16 * 1024 * 1024   # the WAL file is cut back to this when it starts again
LIKE_PATTERN_MOST = 50000  # bytes: SQLite's longest LIKE pattern (its default)
DEFAULT_CATCH_UP = 200    # lines of "Messages since you left" at most
MIN_PASSWORD_CHARS = 8    # an account's password
MAX_WAITING = 100         # private messages waiting for one registered nickname
# An account's password hash: scrypt (32 MiB and about 0.1 s of one core here), or PBKDF2 where
# this Python's OpenSSL has no scrypt. The parameters are kept with each hash, so they can be
# raised later without invalidating the old ones.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
PBKDF2_ITERATIONS = 600000
DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?\Z")   # 30m, 2h, 7d, 1d12h
MAX_DURATION_DAYS = 36500
HASHES_QUEUED = 2         # hashes with the worker threads at once, per worker; the rest wait their turn
HASH_WORKERS_MOST = 4     # worker threads that hash passwords, at most (32 MiB each while hashing)
ACCOUNTS_READ_MOST = 10000   # accounts (or their absence) the data file's store remembers
LINES_READ_MOST = 64      # reads of a room's lines the data file's store remembers (catch-ups)
TOKEN_BYTES = 32          # a login token's randomness (43 characters once base64url-encoded)
TOKENS_MOST = 10          # login tokens a nickname holds at most (one a device); the 11th ends the first
TOKENS_PENDING_MOST = 1000   # tokens made whose entry is not applied yet, at most
TOKEN_FORM = re.compile(r"[A-Za-z0-9_-]{43}\Z")
MAIN_ROOM = "#main"
MAX_ROOM_CHARS = 32       # after the "#"
ROOM_KEY_SALT_BYTES = 16
DEFAULT_RATE_LIMIT = 10.0   # lines a second, on average, per connection
DEFAULT_RATE_BURST = 50     # lines at once
DEFAULT_DEAD_PEER = 90.0    # seconds within which a peer that vanished without a word is found
KEEPALIVE_PROBES = 4        # unanswered keepalive probes after which a peer counts as gone
MAX_NICK_CHARS = 32
PASSWORD_ATTEMPTS = 5       # wrong passwords from one address within PASSWORD_WINDOW...
PASSWORD_WINDOW = 60.0      # ...lock it out until this long after its last wrong one
MAX_LOCKOUT_ENTRIES = 100000  # addresses remembered for the lockout, at most (memory bound)

READ_SIZE = 64 * 1024
LINES_PER_TURN = 1024      # lines handled per loop turn, shared fairly by the connections ready
# CPython (3.11 measured) keeps an instance's attributes in a compact form its class shares only
# while they are fewer than 30; past that every ``self.method()`` misses its fast path: 25 ns more
# a call, about 5% of the server's CPU a message at 10 clients when Chat (33 attributes) and
# Server (42) had that many. Their hot attributes are slots, so what is left in each instance's
# dict stays under this (a test holds it).
FEW_ENOUGH_ATTRIBUTES = 30
ACCEPTS_PER_TURN = 512     # so a join storm cannot starve the members already chatting
LINGER_SECONDS = 2.0       # a closing socket drains its peer's input so close() sends FIN, not RST
CLOSING_SECONDS = 10.0     # a closing connection whose last lines can't leave is closed anyway
SHUTDOWN_GRACE = 1.5       # how long queued output may take to leave when the server stops
EMFILE_PAUSE = 0.25        # out of descriptors: stop accepting this long, instead of spinning
TRIM_AFTER_CHURN = 256     # connections opened or closed before freed memory is given back...
TRIM_QUIET = 1.0           # ...once none has for this long (a join storm over, say)
MAX_WAIT = 3600.0          # the longest select() wait (a huge --join-timeout must not overflow)
FD_RESERVE = 24            # descriptors kept for the listener, log, selector and "full" answers
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
SYSLOG_IDENT = "chat_server"
SYSLOG_RETRY_SECONDS = 1.0


class Lines:
    """Every line of the protocol, spelled once. Strings marked seed are kept to the letter."""
    # Before joining
    PASSWORD_PROMPT = "This chat is protected. Please enter the password"  # without a timestamp
    WRONG_PASSWORD = "Sorry! Wrong password."
    LOCKED_OUT = "Sorry! Too many wrong passwords. Try again later."
    WELCOME = "Wellcome! Please enter your nickname"  # seed, sent without a timestamp
    NICK_INVALID = ('Your nickname must contain only letters and numbers, at least one character.'
                    ' "{nick}" is an incorrect nickname.')  # seed
    NICK_TOO_LONG = 'Your nickname must be at most {max} characters. "{nick}..." is too long.'
    NICK_MIXED = 'Your nickname must use a single alphabet. "{nick}" mixes several.'
    NICK_BUSY = '"{nick}" is already busy.'  # seed
    OK = "Server: ok!"  # seed
    HISTORY = "Recent messages ({count}):"
    CONNECTED = "{nick} connected!"  # seed
    # Messages
    NOTHING = "Sorry! You send nothing."  # seed
    ECHO = "YOU SEND USERS {message}"  # seed
    SENT = "{nick} sent {message}"  # seed
    ALONE = "Server: there are no other users!"  # seed
    DISCONNECTED = "{nick} disconnected!"  # seed
    TOO_LONG = "Sorry! Your message is too long (more than {limit} bytes)."
    # Commands
    HELP = "Commands: {commands}. Start a line with // to send a line that begins with /."
    USERS = "Users ({count}): {nicks}"
    USER_AWAY = "{nick} (away)"
    USER_AWAY_TEXT = "{nick} (away: {text})"
    PRIVATE_SENT = "[private] {nick} sent {text}"
    PRIVATE_ECHO = "[private] YOU SEND {target} {text}"
    IS_AWAY = "{target} is away."
    IS_AWAY_TEXT = "{target} is away: {text}"
    NO_SUCH_USER = 'Sorry! There is no user "{nick}".'
    PRIVATE_TO_SELF = "Sorry! You can't send a private message to yourself."
    ACTION = "* {nick} {text}"
    RENAMED = "{old} is now known as {new}"
    GOODBYE = "Goodbye!"
    UNKNOWN_COMMAND = 'Sorry! Unknown command "/{name}". Type /help for the list.'
    USAGE = "Sorry! Usage: {usage}"
    SAME_NICK = "Sorry! You are {nick} already."
    # Rooms
    ROOM_INVALID = ('Sorry! A room name is # and then letters, digits, - or _ (at most {max}).'
                    ' "{name}" is not a room name.')
    IN_ROOM_NOW = "You are in {room} now ({count} users)."
    LEFT_FOR = "{nick} left for {room}."
    JOINED_ROOM = "{nick} joined {room}."
    IN_ROOM_ALREADY = "Sorry! You are in {room} already."
    NEEDS_KEY = "Sorry! {room} needs its key: /join {room} KEY"
    TOO_MANY_ROOMS = "Sorry! There are too many rooms (at most {max})."
    ROOMS = "Rooms ({count}): {rooms}"
    ROOM_ENTRY = "{room} ({count})"
    ROOM_ENTRY_KEY = "{room} ({count}, key)"
    TOPIC = "Topic of {room}: {topic}"
    NO_TOPIC = "{room} has no topic."
    TOPIC_SET = "{nick} set the topic of {room}: {topic}"
    TOPIC_CLEARED = "{nick} cleared the topic of {room}."
    OPERATORS_ONLY = "Sorry! Only operators can do that."
    # Accounts
    REGISTERED = ('"{nick}" is registered to you. Next time you join with it you will be asked'
                  ' for its password.')
    REGISTERED_ALREADY = 'Sorry! "{nick}" is registered already.'
    PASSWORD_TOO_SHORT = "Sorry! A password needs at least {min} characters."
    WRONG_NICK_PASSWORD = 'Sorry! Wrong password for "{nick}".'
    UNREGISTERED = '"{nick}" is no longer registered.'
    NICK_PASSWORD_PROMPT = '"{nick}" is registered. Please enter its password'
    REPLACED = "You joined from somewhere else."
    NOT_REGISTERED = 'Sorry! "{nick}" is not registered.'
    LOGIN_TOKEN = 'Login token for "{nick}": {token}'
    OFFLINE = "{target} is offline; they will get it when they join."
    TOO_MANY_WAITING = "Sorry! {target} has too many waiting messages."
    WAITING = "Private messages while you were away ({count}):"
    CATCH_UP = "Messages since you left ({count}):"
    CATCH_UP_SOME = "Messages since you left ({shown} of {count}):"
    # Moderation
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
    NICK_BANNED = 'Sorry! "{nick}" is banned.'
    NICK_BANNED_UNTIL = 'Sorry! "{nick}" is banned until {until}.'
    NOT_BANNED = 'Sorry! "{what}" is not banned.'
    BANS = "Bans ({count}): {entries}"
    NO_BANS = "Bans (0)."
    BAN_ENTRY_UNTIL = "{what} (until {until})"
    BAN_ENTRY_UNTIL_FOR = "{what} (until {until}: {reason})"
    BAN_ENTRY_FOR = "{what} ({reason})"
    WAS_MUTED = "{nick} was muted by {op}."
    MUTED = "Sorry! You are muted."
    MUTED_UNTIL = "Sorry! You are muted until {until}."
    MAY_SPEAK = "{nick} may speak again."
    NOW_OPERATOR = "You are an operator now."
    NO_LONGER_OPERATOR = "You are no longer an operator."
    OPERATOR_BY_OPTION = "Sorry! {nick} is an operator named by --operators."
    NOT_TO_YOURSELF = "Sorry! You can't do that to yourself."
    IS_OPERATOR = "Sorry! {nick} is an operator."
    BAD_DURATION = "Sorry! A duration is a number and m, h or d, like 30m, 2h or 7d."
    ROOM_CLOSED = "{room} was closed by {op}."
    MAIN_STAYS = "Sorry! #main can't be closed."
    NO_SUCH_ROOM = "Sorry! There is no room {room}."
    # Memory
    SEARCH_NONE = 'No messages with "{text}" in {room}.'
    SEARCH_FOUND = 'Found {count} messages with "{text}" in {room}:'
    SEARCH_FOUND_MANY = 'Found {count} messages with "{text}" in {room}; the last {shown}:'
    # Refusals and the end
    FULL = "Sorry! The chat is full."
    JOIN_TIMEOUT = "Sorry! You took too long to choose a nickname."
    PASSWORD_TIMEOUT = "Sorry! You took too long to give the password."
    TLS_HINT = "This server speaks TLS: use chat_client --tls, or openssl s_client."  # plain
    SHUTTING_DOWN = "Server is shutting down."
    # A cluster's node and Redis
    PAUSED = "The chat is paused: this server can't reach the others."
    PAUSED_JOIN = "Sorry! The chat is paused. Try again in a moment."
    BACK = "The chat is back."
    # Log records: the line the members received, and where it came from or why it ended
    LOG_FROM = " [from {address}]"
    LOG_REASON = " [{reason}]"
    LOG_IN_ROOM = " [in {room}]"      # after a room line of a room other than #main
    LOG_PRIVATE = "[private] {nick} sent a message to {target}"
    LOG_CLOSED = "Connection from {address} closed"  # one that never joined: why, in LOG_REASON
    LOG_KICKED = "{op} kicked {nick}"
    LOG_BANNED = "{op} banned {nick}"
    LOG_UNTIL = " until {until}"
    LOG_FOR = ": {reason}"
    LOG_UNBANNED = "{op} unbanned {what}"
    LOG_MUTED = "{op} muted {nick}"
    LOG_UNMUTED = "{op} unmuted {nick}"
    LOG_MADE_OPERATOR = "{op} made {nick} an operator"
    LOG_TOOK_OPERATOR = "{op} took operator from {nick}"
    LOG_DROPPED = "{op} closed {room}"
    LOG_REFUSED = "Connection from {address} refused"   # why, in LOG_REASON
    LOG_REGISTERED = "{nick} registered their nickname"
    LOG_UNREGISTERED = "{nick} unregistered their nickname"
    LOG_NEW_PASSWORD = "{nick} changed the password of their nickname"
    LOG_TOKEN = "{nick} made a login token"
    LOG_CANNOT_WRITE = "Cannot write {path}: {error}; messages are not kept until it can"
    LOG_WRITING_AGAIN = "Writing {path} again"
    # Standard error, at a start after a crash (the data file's journal, TurnJournal)
    JOURNAL_TORN = ("{path}: {count} bytes at its end were not a whole turn (a write cut short),"
                    " left out")
    JOURNAL_NOT_THE_FILES = ("{path}: not the data file's (it was written after the data file's"
                             " last commit, as when a backup was put back), left out and kept"
                             " as {aside}")
    LOG_STARTED = "Server started on {address}"
    LOG_STOPPED = "Server stopped"
    # Standard output and error
    LISTENING = "Listening on {address}"
    FINGERPRINT = "TLS certificate SHA-256 fingerprint: {fingerprint}"
    READY = "Server is ready for work!"  # seed
    STOPPED = "Server stopped."
    OPEN_TO_ALL = ("warning: listening on {address} with neither a password nor TLS: anyone who"
                   " can reach this address can join and read the chat (see --password-file and"
                   " --tls-cert)")
    PASSWORD_IN_CLEAR = ("warning: listening on {address} with a password but no TLS: the"
                         " password and the chat cross the network in clear (see --tls-cert)")


class Reason:
    """Why a connection ended, as its log record says."""
    QUIT = "quit"
    CLOSED = "closed"
    RESET = "reset"
    SEND_QUEUE_FULL = "send queue full"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    TIMEOUT = "timeout"   # the peer vanished without a word: keepalive or unacknowledged data
    LOCKED_OUT = "too many wrong passwords"   # a member's wrong account passwords
    KICKED = "kicked"
    BANNED = "banned"
    REPLACED = "replaced"   # its registered nickname was taken over by its owner, elsewhere
    NOT_TLS = "TLS handshake failed"   # (never a member: a plain-text client on the TLS port)


# What the OS says of a peer that vanished (keepalive unanswered, data never acknowledged, no
# route any more), as opposed to one that closed or reset the connection.
VANISHED = frozenset(filter(None, (
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, getattr(errno, "EHOSTDOWN", None),
    getattr(errno, "WSAETIMEDOUT", None), getattr(errno, "WSAEHOSTUNREACH", None),
    getattr(errno, "WSAENETUNREACH", None))))


def reason_for(error):
    """The log's reason for a connection the OS ended with ``error``."""
    return Reason.TIMEOUT if error.errno in VANISHED else Reason.RESET




class Phase:
    """Where a connection is in its life: one at a time, changed only by Server._move, along
    PHASE_MOVES."""
    NEW = "new"               # accepted; nothing said to it yet
    HANDSHAKE = "handshake"   # TLS handshake under way
    PASSWORD = "password"     # the password is asked for
    NICKNAME = "nickname"     # the nickname is asked for
    NICK_PASSWORD = "nickname password"   # a registered nickname's password is asked for
    MEMBER = "member"         # joined: lines are messages and commands
    RENAME_PASSWORD = "rename password"   # a member's /nick to a registered nickname: its
                                          # password is asked for (still a member meanwhile)
    CLOSING = "closing"       # no more input handled; the last lines are being written
    LINGERING = "lingering"   # written and FIN sent; draining input until EOF, then close
    CLOSED = "closed"


# The moves a phase may make (h11's _state.py). Any other is a bug, and closes its connection.
PHASE_MOVES = {
    Phase.NEW: (Phase.HANDSHAKE, Phase.PASSWORD, Phase.NICKNAME, Phase.CLOSING, Phase.CLOSED),
    Phase.HANDSHAKE: (Phase.PASSWORD, Phase.NICKNAME, Phase.CLOSING, Phase.CLOSED),
    Phase.PASSWORD: (Phase.NICKNAME, Phase.CLOSING, Phase.CLOSED),
    Phase.NICKNAME: (Phase.NICK_PASSWORD, Phase.MEMBER, Phase.CLOSING, Phase.CLOSED),
    Phase.NICK_PASSWORD: (Phase.NICKNAME, Phase.MEMBER, Phase.CLOSING, Phase.CLOSED),
    Phase.MEMBER: (Phase.RENAME_PASSWORD, Phase.CLOSING, Phase.CLOSED),
    Phase.RENAME_PASSWORD: (Phase.MEMBER, Phase.CLOSING, Phase.CLOSED),
    Phase.CLOSING: (Phase.LINGERING, Phase.CLOSED),
    Phase.LINGERING: (Phase.CLOSED,),
    Phase.CLOSED: (),
}

# Phases in which a line from the connection is handled (by the room), the commonest first.
TALKING = (Phase.MEMBER, Phase.NICKNAME, Phase.PASSWORD, Phase.NICK_PASSWORD,
           Phase.RENAME_PASSWORD)
# The same names as module globals, for the loop's hot paths (one lookup instead of two).
MEMBER, CLOSING, LINGERING, CLOSED = Phase.MEMBER, Phase.CLOSING, Phase.LINGERING, Phase.CLOSED
HANDSHAKE = Phase.HANDSHAKE
EVENT_READ, EVENT_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


# =============================================================================================
# Text: control characters, nicknames, the clock.
# =============================================================================================

# C0 controls except TAB, DEL and C1 controls: removed so that no client can put terminal escape
# sequences on another's screen. A regex, because its C loop costs almost nothing on clean text.
CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

# without_controls(text): the text with those characters removed (a C-level partial: hot path).
without_controls = functools.partial(CONTROL_CHARS.sub, "")
# The same for a line that is all ASCII, on its bytes (C1 can't occur there): bytes.translate
# deletes them without decoding, which most chat lines then never need.
CONTROL_BYTES = bytes(range(0x00, 0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"

# "/name rest": a command's name runs to the first whitespace; its text is the rest of the line.
COMMAND = re.compile(r"/(\S*)\s*(.*)", re.DOTALL)
TARGET_AND_TEXT = re.compile(r"(\S*)\s*(.*)", re.DOTALL)


def script_of(char):
    """The script of a letter of a nickname; None for a digit, which goes with any script."""
    if char.isnumeric():
        return None
    word = unicodedata.name(char, "").split(" ", 1)[0]
    return SCRIPT_ALIASES.get(word, word)  # (None for a modifier letter: any alphabet)


def mixes_scripts(nick):
    if nick.isascii():
        return False  # Latin letters and digits: one alphabet
    scripts = {script_of(char) for char in nick}
    scripts.discard(None)
    return len(scripts) > 1 and not any(scripts <= family for family in SCRIPT_FAMILIES)


# Shared with chat_client.py, which must have its own copy (each .pyz holds one module):
# keep the two identical; RepositoryTests fails when they drift.
def normalise_nickname(text):
    """A nickname attempt as the protocol reads it: stripped, then NFKC (fullwidth letters become
    ASCII, a decomposed accent composes)."""
    return unicodedata.normalize("NFKC", text.strip())


@functools.lru_cache(maxsize=4096)  # a join asks for them three times (busy, join, leave)
def nickname_keys(nick):
    """What the busy check compares: the nickname's skeletons, case-free strings in which letters
    (and digits) that look Latin are Latin. One from its small letters, one from its capitals,
    since a name is the same name in any case (its owner may /nick to another case), and one
    from the name as written: "асе" -> "ace", "ВОВ" (and so "вов") -> "bob", "b0b" -> "bob",
    "aIice" -> "alice". Two nicknames that share a skeleton look alike; no two members ever
    share one."""
    small = nick.casefold().translate(_SMALL)
    if small == nick:
        small = nick  # the same string: a member's key then costs no memory of its own
    capital = nick.upper().translate(_CAPITALS).casefold().translate(_SMALL)
    written = nick.translate(_AS_WRITTEN).casefold().translate(_SMALL)
    keys = (small,)
    for key in (capital, written):
        if key not in keys:
            keys += (key,)
    return keys


def found_by_keys(table, keys):
    """What ``table`` holds under the first of ``keys`` it has (a name's look-alike keys: the
    member, room or account known by any of them), or None."""
    for key in keys:
        found = table.get(key)
        if found is not None:
            return found
    return None


def nickname_problem(nick, max_chars=MAX_NICK_CHARS):
    """The line that refuses a (normalised) nickname for what it is, or None if it may be used;
    whether it is taken is the room's question."""
    shown = without_controls(nick)
    if not nick.isalnum() or INVISIBLE.search(nick):
        return Lines.NICK_INVALID.format(nick=shown)
    if len(nick) > max_chars:
        return Lines.NICK_TOO_LONG.format(max=max_chars, nick=shown[:max_chars])
    if mixes_scripts(nick):
        return Lines.NICK_MIXED.format(nick=shown)
    return None


# What a room name may hold after its "#", besides letters and digits.
ROOM_PUNCTUATION = str.maketrans("", "", "-_")


def room_name_problem(name):
    """The line that refuses a (normalised) room name, or None if it is one: "#", then 1 to
    MAX_ROOM_CHARS letters, digits, "-" or "_", the letters of one script (the nickname rule)."""
    letters = name[1:].translate(ROOM_PUNCTUATION)
    if name[:1] != "#" or not 1 <= len(name) - 1 <= MAX_ROOM_CHARS \
            or (letters and not letters.isalnum()) or INVISIBLE.search(name) \
            or mixes_scripts(letters):
        return Lines.ROOM_INVALID.format(max=MAX_ROOM_CHARS, name=without_controls(name))
    return None


def room_keys(name):
    """What room names are compared by: their look-alike skeletons, as for nicknames, so that
    "#OPS" and an all-Cyrillic "#орѕ" name one room."""
    return nickname_keys(name)


def hash_room_key(key):
    """A room's key as kept: salted SHA-256. A room key guards a room, not an account, and is
    checked on every /join: a fast hash is enough (an account's password gets a slow one)."""
    import hashlib
    salt = os.urandom(ROOM_KEY_SALT_BYTES)
    return salt.hex() + "$" + hashlib.sha256(salt + key.encode("utf-8")).hexdigest()


def room_key_matches(kept, key):
    import hashlib
    import hmac
    salt, _, digest = kept.partition("$")
    given = hashlib.sha256(bytes.fromhex(salt) + key.encode("utf-8")).hexdigest()
    return hmac.compare_digest(given, digest)


def password_text(line):
    """An account password as a line gives it: the whole line, control characters removed and
    its ends stripped (so it may hold spaces)."""
    return without_controls(line.decode("utf-8", "replace")).strip()


def hash_password(password, scrypt_n=SCRYPT_N):
    """An account's password as kept: a slow, salted key derivation, its parameters with it
    ("scrypt$N$r$p$salt$hash", or "pbkdf2_sha256$iterations$salt$hash" where OpenSSL has no
    scrypt). Takes about a tenth of a second of one core: never called on the loop's thread."""
    import hashlib
    salt = os.urandom(16)
    secret = password.encode("utf-8")
    if hasattr(hashlib, "scrypt"):
        digest = hashlib.scrypt(secret, salt=salt, n=scrypt_n, r=SCRYPT_R, p=SCRYPT_P,
                                maxmem=256 * scrypt_n * SCRYPT_R, dklen=32)
        return "scrypt$%d$%d$%d$%s$%s" % (scrypt_n, SCRYPT_R, SCRYPT_P, salt.hex(), digest.hex())
    digest = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS)
    return "pbkdf2_sha256$%d$%s$%s" % (PBKDF2_ITERATIONS, salt.hex(), digest.hex())


def password_matches(kept, password):
    """Does ``password`` give the hash ``kept`` (made by hash_password, with whatever parameters
    it names)? Compared in constant time. Slow, like hash_password."""
    import hashlib
    import hmac
    kind, *fields = kept.split("$")
    secret = password.encode("utf-8")
    if kind == "scrypt":
        n, r, p, salt, digest = fields
        given = hashlib.scrypt(secret, salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                               maxmem=256 * int(n) * int(r), dklen=len(digest) // 2)
    else:
        iterations, salt, digest = fields
        given = hashlib.pbkdf2_hmac("sha256", secret, bytes.fromhex(salt), int(iterations))
    return hmac.compare_digest(given, bytes.fromhex(digest))


def new_login_token():
    """A login token and its digest, the only form in which it is kept. 256 random bits can't
    be guessed, so a fast hash is enough (a password needs a slow one: people choose those)."""
    import base64
    token = base64.urlsafe_b64encode(os.urandom(TOKEN_BYTES)).decode("ascii").rstrip("=")
    return token, token_digest(token)


def token_digest(token):
    import hashlib
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def is_login_token(digests, answer):
    """Is ``answer`` (a password question's answer) one of the login tokens kept as ``digests``?
    Each digest compared in constant time, all of them whatever matches."""
    import hmac
    if not digests or not TOKEN_FORM.match(answer):
        return False
    given = token_digest(answer)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(digest, given)
    return found


class InlineHashing:
    """Password work done at once, in the caller's thread: for the room core driven alone (the
    tests), where nothing else waits."""

    def __init__(self, scrypt_n=SCRYPT_N):
        self.scrypt_n = scrypt_n

    def make(self, password, done):
        done(hash_password(password, self.scrypt_n))

    def check(self, kept, password, done):
        done(password_matches(kept, password))


def hash_workers():
    """How many threads hash passwords: one less than the cores this process may use (the
    loop keeps one), at least one and at most HASH_WORKERS_MOST (each holds 32 MiB while it
    hashes). A crowd logging in at once (everyone back after a restart) gets in that many times
    sooner, without taking the loop's core."""
    return max(1, min(usable_cores() - 1, HASH_WORKERS_MOST))


def usable_cores():
    """The cores this process may run on (its CPU affinity), fewer under a cgroup v2 CPU quota
    (a container's ``--cpus``: the quota spent by more threads would stop the loop too)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as limits:
            quota, period = limits.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass   # (no cgroup v2, or no quota: the affinity)
    return cores


class ThreadHashing(InlineHashing):
    """Password work off the loop (asyncio's run_in_executor): worker threads compute the
    hashes (hashlib lets go of the GIL meanwhile), the loop is woken through its wakeup socket
    and calls each ``done`` in its own thread. At most HASHES_QUEUED jobs a worker are with the
    workers; the rest wait here in order, so a crowd trying passwords waits for itself, not the
    chat. (A connection has one job at most: its later lines wait for the answer.)"""

    def __init__(self, wake, scrypt_n=SCRYPT_N, workers=None):
        InlineHashing.__init__(self, scrypt_n)
        self.wake = wake            # called from a worker when a result is ready
        self.workers = workers or hash_workers()
        self._waiting = collections.deque()   # (work, done) not yet with the worker
        self._results = collections.deque()   # (done, result) for the loop
        self._handed = 0            # jobs with the worker
        self._jobs = None           # the worker's queue, once there is a worker

    def make(self, password, done):
        self._submit(lambda: hash_password(password, self.scrypt_n), done)

    def check(self, kept, password, done):
        self._submit(lambda: password_matches(kept, password), done)

    def _submit(self, work, done):
        self._waiting.append((work, done))
        self._hand_over()

    def _hand_over(self):
        if self._jobs is None and not self._start_workers():
            # No thread could be started (a process limit): hashed in the loop, which stalls
            # the chat a tenth of a second a password, but no login waits for ever.
            while self._waiting:
                work, done = self._waiting.popleft()
                done(self._run(work))
            return
        while self._waiting and self._handed < HASHES_QUEUED * self.workers:
            self._handed += 1
            self._jobs.put(self._waiting.popleft())

    def _start_workers(self):
        """The worker threads, started; False if not one could be (they are tried again at
        the next password)."""
        import queue
        import threading
        jobs = queue.Queue()
        started = 0
        for _ in range(self.workers):
            try:
                threading.Thread(target=self._work, args=(jobs,), name="password hashing",
                                 daemon=True).start()
            except RuntimeError:   # ("can't start new thread")
                break
            started += 1
        if started:
            self._jobs = jobs
            self.workers = started
        return bool(started)

    @staticmethod
    def _run(work):
        try:
            return work()
        except Exception:   # (a kept hash the code can't read: no match)
            return False

    def _work(self, jobs):
        while True:
            work, done = jobs.get()
            self._results.append((done, self._run(work)))   # (deque appends are atomic)
            self.wake()

    def finish(self):
        """In the loop's thread, when woken: call ``done`` for each result come back."""
        while self._results:
            done, result = self._results.popleft()
            self._handed -= 1
            self._hand_over()
            done(result)


class Clock:
    """The ``{ts}: `` prefix, local time to the minute, recomputed only when the minute changes."""

    def __init__(self, now=time.time):
        self._now = now
        self._minute_ends = float("-inf")   # when the cached prefix stops being right
        self._prefix = ""
        self._prefix_bytes = b""

    def _refresh(self, now):
        minute = int(now // 60)
        self._minute_ends = (minute + 1) * 60
        self._prefix = time.strftime("%Y-%m-%d %H:%M: ", time.localtime(minute * 60))
        self._prefix_bytes = self._prefix.encode()

    def prefix(self):
        self.prefix_bytes()
        return self._prefix

    def prefix_bytes(self):
        now = self._now()
        if now >= self._minute_ends or now < self._minute_ends - 60:  # (or the clock went back)
            self._refresh(now)
        return self._prefix_bytes

    def pin(self, when):
        """Until unpin(): the time is ``when`` (a cluster's entry: its time, on every node)."""
        self._running = self._now
        self._now = lambda: when

    def unpin(self):
        self._now = self._running


# =============================================================================================
# The room core: who is where, what goes to whom, what is kept. No sockets.
# =============================================================================================

class Peer:
    """A connection as the room sees it: who it is, where it is, and the bytes queued for it.

    The room appends to ``out``; whoever owns the socket reads ``out`` (truthy while anything is
    queued) and reports what the kernel took through ``output()`` and ``sent()``. ``owner`` is that
    owner's handle for the connection; the room never looks at it."""
    __slots__ = ("address", "owner", "local", "ident", "nick", "away", "member", "room",
                 "account", "asked", "gone", "sent_head", "out", "append", "pending", "_bytes",
                 "_counted", "_fanned_then", "_direct", "cursor")

    def __init__(self, address="", owner=None, local=True):
        self.address = address  # "host:port" ("[::1]:port"), for the log and the lockout
        self.owner = owner
        self.local = local      # connected to this process (not through another of a cluster)
        self.ident = None       # a cluster's name for it: "node/connection"
        self.nick = None        # set once a nickname is accepted
        self.away = None        # None, or the /away text ("" without one)
        self.member = False     # joined and not yet left
        self.room = None        # the Room it is in, while a member
        self.account = None     # its account's key, while it is a registered nickname's owner
        self.asked = None       # (nickname, Account) whose password its next line answers
        self.gone = False       # its connection ended (or is ending): nothing more is for it
        self.sent_head = b""    # "{nick} sent " encoded once, for every message this peer sends
        self.out = []           # bytes objects not yet handed to the kernel (never replaced:
        self.append = self.out.append   # a broadcast calls this bound method, nothing else)
        self.pending = False    # listed in Chat.pending
        self._bytes = 0         # the size of out[:_counted]; the rest is counted when needed
        self._counted = 0
        # What out[_counted:] can hold at most (see above()): Chat.fanned when everything was
        # last counted there, and the bytes queued since for this peer alone (queue()).
        self._fanned_then = 0
        self._direct = 0
        self.cursor = 0         # how far into its room's lines it has been given (Room.give)

    @property
    def host(self):
        """What the password lockout counts by: the address without its port."""
        return self.address.rpartition(":")[0]

    def queued_bytes(self):
        """Bytes waiting in ``out``. Appends are counted here, lazily, so that a broadcast costs
        one call per recipient."""
        out = self.out
        if len(out) > self._counted:
            self._bytes += sum(map(len, out[self._counted:]))
            self._counted = len(out)
        return self._bytes

    def above(self, limit, fanned):
        """Whether more than ``limit`` bytes wait in ``out``, added up only when they may: what
        was queued since they were last added up here is at most what the chat has fanned out
        to its rooms since (``fanned``: Chat.fanned, every room's lines together) and what was
        queued for this peer alone (queue()). So a member of a busy room, checked at each line
        it sends, costs a comparison, not a sum over the turn's lines so far (that sum was 6%
        of the server's samples at 100 clients, 12% at 1,000)."""
        if self._bytes + (fanned - self._fanned_then) + self._direct <= limit:
            return False
        # (Lines its room said this turn and has not given it yet were fanned out before now
        # but come into ``out`` later: counted as fanned out after this sum.)
        room = self.room
        ungiven = 0
        if room is not None and self.cursor != room.said and self in room.members:
            ungiven = sum(map(len, room.turn[self.cursor - room.turn_start:]))
        self._fanned_then, self._direct = fanned - ungiven, 0
        return self.queued_bytes() + ungiven > limit

    def take_room_lines(self):
        """Into ``out``, the lines its room said this turn that it has not been given yet (see
        Room.give): before anything queued for it alone, and before a write."""
        room = self.room
        if room is not None and self.cursor != room.said:
            room.give(self)

    def has_output(self):
        """Whether anything waits to be written to it, its room's lines of this turn included
        (a cluster's node may apply them for a member whose leave is still on its way)."""
        self.take_room_lines()
        return bool(self.out)

    def queue(self, data):
        """Queue ``data`` for this peer alone, after the lines its room has said so far."""
        self.take_room_lines()
        self.out.append(data)
        self._direct += len(data)

    def queue_all(self, lines):
        self.take_room_lines()
        self.out.extend(lines)
        self._direct += sum(map(len, lines))

    def output(self):
        """Everything queued, as one bytes-like object; the queue keeps it until ``sent()``."""
        out = self.out
        return out[0] if len(out) == 1 else b"".join(out)

    def hold(self, data):
        """A write of ``data`` (from ``output()``, just now) must be retried with these very
        bytes (TLS): keep them as one object at the head of the queue."""
        self.out[:] = [data]
        self._bytes = len(data)
        self._counted = 1

    def sent(self, data, count):
        """The kernel took ``count`` bytes of ``data``: what ``output()`` returned just now, or
        what ``hold()`` kept. Lines queued after that stay queued."""
        out = self.out
        items = 1 if out[0] is data else len(out)   # held, or all of the queue then
        if count >= len(data) and items == len(out):
            out.clear()                            # the common case: everything went
            self._bytes = self._counted = 0
            return
        counted = self._counted
        if count >= len(data):
            del out[:items]
        else:
            out[:items] = [memoryview(data)[count:]]
            items -= 1                             # the rest of data is still here
        if counted > items:
            self._bytes -= count
            self._counted = counted - items
        elif count < len(data):                    # the rest of data, counted: it may hold
            self._bytes = len(data) - count        # lines queued before above()'s last sum
            self._counted = 1
        else:
            self._bytes = self._counted = 0        # what is left is counted when needed


class Room:
    """A room: its members in the order they came in, the lines a newcomer is shown, its topic
    and key. One other than #main lasts while it has a member, a topic or a kept message."""
    __slots__ = ("name", "key", "members", "everyone", "history", "pending", "topic",
                 "key_hash", "kept", "position", "turn", "turn_start", "said")

    def __init__(self, name, history, topic=None, key_hash=None, shared=True):
        self.name = name        # as first spelled
        self.key = room_keys(name)[0]   # what the store knows it by
        # The members connected here, in order of arrival (the values are not used).
        self.members = {}
        # Every member, in order of arrival (/users, /rooms). In one process the same dict as
        # ``members``; a cluster's node keeps the members of the other nodes here too.
        self.everyone = self.members if shared else {}
        self.history = collections.deque(maxlen=history)  # room lines as the members got them
        self.pending = False    # every member has new output since the last take_pending()
        self.topic = topic
        self.key_hash = key_hash   # the /join key, salted and hashed (never kept in clear)
        self.kept = False       # it has messages in the store
        self.position = 0       # the store's position of its last kept message
        # The room's lines of this loop turn, in order, not yet in its members' queues: a line
        # is appended here once, not to each member's queue (the fan-out was a call per member
        # and line); at the turn's end each member gets them joined, the same bytes object for
        # all who got none of them yet (end_turn). ``said`` counts the room's lines since it
        # was made, ``turn_start`` those before this turn; a member's ``cursor`` is the count
        # of them it has been given (or skipped: its own, for which it gets the echo).
        self.turn = []
        self.turn_start = 0
        self.said = 0

    def give(self, peer):
        """Queue for ``peer`` the lines of this turn it has not been given yet, if it is a
        member here: before anything queued for it alone, which must come after them."""
        start = peer.cursor - self.turn_start
        turn = self.turn
        if start < len(turn) and peer in self.members:
            peer.out.extend(turn[start:] if start else turn)   # (in C; joined when written)
        peer.cursor = self.said

    def end_turn(self):
        """The turn's lines into every member's queue: those given none of them yet get them
        joined once, the same bytes object for all (often all they have to write: sent as it
        is); the others what they lack, as a list's slice (in C)."""
        turn, start, said = self.turn, self.turn_start, self.said
        if turn:
            whole = None
            for peer in self.members:
                cursor = peer.cursor
                if cursor == start:
                    if whole is None:
                        whole = turn[0] if len(turn) == 1 else b"".join(turn)
                    peer.out.append(whole)
                elif cursor != said:
                    peer.out.extend(turn[cursor - start:])
                peer.cursor = said
            self.turn = []
        self.turn_start = said

    def record(self):
        return RoomRecord(self.key, self.name, self.topic, self.key_hash)


# ---------------------------------------------------------------------------------------------
# The log. Every change of the chat's state -- a message, a /me, a join, a leave, a rename, a room
# change, a topic, a registration, a ban -- is an entry: a tuple (kind, room, peer, data),
# ``peer`` being the member it is about. Only the room core (Chat) appends entries, and only once
# it has decided that the change is allowed; a sequencer gives each entry its place in the order
# and hands it back to Chat.apply, which makes the change and turns it into what each member
# receives, the history, the kept messages and the log records. So what a member sees is the log
# applied in log order, and two processes that apply the same log are in the same state.
# ---------------------------------------------------------------------------------------------

class Entry:
    """The kinds of the log's entries, and what their ``data`` holds. ``peer`` is the member an
    entry is about (for an operator's deed, the operator); ``room`` the room it happens in."""
    SAY = "say"         # a message: its UTF-8 bytes, control characters removed
    ACT = "act"         # a /me: its text
    JOIN = "join"       # the peer joined the chat, into #main: (nickname, account key or None)
    LEAVE = "leave"     # the peer leaves the chat: (Reason, its room's line instead of
                        # "disconnected!" or None, its own last line or None)
    RENAME = "rename"   # the peer's new nickname: (nickname, account key or None)
    MOVE = "move"       # the peer goes to another room: (its name, the key hash to make it
                        # with, if it is new)
    TOPIC = "topic"     # the peer sets its room's topic: the text (None: cleared)
    AWAY = "away"       # the peer is away (the text, "" without one) or back (None)
    PRIVATE = "private"   # a private message: (the member it is for, the text)
    WAIT = "wait"       # a private message waiting for a registered nickname: (account key,
                        # the nickname, the text)
    ACCOUNT = "account"   # the peer's account: ("register" | "password" | "unregister" |
                          # "token" | "untoken", key, nickname, password hash or token digest
                          # or None)
    BAN = "ban"         # an operator's ban: a Ban
    UNBAN = "unban"     # (kind, value)
    MUTE = "mute"       # an operator's mute of a member: (the member, a Mute)
    UNMUTE = "unmute"   # the nickname key
    OPERATOR = "operator"   # an operator makes (True) or unmakes (False) one: (True | False,
                            # account key, nickname)
    DROP = "drop"       # an operator (the peer) closes the room: None


SAY = Entry.SAY   # (the hot path's kind, one lookup)


class LocalSequencer:
    """The sequencer of one process: an entry's place is the order in which it is appended, and
    it is applied at once, so a line costs no more than if the room delivered it itself.

    ``append_say`` takes a message, the entry of every line said: in one process it goes
    straight to its applier, without ``apply``'s look-up by kind (that call is a twentieth of
    the room core's time per message). Appended through either, an entry keeps its place, since
    each is applied as it comes."""

    def __init__(self, apply, apply_say):
        self.append = apply
        self.append_say = apply_say


# ---------------------------------------------------------------------------------------------
# Commands, as records (ssh-chat's Command{Prefix, Help, Op, Handler}): /help, the usage of each,
# and the dispatch all come from this one table; the client has a table of its own, and a test
# holds the two against each other.
# ---------------------------------------------------------------------------------------------

Command = collections.namedtuple("Command", "name aliases usage handler needs_words operators",
                                 defaults=(False, False))
Command.__doc__ = """A command: its name, other names for it, its usage as /help shows it, the
Chat method that handles it (called with the peer and the rest of the line), whether it needs
words after its name (alone, it gets "Sorry! Usage: ..." with its usage), and whether only
operators may use it (and see it in /help)."""

COMMANDS = (   # in the order /help lists them
    Command("users", ("who", "names"), "/users", "cmd_users"),
    Command("msg", (), "/msg NICK TEXT", "cmd_msg", needs_words=True),
    Command("me", (), "/me TEXT", "cmd_me"),
    Command("nick", (), "/nick NEWNICK", "cmd_nick", needs_words=True),
    Command("away", (), "/away [TEXT]", "cmd_away"),
    Command("back", (), "/back", "cmd_back"),
    Command("join", (), "/join #room [KEY]", "cmd_join", needs_words=True),
    Command("part", ("leave",), "/part", "cmd_part"),
    Command("rooms", (), "/rooms", "cmd_rooms"),
    Command("topic", (), "/topic [TEXT]", "cmd_topic"),
    Command("search", (), "/search TEXT", "cmd_search", needs_words=True),
    Command("register", (), "/register PASSWORD", "cmd_register", needs_words=True),
    Command("password", (), "/password OLD NEW", "cmd_password", needs_words=True),
    Command("unregister", (), "/unregister PASSWORD", "cmd_unregister", needs_words=True),
    Command("token", (), "/token", "cmd_token"),
    Command("kick", (), "/kick NICK [REASON]", "cmd_kick", True, True),
    Command("ban", (), "/ban NICK [DURATION] [REASON]", "cmd_ban", True, True),
    Command("unban", (), "/unban NICK|ADDRESS", "cmd_unban", True, True),
    Command("bans", (), "/bans", "cmd_bans", False, True),
    Command("mute", (), "/mute NICK [DURATION]", "cmd_mute", True, True),
    Command("unmute", (), "/unmute NICK", "cmd_unmute", True, True),
    Command("op", (), "/op NICK", "cmd_op", True, True),
    Command("deop", (), "/deop NICK", "cmd_deop", True, True),
    Command("drop", (), "/drop #room", "cmd_drop", True, True),
    Command("quit", (), "/quit", "cmd_quit"),
    Command("help", (), "/help", "cmd_help"),
)


# The hot lines, cut from their templates once: "{nick} sent " + message, and so on.
SENT_HEAD, SENT_TAIL = Lines.SENT.split("{message}")
ECHO_HEAD, ECHO_TAIL = Lines.ECHO.split("{message}")
SENT_END = (SENT_TAIL + "\n").encode()
ECHO_START = (Lines.OK + "\n").encode()
ECHO_MIDDLE = ECHO_HEAD.encode()
ECHO_END = (ECHO_TAIL + "\n").encode()


def help_line(commands=COMMANDS, operator=False):
    return Lines.HELP.format(commands=", ".join(command.usage for command in commands
                                                if operator or not command.operators))


class Delivering:
    """Output: lines queued for peers, the fan-out to a room, and who has new output."""

    def deliver(self, peer, data):
        peer.queue(data)
        self._list_pending(peer)

    def _list_pending(self, peer):
        if not peer.pending:
            peer.pending = True
            self.pending.append(peer)

    def to_room(self, room, data):
        """One encoded line, the same bytes object, to every member of ``room``: said in the
        room, and in every member's queue at the turn's end (Room.end_turn)."""
        room.turn.append(data)
        room.said += 1
        self.fanned += len(data)
        if not room.pending:
            room.pending = True
            self._pending_rooms.append(room)

    def to_others(self, peer, room, data):
        """To every member of ``room`` but ``peer``, its sender (if it is one of them)."""
        if peer.local and peer.room is room:
            room.give(peer)         # what the room said before its line
            self.to_room(room, data)
            peer.cursor += 1        # and not its own
        else:
            self.to_room(room, data)

    def take_pending(self):
        """The peers with output queued since the last call, each once."""
        listed, self.pending = self.pending, []
        for peer in listed:
            peer.pending = False
        if not self._pending_rooms:
            return listed
        rooms, self._pending_rooms = self._pending_rooms, []
        everyone = []
        for room in rooms:
            room.end_turn()
            everyone.extend(room.members)
        everyone.extend(peer for peer in listed if not (peer.member and peer.room.pending))
        for room in rooms:
            room.pending = False
        return everyone

    def line(self, text):
        """``{ts}: text`` and the line end, encoded."""
        return (self.clock.prefix() + text + "\n").encode()

    def notice(self, peer, text):
        self.deliver(peer, self.line(text))

    def _log_with(self, line, suffix):
        """Log a delivered line with a note for the operator before its line end."""
        self.log(line[:-1] + suffix.encode() + b"\n")

    def _log_room_line(self, room, line, reason=None):
        """A room line as its members received it; then why (a leave's ``reason``), and
        "[in #room]" outside #main."""
        suffix = "" if reason is None else Lines.LOG_REASON.format(reason=reason)
        if room is not self.main:
            suffix += Lines.LOG_IN_ROOM.format(room=room.name)
        if suffix:
            self._log_with(line, suffix)
        else:
            self.log(line)


class Arriving:
    """Before joining: the greeting, the server password and its lockout, nickname attempts."""

    def greet(self, peer):
        """A new connection, ready to talk: returns its first phase."""
        ban = self._ban_on("address", peer.host) if self.bans else None
        if ban is not None:
            self._refuse_banned(peer, ban)
            return Phase.CLOSING
        if self.password is None:
            self.deliver(peer, (Lines.WELCOME + "\n").encode())
            return Phase.NICKNAME
        if self._locked_out(peer.host):
            return self.refuse(peer, Lines.LOCKED_OUT)
        self.deliver(peer, (Lines.PASSWORD_PROMPT + "\n").encode())
        return Phase.PASSWORD

    def refuse(self, peer, text):
        """Tell a connection that never joined why it is being closed, and log it."""
        line = self.line(text)
        self.deliver(peer, line)
        self._log_with(line, Lines.LOG_FROM.format(address=peer.address))
        return Phase.CLOSING

    def password_line(self, peer, line):
        if self._locked_out(peer.host):  # (locked out meanwhile, by another connection's tries)
            return self.refuse(peer, Lines.LOCKED_OUT)
        if self._same_secret(line.translate(None, CONTROL_BYTES), self.password):
            self.deliver(peer, (Lines.WELCOME + "\n").encode())
            return Phase.NICKNAME
        self._count_wrong_password(peer.host)
        return self.refuse(peer, Lines.WRONG_PASSWORD)

    def _locked_out(self, host):
        entry = self._wrong_passwords.get(host)
        if entry is None:
            return False
        if self.now() >= entry[1]:
            del self._wrong_passwords[host]
            return False
        return len(entry[0]) >= PASSWORD_ATTEMPTS

    def _count_wrong_password(self, host):
        now = self.now()
        table = self._wrong_passwords
        if host not in table and len(table) >= MAX_LOCKOUT_ENTRIES:
            self._forget_expired_lockouts(now)
        times, _ = table.get(host) or ([], 0)
        times = [t for t in times if now - t < PASSWORD_WINDOW][-(PASSWORD_ATTEMPTS - 1):]
        times.append(now)
        table[host] = [times, now + PASSWORD_WINDOW]

    def _forget_expired_lockouts(self, now):
        for host in [h for h, (_, until) in self._wrong_passwords.items() if until <= now]:
            del self._wrong_passwords[host]
        while len(self._wrong_passwords) >= MAX_LOCKOUT_ENTRIES:  # still full: oldest first
            del self._wrong_passwords[next(iter(self._wrong_passwords))]

    def nickname_line(self, peer, line):
        """A nickname attempt. Accepted, the join is applied (which moves the connection on)."""
        if self.paused:
            self.notice(peer, Lines.PAUSED_JOIN)
            return None
        nick = normalise_nickname(line.decode("utf-8", "replace"))
        problem = self.nickname_refusal(nick, peer)
        if problem:
            self.notice(peer, problem)
            return None
        account = self.store.account_for(nickname_keys(nick))
        if account is not None:
            return self._ask_password(peer, nick, account, Phase.NICK_PASSWORD)
        self.append((Entry.JOIN, self.main, peer, (nick, None)))
        return None

    def nickname_refusal(self, nick, peer):
        """Why ``peer`` may not be called ``nick`` (normalised), or None. A registered nickname
        is refused to nobody (its password is asked for), but its look-alikes are busy."""
        problem = nickname_problem(nick, self.max_nick)
        if problem:
            return problem
        ban = self._nick_ban(nick) if self.bans else None
        if ban is not None:
            return (Lines.NICK_BANNED_UNTIL.format(nick=nick, until=self.when(ban.until))
                    if ban.until else Lines.NICK_BANNED.format(nick=nick))
        account = self.store.account_for(nickname_keys(nick), unreadable=UNREADABLE)
        if account is not None and account.key != peer.account:
            if nick.casefold() != account.nick.casefold():
                return Lines.NICK_BUSY.format(nick=nick)
            return None   # its owner's: the password decides, whoever holds it now
        holder = self.member_named(nick)
        if holder is not None and holder is not peer:
            return Lines.NICK_BUSY.format(nick=nick)
        return None

    def member_named(self, nick):
        """The member whose nickname looks like ``nick`` (normalised), or None."""
        return found_by_keys(self.members, nickname_keys(nick))


class Talking:
    """A member's lines: messages, and the commands of COMMANDS (all but accounts' and
    operators', below)."""

    def member_line(self, peer, line):
        """A message or a command from a member."""
        if not peer.member:
            return None  # it left (or was never here): nothing it says reaches anyone
        if line.isascii():  # most lines: the same rules, applied to the bytes
            body = line.translate(None, CONTROL_BYTES)
            if body[:1] != b"/":
                self.message(peer, body)
                return None
        text = without_controls(line.decode("utf-8", "replace"))
        if text[:1] == "/":
            if text[:2] != "//":
                return self.command(peer, text)
            text = text[1:]
        if text.isspace():  # Unicode spaces too (U+00A0, U+3000), which bytes don't know
            text = ""
        self.message(peer, text.encode())
        return None

    def message(self, peer, body):
        """A message (its UTF-8 bytes, control characters already removed) from a member."""
        if self.mutes and self._muted(peer):
            return
        if not body or body.isspace():  # (only spaces and TABs can be left: the same test)
            self.notice(peer, Lines.NOTHING)
        elif len(peer.room.everyone) < 2:
            self.notice(peer, Lines.ALONE)
        else:
            self.append_say((SAY, peer.room, peer, body))

    def line_too_long(self, peer, limit):
        self.notice(peer, Lines.TOO_LONG.format(limit=limit))

    def command(self, peer, text):
        name, rest = COMMAND.match(text).groups()
        known = self.commands.get(name.lower())
        if known is None:
            self.notice(peer, Lines.UNKNOWN_COMMAND.format(name=name))
            return None
        handler, command = known
        if command.operators and not self.is_operator(peer):
            self.notice(peer, Lines.OPERATORS_ONLY)
            return None
        if command.needs_words and not rest.strip():
            self.notice(peer, Lines.USAGE.format(usage=command.usage))
            return None
        return handler(peer, rest)

    def cmd_help(self, peer, rest):
        self.notice(peer, self.operator_help if self.is_operator(peer) else self.help)

    def cmd_users(self, peer, rest):
        names = []
        for member in peer.room.everyone:
            if member.away is None:
                names.append(member.nick)
            elif member.away:
                names.append(Lines.USER_AWAY_TEXT.format(nick=member.nick, text=member.away))
            else:
                names.append(Lines.USER_AWAY.format(nick=member.nick))
        self.notice(peer, Lines.USERS.format(count=len(names), nicks=", ".join(names)))

    def cmd_msg(self, peer, rest):
        if self.mutes and self._muted(peer):
            return
        wanted, text = TARGET_AND_TEXT.match(rest).groups()
        if not wanted or not text or text.isspace():
            self.notice(peer, Lines.NOTHING)
            return
        target = self.member_named(normalise_nickname(wanted))
        if target is peer:
            self.notice(peer, Lines.PRIVATE_TO_SELF)
        elif target is not None:
            self.append((Entry.PRIVATE, None, peer, (target, text)))
        else:
            account = self.store.account_for(nickname_keys(normalise_nickname(wanted)))
            if account is None:
                self.notice(peer, Lines.NO_SUCH_USER.format(nick=wanted))
            elif self.store.waiting_count(account.key) >= MAX_WAITING:
                self.notice(peer, Lines.TOO_MANY_WAITING.format(target=account.nick))
            else:
                self.append((Entry.WAIT, None, peer, (account.key, account.nick, text)))

    def cmd_me(self, peer, rest):
        if self.mutes and self._muted(peer):
            return
        if not rest or rest.isspace():
            self.notice(peer, Lines.NOTHING)
        elif len(peer.room.everyone) < 2:
            self.notice(peer, Lines.ALONE)
        else:
            self.append((Entry.ACT, peer.room, peer, rest))

    def cmd_nick(self, peer, rest):
        nick = normalise_nickname(rest)
        if nick == peer.nick:
            self.notice(peer, Lines.SAME_NICK.format(nick=nick))
            return None
        if self.mutes and self._muted(peer):   # (a mute holds the nickname: a new one would
            return None                        # end it)
        problem = self.nickname_refusal(nick, peer)
        if problem:
            self.notice(peer, problem)
            return None
        account = self.store.account_for(nickname_keys(nick))
        if account is not None and account.key != peer.account:
            return self._ask_password(peer, nick, account, Phase.RENAME_PASSWORD)
        self.append((Entry.RENAME, peer.room, peer,
                     (nick, peer.account if account is not None else None)))
        return None

    def cmd_away(self, peer, rest):
        self.append((Entry.AWAY, peer.room, peer, rest))

    def cmd_back(self, peer, rest):
        self.append((Entry.AWAY, peer.room, peer, None))

    def cmd_join(self, peer, rest):
        wanted, key = TARGET_AND_TEXT.match(rest).groups()
        name = normalise_nickname(wanted)
        problem = room_name_problem(name)
        if problem:
            self.notice(peer, problem)
            return
        key = key.strip()
        room = self.room_named(name)
        if room is peer.room:
            self.notice(peer, Lines.IN_ROOM_ALREADY.format(room=room.name))
        elif room is None and len(self.room_list) >= self.max_rooms:
            self.notice(peer, Lines.TOO_MANY_ROOMS.format(max=self.max_rooms))
        elif room is not None and room.key_hash and not room_key_matches(room.key_hash, key):
            self.notice(peer, Lines.NEEDS_KEY.format(room=room.name))
        else:
            new_key = hash_room_key(key) if key and room is None else None
            self.append((Entry.MOVE, peer.room, peer, (name, new_key)))

    def cmd_part(self, peer, rest):
        if peer.room is self.main:
            self.notice(peer, Lines.IN_ROOM_ALREADY.format(room=self.main.name))
        else:
            self.append((Entry.MOVE, peer.room, peer, (self.main.name, None)))

    def cmd_rooms(self, peer, rest):
        others = sorted(self.room_list[1:], key=lambda room: (-len(room.everyone), room.key))
        entries = [(Lines.ROOM_ENTRY_KEY if room.key_hash else Lines.ROOM_ENTRY)
                   .format(room=room.name, count=len(room.everyone))
                   for room in [self.main] + others]
        self.notice(peer, Lines.ROOMS.format(count=len(entries), rooms=", ".join(entries)))

    def cmd_topic(self, peer, rest):
        room = peer.room
        text = rest.strip()
        if not text:
            self.notice(peer, Lines.TOPIC.format(room=room.name, topic=room.topic) if room.topic
                        else Lines.NO_TOPIC.format(room=room.name))
        elif room is self.main and not self.is_operator(peer):
            self.notice(peer, Lines.OPERATORS_ONLY)
        elif not (self.mutes and self._muted(peer)):
            self.append((Entry.TOPIC, room, peer, None if text == "-" else text))

    def cmd_search(self, peer, rest):
        text, room = rest.strip(), peer.room

        def found(count, lines):
            if self.store.answers_later:
                self.on_hold(peer, False)
            if not count:
                self.notice(peer, Lines.SEARCH_NONE.format(text=text, room=room.name))
                return
            self.notice(peer, (Lines.SEARCH_FOUND if count == len(lines)
                               else Lines.SEARCH_FOUND_MANY)
                        .format(count=count, text=text, room=room.name, shown=len(lines)))
            peer.queue_all(lines)   # the lines as kept, each with its own {ts}
        if self.store.answers_later:
            self.on_hold(peer, True)   # (its next lines wait for the answer)
        self.store.search(room.key, text.casefold(), SEARCH_SHOWN, found)

    def cmd_quit(self, peer, rest):
        self.notice(peer, Lines.GOODBYE)
        self.leave(peer, Reason.QUIT)
        return Phase.CLOSING


class Registering:
    """Accounts: registered nicknames, their passwords (hashed off the loop), the password
    question, taking a nickname over, private messages that wait."""

    def _ask_password(self, peer, nick, account, phase):
        """A registered nickname: its password is asked for; the next line answers."""
        peer.asked = (nick, account)
        self.notice(peer, Lines.NICK_PASSWORD_PROMPT.format(nick=nick))
        return phase

    def nick_password_line(self, peer, line):
        """The answer to a registered nickname's password question, before joining."""
        return self._check_asked(peer, line, self._joined_with_password)

    def rename_password_line(self, peer, line):
        """The answer to the password question of a member's /nick to a registered nickname."""
        return self._check_asked(peer, line, self._renamed_with_password)

    def _check_asked(self, peer, line, right):
        if self._locked_out(peer.host):   # (by other tries meanwhile, from that address)
            return self._locked_out_now(peer)
        asked = peer.asked
        answer = password_text(line)
        # The account now, not as it was when asked: its password or tokens may have changed
        # meanwhile (the old password no longer lets anyone in), or it may be gone.
        account = self.store.account_for((asked[1].key,))
        if account is None:
            self._wrong_asked(peer, asked)
        elif is_login_token(account.tokens, answer):
            right(peer, asked)   # a login token: no slow check, nothing to wait for
        else:
            self._check_password(peer, account, answer,
                                 lambda: self._still_right(peer, asked, account, right),
                                 lambda: self._wrong_asked(peer, asked))
        return None

    def _still_right(self, peer, asked, checked, right):
        """The answer matched the password as it was when its check began; a /password that
        ended meanwhile (the check takes a tenth of a second, seconds behind a crowd) made it
        an old password, which lets nobody in."""
        now = self.store.account_for((checked.key,))
        if now is not None and now.password_hash == checked.password_hash:
            right(peer, asked)
        else:
            self._wrong_asked(peer, asked)

    def _check_password(self, peer, account, password, right, wrong):
        """The account's password checked off the loop, ``peer``'s input held meanwhile;
        ``right()`` or ``wrong()`` is called with it, unless the connection ended."""
        def checked(matches):
            if peer.gone:
                return   # its connection ended meanwhile: the answer is for nobody
            self.on_hold(peer, False)
            (right if matches else wrong)()
        self.on_hold(peer, True)
        self.hashing.check(account.password_hash, password, checked)

    def _joined_with_password(self, peer, asked):
        nick, account = asked
        peer.asked = None
        self._replace_holder(nick, peer)
        self.append((Entry.JOIN, self.main, peer, (nick, account.key)))

    def _renamed_with_password(self, peer, asked):
        nick, account = asked
        peer.asked = None
        self.on_phase(peer, Phase.MEMBER)
        if peer.member:
            self._replace_holder(nick, peer)
            self.append((Entry.RENAME, peer.room, peer, (nick, account.key)))

    def _replace_holder(self, nick, peer):
        """The nickname's owner is here with its password: a connection still holding it (a
        laptop that vanished, another terminal) is told and closed."""
        holder = self.member_named(nick)
        if holder is not None and holder is not peer:
            self.leave(holder, Reason.REPLACED, told_self=Lines.REPLACED)

    def _wrong_asked(self, peer, asked):
        nick = asked[0]
        peer.asked = None
        if not self._wrong_account_password(peer, nick):
            self.on_phase(peer, Phase.MEMBER if peer.member else Phase.NICKNAME)

    def _wrong_account_password(self, peer, nick):
        """A wrong account password counts toward the address's lockout; the one that locks
        it out ends the connection. True if it did."""
        self._count_wrong_password(peer.host)
        if self._locked_out(peer.host):
            self._locked_out_now(peer)
            return True
        self.notice(peer, Lines.WRONG_NICK_PASSWORD.format(nick=nick))
        return False

    def _locked_out_now(self, peer):
        if peer.member:
            self.leave(peer, Reason.LOCKED_OUT, told_self=Lines.LOCKED_OUT)
        else:
            self.refuse(peer, Lines.LOCKED_OUT)
            self.on_phase(peer, Phase.CLOSING)
        return Phase.CLOSING

    def cmd_register(self, peer, rest):
        password = rest.strip()
        if self.store.account_for(nickname_keys(peer.nick), unreadable=UNREADABLE) is not None:
            self.notice(peer, Lines.REGISTERED_ALREADY.format(nick=peer.nick))
        elif len(password) < MIN_PASSWORD_CHARS:
            self.notice(peer, Lines.PASSWORD_TOO_SHORT.format(min=MIN_PASSWORD_CHARS))
        else:
            self._hash_new_password(peer, password, "register")

    def _hash_new_password(self, peer, password, action):
        """The new password hashed off the loop, then the account change entered in the log."""
        def hashed(kept):
            if peer.member:
                self.on_hold(peer, False)
                key = peer.account if action == "password" else nickname_keys(peer.nick)[0]
                self.append((Entry.ACCOUNT, peer.room, peer, (action, key, peer.nick, kept)))
        self.on_hold(peer, True)
        self.hashing.make(password, hashed)

    def _own_account(self, peer):
        """The peer's account, or None after telling it its nickname is not registered."""
        account = self.store.account_for((peer.account,)) if peer.account else None
        if account is None:
            self.notice(peer, Lines.NOT_REGISTERED.format(nick=peer.nick))
        return account

    def cmd_password(self, peer, rest):
        old, new = TARGET_AND_TEXT.match(rest.strip()).groups()
        new = new.strip()
        account = self._own_account(peer)
        if account is None:
            return
        if not new:
            self.notice(peer, Lines.USAGE.format(usage="/password OLD NEW"))
        elif len(new) < MIN_PASSWORD_CHARS:
            self.notice(peer, Lines.PASSWORD_TOO_SHORT.format(min=MIN_PASSWORD_CHARS))
        else:
            self._end_tokens(peer, account)
            self._check_password(peer, account, old,
                                 lambda: self._hash_new_password(peer, new, "password"),
                                 lambda: self._wrong_account_password(peer, peer.nick))

    def cmd_unregister(self, peer, rest):
        account = self._own_account(peer)
        if account is not None:
            self._end_tokens(peer, account)
            self._check_password(
                peer, account, rest.strip(),
                lambda: self.append((Entry.ACCOUNT, peer.room, peer,
                                     ("unregister", account.key, peer.nick, None))),
                lambda: self._wrong_account_password(peer, peer.nick))

    def _end_tokens(self, peer, account):
        """/password and /unregister end the nickname's login tokens at once, before their
        own check and hashing: a stolen token takes the nickname over in microseconds, and
        would otherwise close the owner's connection while its /password was being checked,
        which drops the change (review: a bot rejoining with the token kept it alive)."""
        # (Whether or not this replica knows of any: in a cluster, another node's /token may
        # not have reached it yet.)
        self.append((Entry.ACCOUNT, peer.room, peer, ("untoken", account.key, peer.nick, None)))

    def cmd_token(self, peer, rest):
        """A new login token for the member's registered nickname, given once it is kept."""
        account = self._own_account(peer)
        if account is not None:
            token, digest = new_login_token()
            if len(self._tokens_made) >= TOKENS_PENDING_MOST:   # (entries a node never had
                del self._tokens_made[next(iter(self._tokens_made))]   # applied: the oldest)
            self._tokens_made[digest] = token   # (the log and the store see the digest only)
            self.append((Entry.ACCOUNT, peer.room, peer, ("token", account.key, peer.nick,
                                                           digest)))

    def _remember_position(self, peer, room):
        """A registered member leaves ``room``: what it has seen there, for its catch-up."""
        if peer.account is not None:
            self.store.save_seen(peer.account, room.key, room.position)


class Moderating:
    """Operators: who they are, and kicks, bans, mutes, /op and /drop; bans and mutes end at
    their time."""

    def is_operator(self, peer):
        key = peer.account
        return key is not None and (key in self.named_operators or key in self.operators)

    def when(self, until):
        """A ban's or a mute's end as the protocol writes it: {ts} without its ": "."""
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(until))

    def _ban_on(self, kind, value):
        """The ban in force on (kind, value), or None (one that ended is let go of)."""
        ban = self.bans.get((kind, value))
        if ban is not None and ban.until and ban.until <= self.wall_clock():
            self._lift_ban(ban)
            return None
        return ban

    def _nick_ban(self, nick):
        for key in nickname_keys(nick):
            ban = self._ban_on("nick", key)
            if ban is not None:
                return ban
        return None

    def _refuse_banned(self, peer, ban):
        line = self.line(Lines.ADDRESS_BANNED_UNTIL.format(until=self.when(ban.until))
                         if ban.until else Lines.ADDRESS_BANNED)
        self.deliver(peer, line)
        self._log_with(self.line(Lines.LOG_REFUSED.format(address=peer.address)),
                       Lines.LOG_REASON.format(reason=Reason.BANNED))

    def _muted(self, peer):
        """Tell a muted member so and return True; False if it may speak."""
        mute = self.mutes.get(nickname_keys(peer.nick)[0])
        if mute is None:
            return False
        if mute.until and mute.until <= self.wall_clock():
            self._end_mute(mute)
            return False
        self.notice(peer, Lines.MUTED_UNTIL.format(until=self.when(mute.until)) if mute.until
                    else Lines.MUTED)
        return True

    def _target(self, op, rest, connected=True):
        """The member (or, with ``connected`` False, maybe just the nickname) an operator
        command names, and the rest of its line; None after a refusal."""
        wanted, more = TARGET_AND_TEXT.match(rest.strip()).groups()
        nick = normalise_nickname(wanted)
        target = self.member_named(nick)
        if target is op:
            self.notice(op, Lines.NOT_TO_YOURSELF)
            return None
        if target is None and connected:
            self.notice(op, Lines.NO_SUCH_USER.format(nick=wanted))
            return None
        shown = target.nick if target is not None else nick
        if nickname_keys(nick)[0] in self.named_operators or \
                (target is not None and target.account in self.named_operators):
            self.notice(op, Lines.IS_OPERATOR.format(nick=shown))
            return None
        return target, shown, more.strip()

    def _duration(self, op, words):
        """(seconds or 0, the words left) for "[DURATION] ...": a first word that starts with a
        digit is a duration; None after refusing one that is not."""
        first, more = TARGET_AND_TEXT.match(words).groups()
        if not first[:1].isdigit():
            return 0, words
        match = DURATION.match(first)
        if not match or not any(match.groups()):
            self.notice(op, Lines.BAD_DURATION)
            return None
        days, hours, minutes = (int(n or 0) for n in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60
        if seconds <= 0 or seconds > MAX_DURATION_DAYS * 86400:
            self.notice(op, Lines.BAD_DURATION)
            return None
        return seconds, more.strip()

    def cmd_kick(self, op, rest):
        found = self._target(op, rest)
        if found is None:
            return
        target, nick, reason = found
        self.notice(op, Lines.OK)
        self._expel(target, op, reason, Reason.KICKED,
                    (Lines.KICKED_FOR, Lines.KICKED), (Lines.WAS_KICKED_FOR, Lines.WAS_KICKED))
        self.log(self.line(Lines.LOG_KICKED.format(op=op.nick, nick=nick)))

    def _expel(self, target, op, reason, why, told, room_told):
        """``target`` leaves: told why, its room told instead of "disconnected!", closed."""
        with_reason, without = told
        told_self = (with_reason.format(op=op.nick, reason=reason) if reason
                     else without.format(op=op.nick))
        with_reason, without = room_told
        told_room = (with_reason.format(nick=target.nick, op=op.nick, reason=reason)
                     if reason else without.format(nick=target.nick, op=op.nick))
        self.leave(target, why, told_room, told_self)

    def cmd_ban(self, op, rest):
        found = self._target(op, rest, connected=False)
        if found is None:
            return
        target, nick, more = found
        timed = self._duration(op, more)
        if timed is None:
            return
        seconds, reason = timed
        until = self.wall_clock() + seconds if seconds else None
        self.append((Entry.BAN, None, op,
                     Ban("nick", nickname_keys(nick)[0], nick, until, reason or None)))
        if target is not None and not self._operator_at(target.host, target):
            self.append((Entry.BAN, None, op,
                         Ban("address", target.host, target.host, until, reason or None)))
        self.notice(op, Lines.OK)
        if target is not None:
            self._expel(target, op, reason, Reason.BANNED, (Lines.BANNED_FOR, Lines.BANNED),
                        (Lines.WAS_BANNED_FOR, Lines.WAS_BANNED))
        record = Lines.LOG_BANNED.format(op=op.nick, nick=nick)
        if until:
            record += Lines.LOG_UNTIL.format(until=self.when(until))
        if reason:
            record += Lines.LOG_FOR.format(reason=reason)
        self.log(self.line(record))

    def _operator_at(self, host, target):
        """Is an operator other than ``target`` connected from ``host``? Its address is then
        not banned with the member banned (the nickname is): else the operators would lock
        themselves out, a chat on one machine (127.0.0.1) first of all."""
        return any(peer is not target and peer.host == host and self.is_operator(peer)
                   for peer in set(self.members.values()))

    def _end_at(self, until, action):
        """``action()`` at the wall-clock time ``until``: a timer, not polling."""
        self.on_timer(max(until - self.wall_clock(), 0), action)

    def _ban_ended(self, ban):
        if self.bans.get((ban.kind, ban.value)) is ban:
            self._lift_ban(ban)

    def _lift_ban(self, ban):
        del self.bans[ban.kind, ban.value]
        self.store.drop_ban(ban.kind, ban.value)

    def cmd_unban(self, op, rest):
        what = rest.strip()
        ban = self.bans.get(("address", what)) or self._nick_ban(normalise_nickname(what))
        if ban is None:
            self.notice(op, Lines.NOT_BANNED.format(what=what))
            return
        self.append((Entry.UNBAN, None, op, (ban.kind, ban.value)))
        self.notice(op, Lines.OK)
        self.log(self.line(Lines.LOG_UNBANNED.format(op=op.nick, what=ban.shown)))

    def cmd_bans(self, op, rest):
        for ban in list(self.bans.values()):
            self._ban_on(ban.kind, ban.value)   # (those that ended go)
        entries = [self._ban_entry(ban) for ban in self.bans.values()]
        self.notice(op, Lines.BANS.format(count=len(entries), entries=", ".join(entries))
                    if entries else Lines.NO_BANS)

    def _ban_entry(self, ban):
        if ban.until and ban.reason:
            return Lines.BAN_ENTRY_UNTIL_FOR.format(what=ban.shown, until=self.when(ban.until),
                                                    reason=ban.reason)
        if ban.until:
            return Lines.BAN_ENTRY_UNTIL.format(what=ban.shown, until=self.when(ban.until))
        if ban.reason:
            return Lines.BAN_ENTRY_FOR.format(what=ban.shown, reason=ban.reason)
        return ban.shown

    def cmd_mute(self, op, rest):
        found = self._target(op, rest)
        if found is None:
            return
        target, nick, more = found
        timed = self._duration(op, more)
        if timed is None:
            return
        seconds, rest = timed
        if rest:   # (no REASON here: any other word is a duration that is not one)
            self.notice(op, Lines.BAD_DURATION)
            return
        until = self.wall_clock() + seconds if seconds else None
        self.notice(op, Lines.OK)
        self.append((Entry.MUTE, target.room, op,
                     (target, Mute(nickname_keys(nick)[0], nick, until))))
        record = Lines.LOG_MUTED.format(op=op.nick, nick=nick)
        if until:
            record += Lines.LOG_UNTIL.format(until=self.when(until))
        self.log(self.line(record))

    def _mute_ended(self, mute):
        if self.mutes.get(mute.key) is mute:
            self._end_mute(mute)

    def _end_mute(self, mute):
        """A mute is over: lifted, and the member's room told, if it is here."""
        del self.mutes[mute.key]
        self.store.drop_mute(mute.key)
        member = self.member_named(mute.nick)
        if member is not None:
            line = self.line(Lines.MAY_SPEAK.format(nick=member.nick))
            self.to_room(member.room, line)
            self._log_room_line(member.room, line)

    def cmd_unmute(self, op, rest):
        wanted = rest.strip()
        nick = normalise_nickname(wanted)
        target = self.member_named(nick)
        mute = self.mutes.get(nickname_keys(nick)[0])
        if target is None and mute is None:
            self.notice(op, Lines.NO_SUCH_USER.format(nick=wanted))
            return
        self.notice(op, Lines.OK)
        if mute is not None:
            self.append((Entry.UNMUTE, None, op, mute.key))
        self.log(self.line(Lines.LOG_UNMUTED.format(op=op.nick, nick=mute.nick if mute
                                                    else target.nick)))

    def _registered_target(self, op, rest):
        """The account an /op or /deop names, or None after saying it is not registered."""
        nick = normalise_nickname(rest.strip())
        account = self.store.account_for(nickname_keys(nick))
        if account is None:
            self.notice(op, Lines.NOT_REGISTERED.format(nick=nick))
        return account

    def cmd_op(self, op, rest):
        account = self._registered_target(op, rest)
        if account is not None:
            self.notice(op, Lines.OK)
            self.append((Entry.OPERATOR, None, op, (True, account.key, account.nick)))

    def cmd_deop(self, op, rest):
        account = self._registered_target(op, rest)
        if account is None:
            return
        if account.key in self.named_operators:
            self.notice(op, Lines.OPERATOR_BY_OPTION.format(nick=account.nick))
            return
        self.notice(op, Lines.OK)
        self.append((Entry.OPERATOR, None, op, (False, account.key, account.nick)))

    def cmd_drop(self, op, rest):
        name = normalise_nickname(rest)
        room = self.room_named(name) if not room_name_problem(name) else None
        if room is self.main:
            self.notice(op, Lines.MAIN_STAYS)
        elif room is None:
            self.notice(op, Lines.NO_SUCH_ROOM.format(room=name))
        else:
            self.notice(op, Lines.OK)
            self.append((Entry.DROP, room, op, None))

    def schedule_endings(self):
        """The bans and mutes kept from before (a restart): each ends at its time."""
        for ban in list(self.bans.values()):
            if ban.until:
                self._end_at(ban.until, lambda ban=ban: self._ban_ended(ban))
        for mute in list(self.mutes.values()):
            if mute.until:
                self._end_at(mute.until, lambda mute=mute: self._mute_ended(mute))


class Leaving:
    """The end of a member, or of a connection that never joined; the end of the server."""

    def leave(self, peer, reason, told_room=None, told_self=None):
        """``peer`` is gone, for ``reason``; its room is told ``told_room`` (a kick's line)
        instead of "disconnected!", and it ``told_self`` (why it must go, then closed). Safe to
        call for a peer that never joined or left."""
        peer.gone = True
        if not peer.member:
            return
        peer.member = False   # (nothing it says from now on reaches anyone)
        self.append((Entry.LEAVE, peer.room, peer, (reason, told_room, told_self)))

    def failed(self, peer):
        """An unexpected error ends ``peer``'s connection. A member leaves with ``[error]``; a
        connection that never joined is logged with its address, so every error is in the log."""
        if peer.member:
            self.leave(peer, Reason.ERROR)
        else:
            self.closed_before_joining(peer, Reason.ERROR)

    def closed_before_joining(self, peer, reason):
        """Log a connection that ends before it could be told anything (it has no leave)."""
        self._log_with(self.line(Lines.LOG_CLOSED.format(address=peer.address)),
                       Lines.LOG_REASON.format(reason=reason))

    def shut_down(self):
        """The server stops: every member is told, and logged as leaving; nobody is told of the
        others leaving, since everyone is."""
        notice = self.line(Lines.SHUTTING_DOWN)
        for room in self.room_list:
            for peer in list(room.members):
                self.deliver(peer, notice)
                self._remember_position(peer, room)
                peer.member = False
                self._log_room_line(room, self.line(Lines.DISCONNECTED.format(nick=peer.nick)),
                                    Reason.SHUTDOWN)
            room.members.clear()
        self.members.clear()


class Applying:
    """The log applied: what each entry means to every member, the history, the store and the
    log records. Every change of the chat's state is made here, in log order."""

    def apply(self, entry):
        self._appliers[entry[0]](entry)

    def apply_say(self, entry):
        """The hot path of every message: what to_room, deliver and _keep do, written out (a
        call less is a twentieth of the room core's time per message)."""
        _, room, peer, body = entry
        ts = self.clock.prefix_bytes()  # one {ts} for the sender's two lines and the others'
        line = ts + peer.sent_head + body + SENT_END
        if peer.local:   # (a member of this process)
            own = peer.room
            if own is not None and peer.cursor != own.said:
                own.give(peer)      # what its room said before its line (take_room_lines)
            room.turn.append(line)
            room.said += 1
            if own is room:   # (a node may apply a line after its sender's /join came back)
                peer.cursor += 1    # not its own line: it gets the echo instead
            echo = ts + ECHO_START + ts + ECHO_MIDDLE + body + ECHO_END
            peer.out.append(echo)   # (Peer.queue, written out)
            peer._direct += len(echo)
            if not peer.pending:
                peer.pending = True
                self.pending.append(peer)
        else:
            room.turn.append(line)
            room.said += 1
        self.fanned += len(line)
        if not room.pending:
            room.pending = True
            self._pending_rooms.append(room)
        room.history.append(line)
        room.position = self._keep_message(room.key, line, len(body))
        if not room.kept:
            self._first_kept(room)
        if room is self.main:
            self.log(line)
        else:
            self._log_with(line, Lines.LOG_IN_ROOM.format(room=room.name))

    def apply_act(self, entry):
        _, room, peer, text = entry
        line = self.line(Lines.ACTION.format(nick=peer.nick, text=text))
        self.to_others(peer, room, line)
        if peer.local:
            self.notice(peer, Lines.OK)
            self.deliver(peer, line)
        self._keep(room, line, len(text.encode()))

    def _keep(self, room, line, text_size):
        """A message or /me line: in the room's history, the store, and the log."""
        room.history.append(line)
        room.position = self.store.keep(room.key, line, text_size)
        if not room.kept:
            self._first_kept(room)
        self._log_room_line(room, line)

    def _first_kept(self, room):
        """A room with a kept message lasts: the store lists it among the rooms from now on."""
        room.kept = True
        self.store.save_room(room.record())

    def _enter_room(self, peer, room):
        room.everyone[peer] = None
        if peer.local:
            room.members[peer] = None
            peer.cursor = room.said   # (nothing said before it came in)
        peer.room = room

    def _leave_room(self, peer, room):
        room.give(peer)   # what the room said while it was there
        del room.everyone[peer]   # (in one process the same dict as members)
        room.members.pop(peer, None)
        self._remember_position(peer, room)
        # A broadcast earlier this turn may have queued lines for it that take_pending() would
        # no longer find among the room's members: list it now, so they are written.
        self._list_pending(peer)

    def _named(self, peer, nick, account_key):
        for key in nickname_keys(peer.nick or ""):
            if self.members.get(key) is peer:
                del self.members[key]
        peer.nick = nick
        peer.account = account_key
        peer.sent_head = SENT_HEAD.format(nick=nick).encode()
        for key in nickname_keys(nick):
            self.members[key] = peer

    def apply_join(self, entry):
        _, room, peer, (nick, account_key) = entry
        self._named(peer, nick, account_key)
        peer.member = True
        prefix = self.clock.prefix()
        if peer.local:
            self.on_phase(peer, Phase.MEMBER)
            self.deliver(peer, (prefix + Lines.OK + "\n").encode())
            self._show_room(peer, room, prefix, waiting=True)
        elif account_key is not None:
            self.store.take_waiting(account_key)   # (shown on its own node)
        announcement = (prefix + Lines.CONNECTED.format(nick=nick) + "\n").encode()
        self.to_room(room, announcement)  # before joining: the newcomer is not told of itself
        self._enter_room(peer, room)
        self._log_with(announcement, Lines.LOG_FROM.format(address=peer.address))

    def _show_room(self, peer, room, prefix, waiting=False):
        """What a member coming into a room is shown: its topic, the private messages waiting
        for it (joining the chat), then what it missed there, or the room's history."""
        if room.topic:
            self.deliver(peer, (prefix + Lines.TOPIC.format(room=room.name, topic=room.topic)
                                + "\n").encode())
        if waiting and peer.account is not None:
            lines = self.store.take_waiting(peer.account)
            if lines:
                self.deliver(peer, (prefix + Lines.WAITING.format(count=len(lines))
                                    + "\n").encode())
                peer.queue_all(lines)
        seen = None
        if peer.account is not None:
            seen = self.store.seen(peer.account, room.key)
            self.store.present(peer.account, room.key, room.position)   # (for a crash)
        if seen is not None:
            self._show_missed(peer, room, seen, prefix)
        elif room.history:
            self.deliver(peer, (prefix + Lines.HISTORY.format(count=len(room.history))
                                + "\n").encode())
            peer.queue_all(room.history)  # the very bytes the members got: no re-encoding

    def _show_missed(self, peer, room, seen, prefix):
        """A registered member back in a room: what it missed there, if anything."""
        if seen >= room.position:
            return
        missed, lines = self.store.since(room.key, seen, self.catch_up)
        if missed:
            heading = (Lines.CATCH_UP.format(count=missed) if missed == len(lines)
                       else Lines.CATCH_UP_SOME.format(shown=len(lines), count=missed))
            self.deliver(peer, (prefix + heading + "\n").encode())
            peer.queue_all(lines)

    def apply_leave(self, entry):
        _, room, peer, (reason, told_room, told_self) = entry
        peer.member = False
        for key in nickname_keys(peer.nick):
            if self.members.get(key) is peer:
                del self.members[key]
        self._leave_room(peer, room)
        if told_self and peer.local:
            self.notice(peer, told_self)
            self.on_phase(peer, Phase.CLOSING)
        announcement = self.line(told_room or Lines.DISCONNECTED.format(nick=peer.nick))
        self.to_room(room, announcement)
        self._log_room_line(room, announcement, reason)
        self._forget_if_unused(room)

    def apply_rename(self, entry):
        _, room, peer, (nick, account_key) = entry
        old = peer.nick
        if peer.account is not None and account_key != peer.account:
            self._remember_position(peer, room)   # (what that account saw of the room)
        self._named(peer, nick, account_key)
        if peer.local:
            self.notice(peer, Lines.OK)
            if account_key is not None:
                self.store.present(account_key, room.key, room.position)   # (for a crash)
        line = self.line(Lines.RENAMED.format(old=old, new=nick))
        self.to_room(room, line)
        self._log_room_line(room, line)

    def apply_move(self, entry):
        _, old, peer, (name, key_hash) = entry
        room = self.room_named(name) or self._add_room(self._new_room(name, key_hash))
        if room.key_hash and room.key_hash is key_hash:
            self.store.save_room(room.record())   # (made with a key: the key is kept)
        self._leave_room(peer, old)
        left = self.line(Lines.LEFT_FOR.format(nick=peer.nick, room=room.name))
        self.to_room(old, left)
        self._log_room_line(old, left)
        prefix = self.clock.prefix()
        if peer.local:
            self.deliver(peer, (prefix + Lines.OK + "\n").encode())
            self.deliver(peer, (prefix + Lines.IN_ROOM_NOW.format(
                room=room.name, count=len(room.everyone) + 1) + "\n").encode())
            self._show_room(peer, room, prefix)
        joined = (prefix + Lines.JOINED_ROOM.format(nick=peer.nick, room=room.name)
                  + "\n").encode()
        self.to_room(room, joined)   # before joining: the newcomer is not told of itself
        self._enter_room(peer, room)
        self._log_room_line(room, joined)
        self._forget_if_unused(old)

    def apply_topic(self, entry):
        _, room, peer, topic = entry
        room.topic = topic
        self.store.save_room(room.record())
        if peer.local:
            self.notice(peer, Lines.OK)
        line = self.line(Lines.TOPIC_SET.format(nick=peer.nick, room=room.name, topic=topic)
                         if topic else Lines.TOPIC_CLEARED.format(nick=peer.nick,
                                                                  room=room.name))
        self.to_room(room, line)
        self._log_room_line(room, line)
        self._forget_if_unused(room)

    def apply_away(self, entry):
        _, _, peer, away = entry
        peer.away = away
        if peer.local:
            self.notice(peer, Lines.OK)

    def apply_private(self, entry):
        _, _, peer, (target, text) = entry
        if target.local:
            self.notice(target, Lines.PRIVATE_SENT.format(nick=peer.nick, text=text))
        if peer.local:
            self.notice(peer, Lines.OK)
            self.notice(peer, Lines.PRIVATE_ECHO.format(target=target.nick, text=text))
            if target.away is not None:
                self.notice(peer, Lines.IS_AWAY_TEXT.format(target=target.nick, text=target.away)
                            if target.away else Lines.IS_AWAY.format(target=target.nick))
        self.log(self.line(Lines.LOG_PRIVATE.format(nick=peer.nick, target=target.nick)))

    def apply_wait(self, entry):
        _, _, peer, (account_key, nick, text) = entry
        line = self.line(Lines.PRIVATE_SENT.format(nick=peer.nick, text=text))
        waits = self.store.wait(account_key, line, MAX_WAITING)
        if peer.local:
            if not waits:   # (filled meanwhile)
                self.notice(peer, Lines.TOO_MANY_WAITING.format(target=nick))
                return
            self.notice(peer, Lines.OK)
            self.notice(peer, Lines.PRIVATE_ECHO.format(target=nick, text=text))
            self.notice(peer, Lines.OFFLINE.format(target=nick))
        if waits:
            self.log(self.line(Lines.LOG_PRIVATE.format(nick=peer.nick, target=nick)))

    def apply_account(self, entry):
        _, _, peer, (action, key, nick, kept) = entry
        mine = peer.local
        if action == "register":
            keys = nickname_keys(nick)
            if self.store.account_for(keys, unreadable=UNREADABLE) is not None:
                # (a look-alike registered meanwhile; or the file can't say: not over it)
                if mine:
                    self.notice(peer, Lines.REGISTERED_ALREADY.format(nick=nick))
                return
            self.store.save_account(Account(key, nick, kept), keys)
            peer.account = key
            if mine and peer.room is not None:   # (for a crash: see present())
                self.store.present(key, peer.room.key, peer.room.position)
            replies, record = (Lines.OK, Lines.REGISTERED.format(nick=nick)), Lines.LOG_REGISTERED
        elif action == "password":   # (a new password ends the login tokens)
            self.store.save_account(Account(key, nick, kept), nickname_keys(nick))
            replies, record = (Lines.OK,), Lines.LOG_NEW_PASSWORD
        elif action == "untoken":   # (said nothing: the /password or /unregister answers)
            self.store.save_tokens(key, ())
            return
        elif action == "token":
            token = self._tokens_made.pop(kept, None) if mine else None
            account = self.store.account_for((key,))
            if account is None:   # unregistered meanwhile
                if mine:
                    self.notice(peer, Lines.NOT_REGISTERED.format(nick=nick))
                return
            self.store.save_tokens(key, (tuple(account.tokens) + (kept,))[-TOKENS_MOST:])
            replies = (Lines.OK,) + ((Lines.LOGIN_TOKEN.format(nick=nick, token=token),)
                                     if token is not None else ())
            record = Lines.LOG_TOKEN
        else:
            self.store.drop_account(key)
            if key in self.operators:
                self.operators.discard(key)
                self.store.drop_operator(key)
            peer.account = None
            replies = (Lines.OK, Lines.UNREGISTERED.format(nick=nick))
            record = Lines.LOG_UNREGISTERED
        if mine:
            for reply in replies:
                self.notice(peer, reply)
        self.log(self.line(record.format(nick=nick)))

    def apply_ban(self, entry):
        ban = entry[3]
        self.bans.pop((ban.kind, ban.value), None)   # (a new ban of the same: made now)
        self.bans[ban.kind, ban.value] = ban
        self.store.save_ban(ban)
        if ban.until:
            self._end_at(ban.until, lambda: self._ban_ended(ban))

    def apply_unban(self, entry):
        ban = self.bans.get(entry[3])
        if ban is not None:
            self._lift_ban(ban)

    def apply_mute(self, entry):
        _, room, op, (target, mute) = entry
        self.mutes[mute.key] = mute
        self.store.save_mute(mute)
        if mute.until:
            self._end_at(mute.until, lambda: self._mute_ended(mute))
        line = self.line(Lines.WAS_MUTED.format(nick=mute.nick, op=op.nick))
        self.to_room(target.room, line)
        self._log_room_line(target.room, line)

    def apply_unmute(self, entry):
        mute = self.mutes.get(entry[3])
        if mute is not None:
            self._end_mute(mute)

    def apply_operator(self, entry):
        _, _, op, (made, key, nick) = entry
        if made:
            self.operators.add(key)
            self.store.save_operator(key, nick)
        else:
            self.operators.discard(key)
            self.store.drop_operator(key)
        member = self.member_named(nick)
        if member is not None and member.account == key and member.local:
            self.notice(member, Lines.NOW_OPERATOR if made else Lines.NO_LONGER_OPERATOR)
        self.log(self.line((Lines.LOG_MADE_OPERATOR if made else Lines.LOG_TOOK_OPERATOR)
                           .format(op=op.nick, nick=nick)))

    def apply_drop(self, entry):
        _, room, op, _ = entry
        closed = self.line(Lines.ROOM_CLOSED.format(room=room.name, op=op.nick))
        for peer in list(room.everyone):
            self._leave_room(peer, room)
            prefix = self.clock.prefix()
            if peer.local:
                self.deliver(peer, closed)
                self.deliver(peer, (prefix + Lines.IN_ROOM_NOW.format(
                    room=self.main.name, count=len(self.main.everyone) + 1) + "\n").encode())
                self._show_room(peer, self.main, prefix)
            joined = (prefix + Lines.JOINED_ROOM.format(nick=peer.nick, room=self.main.name)
                      + "\n").encode()
            self.to_room(self.main, joined)
            self._enter_room(peer, self.main)
            self._log_room_line(self.main, joined)
        self._log_room_line(room, closed)
        self.log(self.line(Lines.LOG_DROPPED.format(op=op.nick, room=room.name)))
        room.topic = room.key_hash = None
        room.kept = False
        room.history.clear()
        self._forget_if_unused(room)


class Keeping:
    """The rooms: made, found by name, forgotten when nothing keeps them; the store's rooms
    loaded at start."""

    def _load_rooms(self):
        """The rooms the store kept (a restart), with the lines a newcomer is shown."""
        for record in self.store.rooms():
            room = self.room_named(record.name)
            if room is None:
                room = self._add_room(self._new_room(record.name))
            room.topic, room.key_hash = record.topic, record.key_hash
            room.kept = self.store.has_messages(room.key)
            room.position = self.store.position(room.key)
            room.history.extend(self.store.recent(room.key, self.history_size))

    def _new_room(self, name, key_hash=None):
        return Room(name, self.history_size, key_hash=key_hash, shared=self.shared_rooms)

    def _add_room(self, room):
        for key in room_keys(room.name):
            self.rooms[key] = room
        self.room_list.append(room)
        return room

    def room_named(self, name):
        """The room whose name looks like ``name`` (normalised), or None."""
        return found_by_keys(self.rooms, room_keys(name))

    def _forget_if_unused(self, room):
        """A room other than #main ends when it has no member, topic or kept message."""
        if room is self.main or room.everyone or room.topic or room.kept:
            return
        for key in room_keys(room.name):
            del self.rooms[key]
        self.room_list.remove(room)
        self.store.drop_room(room.key)


class Chat(Delivering, Keeping, Arriving, Talking, Registering, Moderating, Leaving, Applying):
    """The room core. Decides who may do what and which line goes to whom; never touches a socket.

    Each ``*_line`` method (``line_handlers()`` names the one for each phase) takes one complete
    line (bytes, without its ending) from a peer in that phase and returns the phase the
    connection moves to, or None to stay. Every change of the chat's state is an entry of the
    log (``append``), made once the change is found to be allowed, and made real by ``apply``
    (the parts above: Arriving, Talking, Registering and Moderating decide; Applying applies).
    Output is appended to each peer's ``out``; ``take_pending()`` lists the peers with new
    output, and whoever owns the sockets writes them (the Server does it once per loop turn).
    ``log`` takes each logged line as bytes; ``store`` keeps what outlives a connection (see
    MemoryStore). The hooks ``on_phase``, ``on_hold`` and ``on_timer`` tell the loop what the
    room does on its own: a connection moved (an answer that came later, a kick), a connection's
    input to hold while an answer is awaited, an action due later (a ban's end).
    """


    # The attributes every message touches, in slots (see FEW_ENOUGH_ATTRIBUTES); the rest are
    # in the instance's dict, which must stay under that number.
    __slots__ = ("_appliers", "_keep_message", "_pending_rooms", "append", "append_say", "clock",
                 "fanned", "log", "main", "mutes", "pending", "store")

    # The phases whose lines the room reads, and the method that takes each one's lines.
    LINE_HANDLERS = {Phase.MEMBER: "member_line", Phase.NICKNAME: "nickname_line",
                     Phase.PASSWORD: "password_line", Phase.NICK_PASSWORD: "nick_password_line",
                     Phase.RENAME_PASSWORD: "rename_password_line"}

    def __init__(self, log, clock=None, history=DEFAULT_HISTORY, password=None,
                 now=time.monotonic, max_nick=MAX_NICK_CHARS, store=None, commands=None,
                 max_rooms=DEFAULT_MAX_ROOMS, hashing=None, catch_up=DEFAULT_CATCH_UP,
                 operators=(), wall_clock=time.time, shared_rooms=True):
        self.log = log
        self.clock = clock or Clock()
        self.max_nick = max_nick
        self.store = store if store is not None else MemoryStore()
        # Control characters aside, as on the attempts: a client's stray \r (telnet's, or a
        # client probing for TLS) is no part of what the person typed.
        self.password = (password.encode("utf-8").translate(None, CONTROL_BYTES)
                         if password is not None else None)
        if password is not None:
            import hmac
            self._same_secret = hmac.compare_digest  # constant time: no hint in the timing
        self.now = now
        self.members = {}       # each of a member's nickname_keys -> that member
        self.history_size = history
        self.catch_up = catch_up
        self.hashing = hashing or InlineHashing()
        self.on_phase = lambda peer, phase: None
        self.on_hold = lambda peer, held: None
        self.on_timer = lambda seconds, action: None   # action() in ``seconds``, on the loop
        self.wall_clock = wall_clock     # when bans and mutes end (they outlive restarts)
        self.paused = False     # a cluster's node can't reach the others: nobody joins now
        # Operators: the registered nicknames --operators names (by key; one not registered yet
        # becomes one when it registers), and those made with /op (kept in the store).
        self.named_operators = {nickname_keys(nick)[0] for nick in operators}
        self.operators = {key for key, _ in self.store.operators()}
        self.bans = {(ban.kind, ban.value): ban for ban in self.store.bans()}
        self.mutes = {mute.key: mute for mute in self.store.mutes()}
        self.max_rooms = max_rooms
        self.rooms = {}         # each of a room's room_keys -> that room
        self.room_list = []     # every room once, #main first
        self.shared_rooms = shared_rooms
        self.main = self._add_room(self._new_room(MAIN_ROOM))
        self._load_rooms()
        for room in list(self.room_list):   # (kept only by members when the server stopped or
            self._forget_if_unused(room)    # crashed: no leave came to end it)
        self.pending = []       # peers given a line of their own since the last take_pending()
        self._pending_rooms = []    # rooms whose every member has new output since then
        self.fanned = 0             # bytes of every line fanned out to a room so far (Peer.above)
        self._wrong_passwords = {}  # host -> [recent wrong-password times, locked until]
        self._tokens_made = {}      # digest -> login token, until its entry is applied
        commands = COMMANDS if commands is None else commands
        self.commands = {}      # every name of every command -> (its handler, its record)
        for command in commands:
            for name in (command.name,) + command.aliases:
                self.commands[name] = (getattr(self, command.handler), command)
        self.help = help_line(commands)
        self.operator_help = help_line(commands, operator=True)
        sequencer = LocalSequencer(self.apply, self.apply_say)   # the log: entries in, applied
        self.append, self.append_say = sequencer.append, sequencer.append_say
        self._keep_message = self.store.keep   # (the hot path's, looked up once)
        self._appliers = {kind: getattr(self, "apply_" + kind)
                          for name, kind in vars(Entry).items() if not name.startswith("_")}

    def line_handlers(self):
        """Phase -> the method that handles a line from a connection in that phase."""
        return {phase: getattr(self, name) for phase, name in self.LINE_HANDLERS.items()}


# =============================================================================================
# The store: what outlives a connection (and, in a file, the server). One small interface, three
# homes: this process's memory (MemoryStore), a SQLite file, or Redis for a cluster.
# =============================================================================================

RoomRecord = collections.namedtuple("RoomRecord", "key name topic key_hash")
Account = collections.namedtuple("Account", "key nick password_hash tokens",
                                 defaults=((),))   # tokens: the login tokens' digests, oldest first
# What the data file's account_for(keys, unreadable=UNREADABLE) answers when it could not read
# the file: where "no account" would let anyone take a registered nickname (a join, /nick,
# /register), the nickname counts as someone else's (busy), and no password or token matches.
UNREADABLE = Account("", "", "!", ())
Ban = collections.namedtuple("Ban", "kind value shown until reason")   # kind: "nick", "address"
Mute = collections.namedtuple("Mute", "key nick until")


class MemoryStore:
    """What the chat keeps, in this process's memory only: gone when it stops (``--data
    :memory:``, or where no data file can be had). Every store has these methods:

    rooms      ``rooms()`` -> [RoomRecord]; ``save_room(record)``; ``drop_room(key)``
    messages   ``keep(room_key, line, text_size)`` -> its position; ``recent(room_key, count)``
               -> [line]; ``since(room_key, position, count)`` -> (missed, [line]);
               ``search(room_key, folded, count, done)``: ``done(found, [line])``, at once
               (or later, for a store whose ``answers_later``); ``position(room_key)``;
               ``has_messages(room_key)``
    accounts   ``account_for(keys)`` -> the Account known by any of ``keys``, or None;
               ``save_account(account, keys)``; ``save_tokens(key, tokens)`` (the login
               tokens' digests alone); ``drop_account(key)`` (its waiting messages
               and positions too); ``seen(account_key, room_key)`` -> position or None (never
               there); ``save_seen(account_key, room_key, position)``;
               ``present(account_key, room_key, position)``: in the room from ``position``
               on, until a save_seen (a store that outlives a crash keeps it: a crash saves
               no positions)
    waiting    ``wait(account_key, line, most)`` -> False if ``most`` wait already;
               ``waiting_count(account_key)``; ``take_waiting(account_key)`` -> [line], which
               no longer wait
    operators  ``operators()`` -> [(key, nick)]; ``save_operator(key, nick)``;
               ``drop_operator(key)``
    bans       ``bans()`` -> [Ban], oldest first; ``save_ban(ban)``; ``drop_ban(kind, value)``
    mutes      ``mutes()`` -> [Mute]; ``save_mute(mute)``; ``drop_mute(key)``
    ``commit()``  makes the changes since the last commit durable; the loop calls it once a turn,
               before it writes to the sockets, so nothing is acknowledged before it is kept.
    ``close()``

    A line is the bytes the members received, ending in its message's text (``text_size``
    bytes, before the line end), which is what a search looks in; ``folded`` is a search's text,
    casefolded. A message's position counts the room's messages (1, 2, ...), so what was missed
    since one is a subtraction. Keys are what names are compared by (casefolded look-alike
    skeletons), never what is shown.
    """

    answers_later = False   # every answer comes at once: nothing waits for it

    def __init__(self, keep=DEFAULT_KEEP):
        self._keep = keep
        self._rooms = {}        # key -> RoomRecord
        self._messages = {}     # room key -> deque of (position, line, text_size)
        self._positions = {}    # room key -> its last message's position (they count them)
        self._accounts = {}     # key -> Account
        self._account_keys = {}   # each of an account's nickname keys -> its key
        self._seen = {}         # (account key, room key) -> position
        self._waiting = {}      # account key -> [line]
        self._operators = {}    # key -> nick
        self._bans = {}         # (kind, value) -> Ban, in the order they were made
        self._mutes = {}        # key -> Mute

    # -- rooms ----------------------------------------------------------------------------------
    def rooms(self):
        return list(self._rooms.values())

    def save_room(self, record):
        self._rooms[record.key] = record

    def drop_room(self, key):
        self._rooms.pop(key, None)
        self._messages.pop(key, None)
        self._positions.pop(key, None)
        for seen in [seen for seen in self._seen if seen[1] == key]:
            del self._seen[seen]

    # -- messages -------------------------------------------------------------------------------
    def keep(self, room_key, line, text_size):
        position = self._positions.get(room_key, 0) + 1
        self._positions[room_key] = position
        try:   # (every message but a room's first: no test of its own, 10% of this call)
            self._messages[room_key].append((position, line, text_size))
        except KeyError:
            self._messages[room_key] = collections.deque([(position, line, text_size)],
                                                         maxlen=self._keep)
        return position

    def recent(self, room_key, count):
        kept = self._messages.get(room_key, ())
        return [line for _, line, _ in list(kept)[-count:]] if count else []

    def since(self, room_key, position, count):
        lines = [line for kept_at, line, _ in self._messages.get(room_key, ())
                 if kept_at > position]
        return self.position(room_key) - position, lines[-count:] if count else []

    def search(self, room_key, folded, count, done):
        found = [line for _, line, size in self._messages.get(room_key, ())
                 if folded in text_of_line(line, len(line) - size - 1)]
        done(len(found), found[-count:] if count else [])

    def position(self, room_key):
        return self._positions.get(room_key, 0)

    def has_messages(self, room_key):
        return self._positions.get(room_key, 0) > 0

    # -- accounts -------------------------------------------------------------------------------
    def account_for(self, keys, unreadable=None):
        """(``unreadable``: what a store that failed to read answers instead; see UNREADABLE.)"""
        owner = found_by_keys(self._account_keys, keys)
        return self._accounts[owner] if owner is not None else None

    def save_account(self, account, keys):
        self._accounts[account.key] = account
        for key in keys:
            self._account_keys[key] = account.key

    def save_tokens(self, key, tokens):
        account = self._accounts.get(key)
        if account is not None:
            self._accounts[key] = account._replace(tokens=tuple(tokens))

    def drop_account(self, key):
        self._accounts.pop(key, None)
        for alias in [alias for alias, owner in self._account_keys.items() if owner == key]:
            del self._account_keys[alias]
        self._waiting.pop(key, None)
        for seen in [seen for seen in self._seen if seen[0] == key]:
            del self._seen[seen]

    def seen(self, account_key, room_key):
        return self._seen.get((account_key, room_key))

    def save_seen(self, account_key, room_key, position):
        self._seen[account_key, room_key] = position

    def present(self, account_key, room_key, position):
        pass   # (gone with the process; a cluster's reaper saves the leaves of a dead node)

    def wait(self, account_key, line, most):
        waiting = self._waiting.setdefault(account_key, [])
        if len(waiting) >= most:
            return False
        waiting.append(line)
        return True

    def waiting_count(self, account_key):
        return len(self._waiting.get(account_key, ()))

    def take_waiting(self, account_key):
        return self._waiting.pop(account_key, [])

    # -- moderation -----------------------------------------------------------------------------
    def operators(self):
        return list(self._operators.items())

    def save_operator(self, key, nick):
        self._operators[key] = nick

    def drop_operator(self, key):
        self._operators.pop(key, None)

    def bans(self):
        return list(self._bans.values())

    def save_ban(self, ban):
        self._bans.pop((ban.kind, ban.value), None)   # a new ban of the same: made now
        self._bans[ban.kind, ban.value] = ban

    def drop_ban(self, kind, value):
        self._bans.pop((kind, value), None)

    def mutes(self):
        return list(self._mutes.values())

    def save_mute(self, mute):
        self._mutes[mute.key] = mute

    def drop_mute(self, key):
        self._mutes.pop(key, None)

    # -- durability -----------------------------------------------------------------------------
    def commit(self):
        pass   # memory: kept as soon as it is changed, until the server stops

    def has_changes(self):
        """Whether changes wait for ``commit()`` (never, in memory)."""
        return False

    def next_due(self):
        """When ``commit()`` has something to do though nothing changed (never, in memory)."""
        return float("inf")

    def close(self):
        pass


class DataFileError(Exception):
    """The data file can't be used: its one line for standard error says which file and why."""


class Checkpointer:
    """Folds the data file's WAL (where commits go) into the file, on a thread of its own with
    a connection of its own, so that the loop's commits never wait for the disk (Redis flushes
    its append-only file on a background thread, bio.c, for the same reason).

    A checkpoint waits for the disk twice (the WAL flushed, then the file); done by the loop
    (SQLite's default, every 1000 pages) it stalls a turn for as long, and on a disk whose flush
    takes 10 ms it doubled the mean cost of a commit (bench/commit_cost.py, RESULTS). Here it
    runs at most every CHECKPOINT_EVERY seconds after a commit
    (``wanted``), PASSIVE: it never stops the loop's commits (sqlite3 lets go of the GIL while
    it works). What it leaves: under commits without a pause, the frames written while it
    worked; the WAL restarts from its beginning only once every frame is in the file, so past
    WAL_MOST_PAGES the loop finishes the job itself (SQLiteStore._fold_wal_in)."""

    def __init__(self, path):
        import threading
        self.path = path
        self.wanted = threading.Event()     # set by the loop after a commit
        self.wal_pages = 0                  # the WAL's size at the last checkpoint, in pages
        self.failed = False                 # no connection of its own: SQLite's checkpoints then
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:   # ("can't start new thread": SQLite's own checkpoints, then)
            self._thread = None
            self.failed = True
            self.wal_pages = WAL_MOST_PAGES + 1

    def _run(self):
        import sqlite3
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            try:
                while not self._stopping.is_set():
                    self.wanted.wait()
                    self.wanted.clear()
                    if self._stopping.is_set():
                        break
                    self._checkpoint(db)
                    self._stopping.wait(CHECKPOINT_EVERY)
            finally:
                db.close()
        except BaseException:   # (no connection, or anything unforeseen: never a silent end)
            self.failed = True
            self.wal_pages = WAL_MOST_PAGES + 1   # (the loop sees it at its next commit)

    def _checkpoint(self, db):
        import sqlite3
        try:
            busy, pages, folded = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return   # (a full disk: the loop's commits say so; the WAL is folded in later)
        self.wal_pages = pages

    def stop(self):
        self._stopping.set()
        self.wanted.set()
        if self._thread is not None:
            self._thread.join()


class TurnJournal:
    """The data file's journal (``chat.db-lines``): the lines each turn kept, appended with one
    ``write`` before the turn's writes to the sockets, as Redis appends to its append-only file
    before it replies, and written into the data file in one transaction every JOURNAL_HOLDS
    seconds (SQLiteStore). A transaction a turn cost a quarter of the server's time at 10
    members (its WAL frames, two ``pwrite``s a page, and six ``fcntl`` locks); a ``write`` a
    turn costs one system call. What a crash leaves here is put into the data file at the next
    start, before anything else reads it; a record is whole or ignored (its size and CRC-32
    first), and putting a row in twice is harmless (rows are keyed by room and position).

    Generations: the file starts with its generation, and every commit to the data file stores
    the generation of the journal it saw (``journal`` table) and starts the journal's next one,
    empty. So a start puts in the journal only if it is the next of the data file's (one
    stored already is in, say a crash came between the commit and the journal emptied; one
    further on is not this file's, say a copy of the data file put back after a crash).

    The file: FILE_HEADER (MAGIC, the generation), then records. A record: <II (the payload's
    size, its CRC-32), then a row after another, each <HqIIi (the room key's size, the position
    of its last line, the lines' size, the sizes' size, where the text starts or -1), then the
    room key, the lines and their sizes (SQLiteStore._row)."""

    SUFFIX = "-lines"
    MAGIC = b"chatlns1"
    FILE_HEADER = struct.Struct("<8sQ")
    HEADER = struct.Struct("<II")
    ROW = struct.Struct("<HqIIi")

    def __init__(self, data_path):
        self.path = data_path + self.SUFFIX
        self.fd = None
        self.generation = 0
        self.size = 0       # the file's size (what a write cut short is cut back to)

    def read(self):
        """(its generation or None, the rows of every whole record, how many bytes after them
        are not one: a write cut short by a power cut, or damage)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, [], 0
        start = self.FILE_HEADER.size
        if len(data) < start or data[:len(self.MAGIC)] != self.MAGIC:
            return None, [], len(data)   # (an empty file: cut before its header was written)
        generation = self.FILE_HEADER.unpack_from(data)[1]
        rows, at, header = [], start, self.HEADER
        while at + header.size <= len(data):
            size, crc = header.unpack_from(data, at)
            payload = data[at + header.size:at + header.size + size]
            if not size or len(payload) < size or binascii.crc32(payload) != crc:
                break   # (a record is never empty: zeros are a file grown, not written)
            try:
                rows += self._rows_of(payload)
            except (struct.error, ValueError):   # (a CRC that matched by chance)
                break
            at += header.size + size
        return generation, rows, len(data) - at

    def _rows_of(self, payload):
        rows, at, row = [], 0, self.ROW
        while at < len(payload):
            room_size, last, lines_size, sizes_size, text_at = row.unpack_from(payload, at)
            at += row.size
            room = payload[at:at + room_size].decode("utf-8")
            at += room_size
            lines = payload[at:at + lines_size]
            at += lines_size
            sizes = payload[at:at + sizes_size]
            at += sizes_size
            if len(sizes) != sizes_size:
                raise struct.error("a row cut short")
            rows.append((room, last, lines, sizes, None if text_at < 0 else text_at))
        return rows

    def open(self, generation):
        """Ready to append, from empty, as ``generation`` (what it held is in the data file
        by now, or not the file's)."""
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | BINARY, 0o600)
        self._start(generation)

    def _start(self, generation):
        os.ftruncate(self.fd, 0)
        self.size = 0
        self.generation = generation
        header = self.FILE_HEADER.pack(self.MAGIC, generation)
        if os.write(self.fd, header) != len(header):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.size = len(header)

    def append(self, rows):
        """One record of ``rows``, or OSError with the file as it was (a write cut short by a
        full disk is cut off again: a torn record would hide every record after it)."""
        pack = self.ROW.pack
        parts = [b""]
        for room, last, lines, sizes, text_at in rows:
            room = room.encode("utf-8")
            parts += (pack(len(room), last, len(lines), len(sizes),
                           -1 if text_at is None else text_at), room, lines, sizes)
        payload = b"".join(parts)
        parts[0] = self.HEADER.pack(len(payload), binascii.crc32(payload))
        record = b"".join(parts)
        try:
            written = os.write(self.fd, record)
        except OSError:
            self._cut_back()
            raise
        if written != len(record):
            self._cut_back()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.size += written

    def _cut_back(self):
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            self.close(remove=False)   # (no journal from here: a commit a turn, as before)
            raise

    def start_next(self):
        """The data file has what it held, and says so (its generation): the next generation,
        from empty (or none at all, once it was closed after a write it could not cut back)."""
        if self.fd is None:
            self.close(remove=True)
            return
        try:
            self._start(self.generation + 1)
        except OSError:
            self.close(remove=True)   # (no journal from here: a commit a turn, as before)

    def close(self, remove):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if remove:
            try:
                os.remove(self.path)
            except OSError:
                pass


class SQLiteStore(MemoryStore):
    """What the chat keeps, in a SQLite file (``--data``): the MemoryStore's interface, kept.

    One connection, owned by the loop. The turn's changes are gathered in memory and kept by
    ``commit()``, which the loop calls once a turn before it writes to the sockets (Redis writes
    its append-only file in beforeSleep the same way): an acknowledgement never runs ahead of
    the disk. A turn of lines alone is appended to the journal (TurnJournal), whose lines go
    into the file within JOURNAL_HOLDS; any other turn is one transaction. WAL mode with synchronous=NORMAL: a commit survives the
    server's crash (even SIGKILL); a power cut may lose the last ones (``durable`` makes each
    commit wait for the disk: synchronous=FULL). A lock file beside it ("-lock", held while the
    server runs) stops a second server at once, while other programs (the sqlite3 shell, a
    backup) may still read the data file. When the disk is full
    or failing, the chat goes on and the changes are dropped: said once in the log, and again
    when writing works.

    What is kept in memory, for speed, is only what a room needs at once (MemoryStore's rooms
    and operators, bans and mutes, which are few); messages, accounts and waiting messages are
    read from the file when asked for, through indexes that touch one room's or one account's
    rows, so start-up does not grow with the file. Reads a crowd of logins repeats (an account,
    the same catch-up) are remembered, boundedly, until what they read changes.
    """

    APPLICATION_ID = 0x43484154   # "CHAT": what says a SQLite file is a chat's data file

    def __init__(self, path, keep=DEFAULT_KEEP, durable=False, log=None, clock=None):
        MemoryStore.__init__(self, keep)
        self.path = path
        self.log = log or (lambda line: None)
        self.clock = clock or Clock()
        self._pending = []      # (sql, parameters) of the turn, in order
        self._presence = {}     # (account, room) -> marker not written yet (see present())
        self._presence_due = 0.0
        self._turn = {}         # room key -> ([line], [text_size]) kept this turn, not written yet
        # The rows in the journal (TurnJournal), not in the data file yet, and how many of them
        # the open transaction holds (a read writes them in, so that it sees them)
        self._journaled = []
        self._journaled_in_transaction = 0
        self._into_file_due = 0.0
        self._journal = None
        self.opening_note = None   # what the start found, for standard error (open_store)
        self._pruned_at = {}    # room key -> the position at which it was last pruned
        self._failing = False   # a write failed: said so; say so again when one works
        self._closed = False
        # Accounts as read, by the key asked for (None: no account), so that a login reads its
        # account once, not at each of its steps (a crowd logging in with tokens spent 10% of
        # the loop in those reads). Every change of an account goes through this store:
        # forgotten at each, and when a commit fails (the file is then what is true).
        self._accounts_read = {}
        # The last reads of a room's lines, by (room, after, most): (the room's position then,
        # the lines). A crowd coming back at once (after a restart, a network cut) left at the
        # same place and asks for the same lines: read once while the room says nothing new.
        self._lines_read = {}
        # The accounts that may have private messages waiting (no query for the others); None
        # after a failed write, until a commit works again: every account may then.
        self._waiting_for = set()
        self._lock = hold_lock_file(path + "-lock")
        self.db = None
        try:
            self.db = self._open(path, durable)
            journal, generation = self._take_in_journal()
            self._load_small_tables()
            if durable:
                journal.close(remove=True)   # (a commit a turn, waiting for the disk)
            else:
                try:
                    journal.open(generation + 1)
                    self._journal = journal
                except OSError:   # (a full disk: no journal this run, a commit a turn)
                    journal.close(remove=True)
            self._checkpointer = Checkpointer(path)
        except BaseException:   # (nothing left open: the caller may go on in memory)
            if self._journal is not None:
                self._journal.close(remove=False)
            if self.db is not None:
                self.db.close()
            os.close(self._lock)
            raise

    # -- opening ------------------------------------------------------------------------------
    def _open(self, path, durable):
        import sqlite3
        create_private(path)   # (OSError where it can't be: the caller keeps things in memory)
        try:
            # timeout 0: a file another server holds is refused at once, never waited for
            db = sqlite3.connect(path, isolation_level=None, timeout=0)
        except sqlite3.Error as exc:
            raise OSError(str(exc))
        try:
            self._check(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=%s" % ("FULL" if durable else "NORMAL"))
            db.execute("PRAGMA case_sensitive_like=OFF")   # (a search's LIKE, whatever the build)
            db.execute("PRAGMA wal_autocheckpoint=0")      # (the Checkpointer's thread does it)
            # When the WAL starts again from its beginning, its file is cut back to this size:
            # a burst that grew it leaves no file of that size behind.
            db.execute("PRAGMA journal_size_limit=%d" % WAL_FILE_MOST_BYTES)
            db.execute("BEGIN IMMEDIATE")
            self._migrate(db)
            db.execute("COMMIT")
            # From here a lock is waited for, briefly: the Checkpointer's connection takes the
            # WAL's write lock for an instant when it finds the WAL's header being written.
            db.execute("PRAGMA busy_timeout=50")
        except sqlite3.OperationalError as exc:
            db.close()
            raise DataFileError("cannot use %s: %s" % (path, exc))
        except sqlite3.DatabaseError as exc:
            db.close()
            raise DataFileError("%s is damaged or not a chat data file (%s)" % (path, exc))
        except DataFileError:
            db.close()
            raise
        return db

    def _check(self, db):
        """Refuse, before anything is written to it, a file that is not a chat's."""
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id == 0 and version == 0 and tables == 0:
            return   # a new file (or an empty database): made a chat's below
        if application_id != self.APPLICATION_ID:
            raise DataFileError("%s is not a chat data file" % self.path)
        if version > len(MIGRATIONS):
            raise DataFileError("%s was written by a newer chat_server (data version %d; this"
                                " one knows %d)" % (self.path, version, len(MIGRATIONS)))

    def _migrate(self, db):
        """Bring the schema to the newest version, one step per version (inside the caller's
        transaction: all steps or none)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.execute("PRAGMA application_id=%d" % self.APPLICATION_ID)
        for number, statements in enumerate(MIGRATIONS[version:], version + 1):
            for statement in statements:
                db.execute(statement)
            db.execute("PRAGMA user_version=%d" % number)

    def _take_in_journal(self):
        """What the journal holds (the last lines before a crash) into the data file, pruned
        to ``keep`` as a commit prunes, if it is the journal that follows the file (see
        TurnJournal): the journal, and the generation the data file has now."""
        import sqlite3
        journal = TurnJournal(self.path)
        generation, rows, torn = journal.read()
        try:
            stored = self.db.execute("SELECT generation FROM journal").fetchone()[0]
            if rows and generation == stored + 1:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR IGNORE INTO messages (room, last, lines, sizes,"
                                    " text_at) VALUES (?, ?, ?, ?, ?)", rows)
                for room in {row[0] for row in rows}:
                    self.db.execute("DELETE FROM messages WHERE room = ? AND last <= (SELECT"
                                    " max(last) FROM messages WHERE room = ?) - ?",
                                    (room, room, self._keep))
                self.db.execute("UPDATE journal SET generation = ?", (generation,))
                self.db.execute("COMMIT")
                stored = generation
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise DataFileError("cannot use %s: %s" % (journal.path, exc))
        if rows and generation > stored:   # (set aside, not emptied: its lines are someone's)
            aside = "%s.%d" % (journal.path, generation)
            try:
                os.replace(journal.path, aside)
            except OSError as exc:   # (never emptied instead: refused, the files untouched)
                raise DataFileError("cannot use %s: %s" % (journal.path, exc))
            self.opening_note = Lines.JOURNAL_NOT_THE_FILES.format(path=journal.path,
                                                                   aside=aside)
        elif torn:
            self.opening_note = Lines.JOURNAL_TORN.format(path=journal.path, count=torn)
        return journal, stored

    def _load_small_tables(self):
        """What is small and asked for often: rooms, operators, bans and mutes, in memory."""
        import sqlite3
        try:
            self._read_small_tables()
        except sqlite3.OperationalError as exc:   # (an I/O error, a lock: as _open says it)
            raise DataFileError("cannot use %s: %s" % (self.path, exc))
        except sqlite3.DatabaseError as exc:   # (a page of them damaged: the header was fine)
            raise DataFileError("%s is damaged or not a chat data file (%s)" % (self.path, exc))

    def _read_small_tables(self):
        for key, name, topic, key_hash in self.db.execute(
                "SELECT key, name, topic, key_hash FROM rooms"):
            self._rooms[key] = RoomRecord(key, name, topic, key_hash)
        for key, nick in self.db.execute("SELECT key, nick FROM operators"):
            self._operators[key] = nick
        for row in self.db.execute("SELECT kind, value, shown, until, reason FROM bans"
                                   " ORDER BY id"):
            self._bans[row[0], row[1]] = Ban(*row)
        for row in self.db.execute("SELECT key, nick, until FROM mutes"):
            self._mutes[row[0]] = Mute(*row)
        self._waiting_for = {key for key, in self.db.execute(
            "SELECT DISTINCT account FROM waiting")}
        self._settle_crashed_presence()

    def _end_presence(self):
        """A stop: every leave saved its place already, but for one whose commit failed, whose
        marker is left: taken as where it came in (its catch-up may repeat, never miss), so
        that only a crash leaves a marker for the next start to settle."""
        import sqlite3
        try:
            self.db.execute("UPDATE seen SET position = -1 - position WHERE position < 0")
        except sqlite3.Error:
            pass

    def _settle_crashed_presence(self):
        """Members in a room when the server crashed (see present()): they had all of it but,
        perhaps, its last row (the last turn's lines, committed before they were written to
        them), which catch-up shows them again: never fewer lines, at most a turn more. Done
        before any new row comes, and only after a crash (a stop saves every leave)."""
        import sqlite3
        if not self.db.execute("SELECT 1 FROM seen WHERE position < 0 LIMIT 1").fetchall():
            return
        try:
            self.db.execute(
                "UPDATE seen SET position = max(-1 - position, coalesce((SELECT last FROM"
                " messages WHERE messages.room = seen.room ORDER BY last DESC LIMIT 1"
                " OFFSET 1), 0)) WHERE position < 0")
        except sqlite3.OperationalError:
            pass   # (a file that can't be written now: each marker counts as its start)

    # -- writing: gathered, then one transaction a turn -----------------------------------------
    def _later(self, sql, parameters):
        self._pending.append((sql, parameters))

    def has_changes(self):
        # (A read writes what was gathered into the open transaction, so that it sees it: the
        # transaction is then a change too.)
        return bool(self._turn or self._pending) or self.db.in_transaction or bool(
            self._presence and time.monotonic() >= self._presence_due) or bool(
            self._journaled and time.monotonic() >= self._into_file_due)

    def next_due(self):
        """When a commit is due though no turn changed anything (the loop wakes for it)."""
        return min(self._into_file_due if self._journaled else float("inf"),
                   self._presence_due if self._presence else float("inf"))

    def commit(self, into_file=False):
        """The turn's changes kept: its lines alone into the journal, anything else (and the
        journal's rows, once JOURNAL_HOLDS passed, or ``into_file``) into the data file in
        one transaction."""
        if not (self.has_changes() or into_file and self._journaled):
            return
        if not into_file and self._journal_takes_turn():
            return
        import sqlite3
        try:
            self._write_pending()
            if self._journal is not None:   # (the file has what the journal held: see
                self.db.execute("UPDATE journal SET generation = ?",   # TurnJournal)
                                (self._journal.generation,))
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._failed(exc)
            if self._journaled:   # (in the journal still: tried again later, not every turn)
                self._into_file_due = time.monotonic() + JOURNAL_HOLDS
            return
        if self._journal is not None:
            self._journaled = []
            self._journaled_in_transaction = 0
            self._journal.start_next()
        checkpointer = self._checkpointer
        if checkpointer.wal_pages > WAL_MOST_PAGES:
            self._fold_wal_in()
        if not checkpointer.wanted.is_set():
            checkpointer.wanted.set()
        self._writing_works()
        if self._waiting_for is None:
            self._learn_who_waits()

    def _journal_takes_turn(self):
        """The turn's lines appended to the journal, if they are all the turn changed: whether
        that is all this commit has to do (the journal's rows are not due in the file yet)."""
        journal = self._journal
        if journal is None or not self._turn or self._pending or \
                self.db.in_transaction or self._presence and \
                time.monotonic() >= self._presence_due:
            return False
        if self._failing and (journal.fd is None or journal.size >= JOURNAL_FAILING_MOST_BYTES):
            return self._let_turn_go()
        if journal.fd is None:
            return False
        rows = [self._row(room, kept) for room, kept in self._turn.items()]
        try:
            journal.append(rows)
        except OSError:   # (the data file, then, for this turn: it may still take it; but
            if self._failing:   # while it fails, only when due: not every journaled row a turn)
                return self._let_turn_go()
            return False
        self._turn = {}
        now = time.monotonic()
        if not self._journaled:
            self._into_file_due = now + JOURNAL_HOLDS
        self._journaled += rows
        if now >= self._into_file_due or journal.size >= JOURNAL_MOST_BYTES and \
                not self._failing:
            return False   # (and the commit says whether writing works)
        return True   # (the journal working says nothing of the data file: no "again" here)

    def _let_turn_go(self):
        """Neither the journal nor the data file takes this turn (the data file fails): not
        kept, as the log says, unless the data file is due to be tried again (then it is)."""
        if self._journaled and time.monotonic() < self._into_file_due:
            self._turn = {}
            return True
        return False

    def _writing_works(self):
        if self._failing:
            self._failing = False
            self.log(self._record(Lines.LOG_WRITING_AGAIN.format(path=self.path)))

    def _learn_who_waits(self):
        rows = self._read_or_none("SELECT DISTINCT account FROM waiting", ())
        if rows is not None:
            self._waiting_for = {key for key, in rows}

    def _fold_wal_in(self):
        """The WAL folded into the file by the loop itself, at once (a wait for the disk): only
        when the Checkpointer's thread can't finish, because commits keep coming while it works
        (the WAL starts again from its beginning only when all of it is in the file)."""
        import sqlite3
        checkpointer = self._checkpointer
        try:
            if checkpointer.failed:   # its thread has ended: SQLite's own checkpoints, then
                self.db.execute("PRAGMA wal_autocheckpoint=1000")
            busy, pages, folded = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return   # (the commit is done: a checkpoint that fails loses nothing, and comes again)
        # Refused because the thread's own checkpoint was running: tried again at the next
        # commit, which costs nothing (PASSIVE never waits); counted as done, it let the WAL
        # grow another WAL_MOST_PAGES each time, to 108 MB in one stress run. Cut short by a
        # reader (a backup in the middle of its read) it is not tried at every commit: once
        # the reader lets go, the thread folds what piled up meanwhile, off the loop (the loop
        # doing it had a commit wait 0.7 s after a long read).
        if not busy or checkpointer.failed:
            checkpointer.wal_pages = 0   # (failed: SQLite's own checkpoints from now on)

    def _write_pending(self):
        """Everything gathered so far, into the open transaction (begun if none is)."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN")
        rows = self._journaled[self._journaled_in_transaction:]   # (the journal's, oldest first)
        self._journaled_in_transaction = len(self._journaled)
        if self._turn:
            turn, self._turn = self._turn, {}
            rows += [self._row(room, kept) for room, kept in turn.items()]
        if len(rows) > 1:   # (rows wholly older than the kept lines are not written at all)
            positions, keep = self._positions, self._keep
            rows = [row for row in rows if row[1] > positions.get(row[0], row[1]) - keep]
        if rows:
            self.db.executemany("INSERT INTO messages (room, last, lines, sizes, text_at)"
                                " VALUES (?, ?, ?, ?, ?)", rows)
            for room in {row[0] for row in rows}:
                if room in self._positions:   # (else dropped this turn: its journaled rows go
                    self._prune(room)         # with the drop's DELETE below)
        pending, self._pending = self._pending, []
        for sql, parameters in pending:
            self.db.execute(sql, parameters)
        if self._presence and time.monotonic() >= self._presence_due:
            presence, self._presence = self._presence, {}
            self.db.executemany("INSERT OR REPLACE INTO seen (account, room, position)"
                                " VALUES (?, ?, ?)", [key + (marker,) for key, marker
                                                      in presence.items()])

    def _row(self, room, kept):
        """A room's lines of one turn as one row: (room, the last's position, the lines one
        after the other, each one's size and its text's size, and where the text starts if
        there is one line): a commit writes a row a room, not a row a message (a busy turn's
        cost per message is a tenth)."""
        lines, text_sizes = kept
        if len(lines) == 1:   # (a room at human pace: a row a line)
            line, text_size = lines[0], text_sizes[0]
            return (room, self._positions[room], line, ONE_LINE_SIZES.pack(len(line), text_size),
                    len(line) - text_size if line.isascii() else None)   # (from 1)
        sizes = [0] * (2 * len(lines))    # (interleaved in C: a loop here was an eighth of
        sizes[0::2] = map(len, lines)     # the commit of a busy turn)
        sizes[1::2] = text_sizes
        return (room, self._positions[room], b"".join(lines),
                struct.pack("<%dI" % len(sizes), *sizes), None)

    def _prune(self, room):
        """A room back to about its last ``keep`` messages (rows wholly older go), in the same
        transaction, every twentieth of ``keep``: the file stops growing."""
        position = self._positions[room]
        if position - self._pruned_at.get(room, 0) >= max(self._keep // PRUNE_EVERY, 1):
            self._pruned_at[room] = position
            self.db.execute("DELETE FROM messages WHERE room = ? AND last <= ?",
                            (room, position - self._keep))

    def _rollback(self):
        self._pending.clear()
        self._turn.clear()
        self._journaled_in_transaction = 0   # (in the journal still: written at the next commit)
        self._accounts_read.clear()
        self._lines_read.clear()
        self._waiting_for = None   # (a DELETE of waiting messages may have been dropped)
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except Exception:
            pass

    def _failed(self, exc):
        if not self._failing:
            self._failing = True
            self.log(self._record(Lines.LOG_CANNOT_WRITE.format(path=self.path, error=exc)))

    def _record(self, text):
        return (self.clock.prefix() + text + "\n").encode()

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._checkpointer.stop()   # (first: the last connection to close folds the WAL in)
        self.commit(into_file=True)
        self._end_presence()
        try:
            self.db.close()
        except Exception:
            pass
        if self._journal is not None:   # (kept if its rows are not in: the next start's)
            self._journal.close(remove=not self._journaled)
        os.close(self._lock)   # (the file stays: removing it could let two servers in)

    # -- rooms ----------------------------------------------------------------------------------
    def save_room(self, record):
        MemoryStore.save_room(self, record)
        self._later("INSERT OR REPLACE INTO rooms (key, name, topic, key_hash) VALUES"
                    " (?, ?, ?, ?)", record)

    def drop_room(self, key):
        MemoryStore.drop_room(self, key)
        self._turn.pop(key, None)
        self._pruned_at.pop(key, None)
        for marked in [marked for marked in self._presence if marked[1] == key]:
            del self._presence[marked]
        self._lines_read.clear()   # (a room made again under its name counts from 0 again)
        self._later("DELETE FROM messages WHERE room = ?", (key,))
        self._later("DELETE FROM rooms WHERE key = ?", (key,))
        self._later("DELETE FROM seen WHERE room = ?", (key,))

    # -- messages -------------------------------------------------------------------------------
    def keep(self, room_key, line, text_size):
        position = self._positions.get(room_key)
        if position is None:
            position = self.position(room_key)
        position += 1
        self._positions[room_key] = position
        kept = self._turn.get(room_key)
        if kept is None:
            kept = self._turn[room_key] = ([], [])
        kept[0].append(line)
        kept[1].append(text_size)
        return position

    def _read(self, sql, parameters):
        """Rows of a query that sees this turn's changes too. A file that fails to answer
        (damaged while the server runs) is said once in the log, and answers nothing."""
        rows = self._read_or_none(sql, parameters)
        return [] if rows is None else rows

    def _read_or_none(self, sql, parameters):
        """As _read, but None when the read failed: what is remembered of reads must never be
        a failure taken for an answer (an account taken for none lets anyone in as it)."""
        import sqlite3
        if self._turn or self._pending or len(self._journaled) > self._journaled_in_transaction:
            try:
                self._write_pending()
            except sqlite3.Error as exc:
                self._rollback()   # (the turn's writes failed: none of them is kept)
                self._failed(exc)   # (the read may still work: a writer's lock blocks no read)
        try:
            return self.db.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            self._failed(exc)   # the read alone: what the turn wrote stays, for its commit
            return None

    def _lines(self, room_key, after=0, most=None):
        """The room's kept lines after ``after``, (position, line, text_size), the newest
        ``most`` of them (every one, without), oldest first. Kept: the last ``keep`` (a row
        may hold older ones until it is pruned)."""
        position = self.position(room_key)
        asked = (room_key, after, most)
        read = self._lines_read.get(asked)
        if read is not None and read[0] == position:
            return read[1]
        lines = self._read_lines(room_key, max(after, position - self._keep), most)
        if lines is None:
            return []   # (a failed read: not remembered)
        if len(self._lines_read) >= LINES_READ_MOST:
            self._lines_read.clear()
        self._lines_read[asked] = (position, lines)
        return lines

    def _read_lines(self, room_key, after, most):
        """As _lines, from the file (None: the read failed)."""
        lines = []
        # Each row holds at least one line after ``after`` (its last): ``most`` rows are
        # enough, and only they are read (start-up asks every room for its history: a read of
        # every kept row made it grow with the file, 11 s for 10 million messages).
        rows = self._read_or_none(
            "SELECT last, lines, sizes FROM messages WHERE room = ? AND last > ?"
            " ORDER BY last DESC LIMIT ?", (room_key, after, -1 if most is None else most))
        if rows is None:
            return None
        for last, joined, sizes in rows:
            sizes = struct.unpack("<%dI" % (len(sizes) // 4), sizes)
            batch, end = [], len(joined)
            for index in range(len(sizes) - 2, -1, -2):   # the row's lines, newest first
                start = end - sizes[index]
                batch.append((last, bytes(joined[start:end]), sizes[index + 1]))
                last, end = last - 1, start
            lines += [kept for kept in batch if kept[0] > after]
            if most is not None and len(lines) >= most:
                break
        return lines[:most][::-1] if most is not None else lines[::-1]

    def recent(self, room_key, count):
        return [line for _, line, _ in self._lines(room_key, most=count)] if count else []

    def since(self, room_key, position, count):
        lines = self._lines(room_key, after=position, most=count) if count else []
        return self.position(room_key) - position, [line for _, line, _ in lines]

    def search(self, room_key, folded, count, done):
        """The room's kept lines whose text holds ``folded``. For text that is all ASCII,
        SQLite counts the rows of one line whose text holds it, and hands over only the newest
        ``count`` of them (a word in every one of 10,000 messages read all 10,000 into Python:
        37 ms); of the other rows it passes over, in C, those that can't hold it
        (``_MAY_HOLD``), and the lines of the rest are tested one by one, as the memory store
        tests them."""
        first = self.position(room_key) - self._keep + 1   # (the oldest kept)
        pattern = like_pattern(folded)
        matches, found = 0, []
        if not folded.isascii():
            rows = self._read(self._MAY_HOLD_OTHER, (room_key, first))
        elif len(pattern) <= LIKE_PATTERN_MOST:
            one_line = (room_key, first, pattern)
            counted = self._read(self._COUNT_ONE_LINE, one_line)
            matches = counted[0][0] if counted else 0
            if matches and count:
                found = [(last, bytes(line)) for last, line in
                         self._read(self._NEWEST_ONE_LINE, one_line + (count,))]
            rows = self._read(self._MAY_HOLD_ASCII, (room_key, first, pattern))
        else:   # (longer than SQLite lets a LIKE pattern be: every row, tested here)
            rows = self._read(self._EVERY_ROW, (room_key, first))
        more, lines = self._matching_lines(rows, folded, first)
        found += lines
        found.sort()
        done(matches + more, [line for _, line in found[-count:]] if count else [])

    @staticmethod
    def _matching_lines(rows, folded, first):
        """The lines of ``rows`` from position ``first`` whose text holds ``folded``: how many,
        and (position, line) of each."""
        ascii_text = folded.encode() if folded.isascii() else None
        found = []
        for last, joined, sizes in rows:
            if ascii_text is not None and joined.isascii():
                lowered = joined.lower()
                if ascii_text not in lowered:
                    continue
                if len(sizes) == 8:   # one line (older rows: no text_at)
                    if last >= first and ascii_text in lowered[
                            len(joined) - 1 - ONE_LINE_SIZES.unpack(sizes)[1]:]:
                        found.append((last, bytes(joined)))
                    continue
            sizes = struct.unpack("<%dI" % (len(sizes) // 4), sizes)
            position = last - len(sizes) // 2
            start = 0
            for index in range(0, len(sizes), 2):
                end = start + sizes[index]
                position += 1
                text = joined[end - sizes[index + 1] - 1:end - 1]
                if position >= first and (
                        ascii_text in text.lower() if ascii_text is not None and text.isascii()
                        else folded in text.decode("utf-8", "replace").casefold()):
                    found.append((position, bytes(joined[start:end])))
                start = end
        return len(found), found

    # The rows of a search that may hold the text, chosen in C (a search read 10,000 rows into
    # Python to find none: 16 ms). Casefolding can turn a character that is not ASCII into
    # ASCII (the Kelvin sign into k, the long s into s, a ligature into ff), never ASCII into anything
    # else: text that is all ASCII is in an all-ASCII row only if LIKE (ASCII case-insensitive,
    # its wildcards escaped) finds it in the row, and text that is not ASCII is in no
    # all-ASCII row. A row is all ASCII when its characters are as many as its bytes (length()
    # counts characters of text, bytes of a blob; text with a NUL counts short: not ASCII, kept).
    # A row with a text_at (one line, all ASCII) holds the text if LIKE finds it from there:
    # such rows are counted, and the newest read, apart (_ONE_LINE); the others are read.
    _NOT_ALL_ASCII = "length(CAST(lines AS TEXT)) < length(lines)"
    _ONE_LINE = ("room = ? AND last >= ? AND text_at IS NOT NULL AND"
                 " CAST(substr(lines, text_at) AS TEXT) LIKE ? ESCAPE '\\'")
    _COUNT_ONE_LINE = "SELECT count(*) FROM messages WHERE " + _ONE_LINE
    _NEWEST_ONE_LINE = ("SELECT last, lines FROM messages WHERE %s ORDER BY last DESC LIMIT ?"
                        % _ONE_LINE)
    _MAY_HOLD_ASCII = ("SELECT last, lines, sizes FROM messages WHERE room = ? AND last >= ? AND"
                       " text_at IS NULL AND (CAST(lines AS TEXT) LIKE ? ESCAPE '\\' OR %s)"
                       " ORDER BY last" % _NOT_ALL_ASCII)
    _EVERY_ROW = ("SELECT last, lines, sizes FROM messages WHERE room = ? AND last >= ?"
                  " ORDER BY last")
    _MAY_HOLD_OTHER = ("SELECT last, lines, sizes FROM messages WHERE room = ? AND last >= ? AND"
                       " text_at IS NULL AND %s ORDER BY last" % _NOT_ALL_ASCII)

    def position(self, room_key):
        position = self._positions.get(room_key)
        if position is None:
            rows = self._read_or_none("SELECT coalesce(max(last), 0) FROM messages"
                                      " WHERE room = ?", (room_key,))
            if rows is None:
                return 0   # (not remembered: new lines numbered from 0 would clash with kept ones)
            position = self._positions[room_key] = rows[0][0] if rows else 0
        return position

    def has_messages(self, room_key):
        return self.position(room_key) > 0

    # -- accounts -------------------------------------------------------------------------------
    def account_for(self, keys, unreadable=None):
        for key in keys:
            account = self._account_by_key(key)
            if account is UNREADABLE:
                return unreadable
            if account is not None:
                return account
        return None

    def _account_by_key(self, key):
        read = self._accounts_read
        if key in read:
            return read[key]
        rows = self._read_or_none(
            "SELECT accounts.key, nick, password_hash, tokens FROM account_keys JOIN accounts"
            " ON accounts.key = account_keys.account WHERE account_keys.key = ?", (key,))
        if rows is None:
            return UNREADABLE   # (not remembered: the next asks the file again)
        account = None
        if rows:
            owner, nick, password_hash, tokens = rows[0]
            account = Account(owner, nick, password_hash, tuple(tokens.split()))
        if len(read) >= ACCOUNTS_READ_MOST:
            read.clear()   # (bounded: a crowd trying names can't grow it)
        read[key] = account
        return account

    def save_tokens(self, key, tokens):
        self._accounts_read.clear()
        self._later("UPDATE accounts SET tokens = ? WHERE key = ?", (" ".join(tokens), key))

    def save_account(self, account, keys):
        self._accounts_read.clear()
        self._later("INSERT OR REPLACE INTO accounts (key, nick, password_hash, tokens) VALUES"
                    " (?, ?, ?, ?)", account[:3] + (" ".join(account.tokens),))
        for key in keys:
            self._later("INSERT OR REPLACE INTO account_keys (key, account) VALUES (?, ?)",
                        (key, account.key))

    def drop_account(self, key):
        self._accounts_read.clear()
        for marked in [marked for marked in self._presence if marked[0] == key]:
            del self._presence[marked]
        for table, column in (("accounts", "key"), ("account_keys", "account"),
                              ("seen", "account"), ("waiting", "account")):
            self._later("DELETE FROM %s WHERE %s = ?" % (table, column), (key,))

    def seen(self, account_key, room_key):
        rows = self._read("SELECT position FROM seen WHERE account = ? AND room = ?",
                          (account_key, room_key))
        if not rows:
            return None
        position = rows[0][0]
        return position if position >= 0 else -1 - position   # (a marker: see present())

    def save_seen(self, account_key, room_key, position):
        self._presence.pop((account_key, room_key), None)
        self._later("INSERT OR REPLACE INTO seen (account, room, position) VALUES (?, ?, ?)",
                    (account_key, room_key, position))

    def present(self, account_key, room_key, position):
        """In the room from ``position`` on: -1 - position, until its leave saves where it
        got to (a crash saves none: the next start makes the most of the marker). Written
        PRESENCE_DELAY seconds later, all at once: a join storm does not wait for them (a
        crash before then repeats that member's catch-up since its last leave, as without)."""
        if not self._presence:
            self._presence_due = time.monotonic() + PRESENCE_DELAY
        self._presence[account_key, room_key] = -1 - position

    def _may_wait(self, account_key):
        return self._waiting_for is None or account_key in self._waiting_for

    def waiting_count(self, account_key):
        if not self._may_wait(account_key):
            return 0
        rows = self._read("SELECT count(*) FROM waiting WHERE account = ?", (account_key,))
        return rows[0][0] if rows else 0

    def wait(self, account_key, line, most):
        if self.waiting_count(account_key) >= most:
            return False
        self._later("INSERT INTO waiting (account, line) VALUES (?, ?)", (account_key, line))
        if self._waiting_for is not None:
            self._waiting_for.add(account_key)
        return True

    def take_waiting(self, account_key):
        if not self._may_wait(account_key):
            return []
        rows = self._read_or_none("SELECT line FROM waiting WHERE account = ? ORDER BY id",
                                  (account_key,))
        if rows is None:
            return []   # (a failed read: they still wait, for the next join)
        if self._waiting_for is not None:
            self._waiting_for.discard(account_key)
        if rows:
            self._later("DELETE FROM waiting WHERE account = ?", (account_key,))
        return [bytes(line) for line, in rows]

    # -- moderation -----------------------------------------------------------------------------
    def save_operator(self, key, nick):
        MemoryStore.save_operator(self, key, nick)
        self._later("INSERT OR REPLACE INTO operators (key, nick) VALUES (?, ?)", (key, nick))

    def drop_operator(self, key):
        MemoryStore.drop_operator(self, key)
        self._later("DELETE FROM operators WHERE key = ?", (key,))

    def save_ban(self, ban):
        MemoryStore.save_ban(self, ban)
        self._later("DELETE FROM bans WHERE kind = ? AND value = ?", ban[:2])
        self._later("INSERT INTO bans (kind, value, shown, until, reason) VALUES"
                    " (?, ?, ?, ?, ?)", ban)

    def drop_ban(self, kind, value):
        MemoryStore.drop_ban(self, kind, value)
        self._later("DELETE FROM bans WHERE kind = ? AND value = ?", (kind, value))

    def save_mute(self, mute):
        MemoryStore.save_mute(self, mute)
        self._later("INSERT OR REPLACE INTO mutes (key, nick, until) VALUES (?, ?, ?)", mute)

    def drop_mute(self, key):
        MemoryStore.drop_mute(self, key)
        self._later("DELETE FROM mutes WHERE key = ?", (key,))


ONE_LINE_SIZES = struct.Struct("<II")   # a kept row of one line: its size, its text's size


def like_pattern(text):
    """A LIKE pattern (ESCAPE '\\') that finds ``text`` anywhere, every character literal."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def text_of_line(line, text_at):
    """A kept line's message text, as searches compare it (casefolded)."""
    return bytes(line[text_at:-1]).decode("utf-8", "replace").casefold()


# The schema, one step per version (PRAGMA user_version): a file of any older version is brought
# up to the newest when it is opened, and never back.
MIGRATIONS = (
    (   # 1: rooms and their messages
        "CREATE TABLE rooms (key TEXT PRIMARY KEY, name TEXT NOT NULL, topic TEXT,"
        " key_hash TEXT)",
        # A row holds a room's lines of one commit: ``last`` is the last one's position (the
        # room's count of messages), ``sizes`` each line's size and its text's, 4 bytes each.
        "CREATE TABLE messages (room TEXT NOT NULL, last INTEGER NOT NULL, lines BLOB NOT NULL,"
        " sizes BLOB NOT NULL, PRIMARY KEY (room, last)) WITHOUT ROWID",
    ),
    (   # 2: accounts, where each left each room, private messages waiting for them
        "CREATE TABLE accounts (key TEXT PRIMARY KEY, nick TEXT NOT NULL,"
        " password_hash TEXT NOT NULL)",
        "CREATE TABLE account_keys (key TEXT PRIMARY KEY, account TEXT NOT NULL)",
        "CREATE INDEX account_keys_by_account ON account_keys (account)",
        "CREATE TABLE seen (account TEXT NOT NULL, room TEXT NOT NULL, position INTEGER NOT NULL,"
        " PRIMARY KEY (account, room))",
        "CREATE INDEX seen_by_room ON seen (room)",
        "CREATE TABLE waiting (id INTEGER PRIMARY KEY, account TEXT NOT NULL, line BLOB NOT NULL)",
        "CREATE INDEX waiting_by_account ON waiting (account, id)",
    ),
    (   # 3: moderation
        "CREATE TABLE operators (key TEXT PRIMARY KEY, nick TEXT NOT NULL)",
        "CREATE TABLE bans (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL,"
        " shown TEXT NOT NULL, until REAL, reason TEXT, UNIQUE (kind, value))",
        "CREATE TABLE mutes (key TEXT PRIMARY KEY, nick TEXT NOT NULL, until REAL)",
    ),
    (   # 4: where the text of a row of one line, all ASCII, starts (from 1), so that /search
        # counts such rows that hold a text in SQLite, without reading them (NULL: any other)
        "ALTER TABLE messages ADD COLUMN text_at INTEGER",
    ),
    (   # 5: each account's login tokens, as their SHA-256 digests (hex), oldest first, spaced
        "ALTER TABLE accounts ADD COLUMN tokens TEXT NOT NULL DEFAULT ''",
    ),
    (   # 6: the generation of the last "-lines" journal the file has the lines of (TurnJournal)
        "CREATE TABLE journal (generation INTEGER NOT NULL)",
        "INSERT INTO journal (generation) VALUES (0)",
    ),
)


def hold_lock_file(path):
    """Lock ``path`` (created 0600 if need be) for this process while it runs, and return its
    descriptor; DataFileError if another process holds it. The OS lets go when the process
    ends, however it ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | BINARY, 0o600)
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DataFileError("%s is in use by another server" % path[:-len("-lock")])
    return fd


def create_private(path):
    """Create ``path``, empty, readable by its owner only (0600 on POSIX), unless it exists.
    SQLite gives the files it keeps beside a database (its -wal) the database's own mode."""
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | BINARY, 0o600))


# =============================================================================================
# The loop: sockets in, the room core in the middle, sockets out. One thread, one selector. Its
# parts follow a connection's life: the turn (Loop), accepting, the TLS handshake, reading and
# lines, writing, closing, timers, and stopping; Server is all of them together.
# =============================================================================================

class Deadlines:
    """Connections that must be done with something within a fixed time (joining, closing,
    lingering). All of one kind have the same length, so they come due in the order they were
    set: an ordered dict, which a connection leaves as soon as the deadline no longer applies
    (a heap entry would keep a closed connection, and what it held, until it came due)."""

    def __init__(self, seconds, expired):
        self.seconds = seconds
        self.expired = expired   # called with each connection whose time has come
        self._due = collections.OrderedDict()   # connection -> when

    def __len__(self):
        return len(self._due)

    def add(self, conn, now):
        self._due[conn] = now + self.seconds

    def discard(self, conn):
        self._due.pop(conn, None)

    def next_due(self):
        return next(iter(self._due.values())) if self._due else float("inf")

    def take_due(self, now):
        """The connections whose time has come, removed, earliest first."""
        due = []
        while self._due:
            conn, when = next(iter(self._due.items()))
            if when > now:
                break
            del self._due[conn]
            due.append(conn)
        return due

    def clear(self):
        self._due.clear()


class SelectorPoller:
    """What the loop asks of its selector: register a socket for EVENT_READ and EVENT_WRITE with
    its data, and ``poll()`` -> [(data, events)], where the bits ``readable`` and ``writable`` of
    events say which. This one is the selectors module's (select on Windows, kqueue on macOS)."""

    readable, writable = EVENT_READ, EVENT_WRITE

    def __init__(self, selector):
        self.selector = selector

    def register(self, sock, events, data):
        self.selector.register(sock, events, data)

    def modify(self, sock, events, data):
        self.selector.modify(sock, events, data)

    def unregister(self, sock):
        self.selector.unregister(sock)

    def poll(self, timeout):
        return [(key.data, events) for key, events in self.selector.select(timeout)]

    def close(self):
        self.selector.close()


class EpollPoller:
    """Linux: select.epoll itself. The selectors module looks up a key and rebuilds the event
    mask for every event, which is a measurable share of a busy small room's time; here an event
    is one dict lookup. Errors and hang-ups count as readable and writable, as in selectors."""

    readable = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") \
        else 0
    writable = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") \
        else 0

    def __init__(self):
        self._epoll = select.epoll()
        self._data = {}   # descriptor -> the data it was registered with

    @staticmethod
    def _bits(events):
        return ((select.EPOLLIN if events & EVENT_READ else 0)
                | (select.EPOLLOUT if events & EVENT_WRITE else 0))

    def register(self, sock, events, data):
        fd = sock.fileno()
        self._epoll.register(fd, self._bits(events))
        self._data[fd] = data

    def modify(self, sock, events, data):
        fd = sock.fileno()
        self._epoll.modify(fd, self._bits(events))
        self._data[fd] = data

    def unregister(self, sock):
        fd = sock.fileno()
        self._epoll.unregister(fd)
        del self._data[fd]

    def poll(self, timeout):
        if timeout is None:
            timeout = -1
        elif timeout > 0:
            timeout = math.ceil(timeout * 1e3) * 1e-3  # (as selectors: never a busy 0 ms wait)
        data = self._data
        return [(data[fd], events)
                for fd, events in self._epoll.poll(timeout, max(len(data), 1))]

    def close(self):
        self._epoll.close()


def make_poller(selector=None):
    """epoll where there is one (and the Windows paths are not being forced), else selectors'."""
    if selector is None and hasattr(select, "epoll") and platform_name() != "windows":
        return EpollPoller()
    if selector is None:
        selector = (selectors.SelectSelector() if platform_name() == "windows"
                    else selectors.DefaultSelector())
    return SelectorPoller(selector)


class Hold:
    """Why a connection's input is not being read now: the bits of ``Conn.holds``. Any bit set
    means paused; none, and its input is read as it comes."""
    RATE = 1          # it sent faster than the flood limit: until its timer says it may again
    HIGH_WATER = 2    # its own output queue is above high water: until it drains to low water
    ANSWER = 4        # the room awaits an answer for it (a password being checked): until then
    PAUSED = 8        # a cluster's node can't reach Redis: a member's lines wait until it can


class Conn:
    """One connection as the loop sees it: its socket, its phase, and the conditions that decide
    whether it is read or written. The room's side of it is ``peer``."""
    __slots__ = ("sock", "peer", "phase", "tls", "inbuf", "mask", "tokens", "stamp", "refusal",
                 "holds", "write_blocked", "tls_retry", "input_ended", "skipping_long_line",
                 "in_backlog", "hello_seen")

    def __init__(self, sock, peer, tls=False, burst=float("inf")):
        self.sock = sock
        self.peer = peer
        self.phase = Phase.NEW
        self.tls = tls
        self.inbuf = b""          # received bytes not yet handled as lines
        self.mask = 0             # the events the selector watches for this socket now
        self.tokens = burst       # flood control: lines it may send before the clock is read
        self.stamp = 0.0          # when tokens were last topped up (at first: when it arrived)
        self.refusal = None       # the line it gets once its TLS handshake is done (full)
        # The conditions, independent of the phase:
        self.holds = 0                  # Hold bits: why its input is paused (0: it is not)
        self.write_blocked = False      # the kernel's send buffer is full: wait for EVENT_WRITE
        self.tls_retry = False          # a TLS write must be retried with the same bytes
        self.input_ended = False        # the peer will send no more
        self.skipping_long_line = False  # dropping the rest of an over-long line, up to its \n
        self.in_backlog = False         # listed in Server.backlog (complete lines wait)
        self.hello_seen = False         # TLS: the client's first byte opens a TLS handshake

    def __repr__(self):
        return "<Conn %s %s nick=%r queued=%d>" % (self.phase, self.peer.address, self.peer.nick,
                                                   self.peer.queued_bytes())


class Loop:
    """The turn: wait for events, handle them, run what is due, then write what the turn queued
    (Redis's beforeSleep). Its state is set up in Server.__init__."""

    def serve_forever(self):
        while not self.stopping:
            self.run_once()
        self.shutdown()

    def run_once(self, timeout=None):
        """One loop turn: wait for events, handle them, then write what the turn queued."""
        self._handle_events(self.poller.poll(self._next_wait(timeout)))
        # Input that arrived meanwhile joins this turn's writes: one send per recipient carries
        # more lines (the writes of a turn cost the same however many lines they carry).
        more = self.poller.poll(0)
        if more:
            self._handle_events(more)
        if self.tls_buffered:  # (decrypted already, so select() never reports it)
            self._read_tls_buffered()
        self._handle_backlog()
        self._run_timers()
        self.store.commit()    # before any reply: nothing is acknowledged that is not kept
        if self.cluster is not None:
            # The turn's appends to Redis, before the members' writes; the node waits (briefly)
            # for them to come back through the log and applies them, so that the writes below
            # carry them (nothing is acknowledged before its entry comes back).
            self.cluster.flush()
        self.log.flush()       # then what a client has seen is logged already (the entries
        self._flush_pending()  # just applied included)
        self.log.flush()       # (what the writes caused: a reader cut off at its send queue)
        if self.cluster is not None:
            self.cluster.flush()   # (and its leave: a no-op when the writes caused nothing)

    def _handle_events(self, ready):
        if not ready:
            return  # a timer's time came, or a signal
        readable, writable = self.poller.readable, self.poller.writable
        # Each connection read now handles its share of the turn's lines at once (the rest
        # waits in the backlog), so one turn never queues unbounded output before a flush.
        self._share = max(1, LINES_PER_TURN // len(ready))
        for conn, events in ready:
            if conn.__class__ is not Conn:
                if conn == "accept":
                    self._accept()
                elif conn == "wakeup":
                    self._drain_wakeup()
                else:
                    self._watched_event(conn, events & readable, events & writable)
                continue
            if conn.phase is CLOSED:
                continue  # closed by an earlier event of this turn
            try:
                if events & writable:
                    self._on_writable(conn)
                if events & readable and conn.phase is not CLOSED:
                    self._on_readable(conn)
            except Exception:
                self._fail(conn)

    def _next_wait(self, timeout):
        if self.backlog or self.tls_buffered:
            return 0
        wait = timeout
        first = min([self.timers[0][0] if self.timers else float("inf"),
                     self.store.next_due()]
                    + [deadlines.next_due() for deadlines in self.deadlines])
        if first != float("inf"):
            until = min(max(first - time.monotonic(), 0), MAX_WAIT)
            wait = until if wait is None else min(wait, until)
        return wait

    def _move(self, conn, phase):
        """The one place a connection's phase changes, along PHASE_MOVES only."""
        if phase not in PHASE_MOVES[conn.phase]:
            raise RuntimeError("%r cannot move to %s" % (conn, phase))
        conn.phase = phase

    def _enter(self, conn, phase):
        """Move ``conn`` to the phase the room decided (None: stay)."""
        if phase is None or phase is conn.phase:
            return
        if phase is Phase.CLOSING:
            self._close_after_flush(conn)
            return
        self._move(conn, phase)
        if phase is MEMBER:
            self.joining.discard(conn)  # joined: its join deadline no longer matters

    def _room_moved(self, peer, phase):
        """The room moved a connection on its own: an answer that took a while (a password
        checked), or one member's doing that ends another's connection."""
        conn = peer.owner
        if conn is not None and conn.phase is not CLOSED:
            self._enter(conn, phase)

    def _room_holds(self, peer, held):
        """The room awaits an answer for this connection: its input waits (``held``), or goes
        on, its lines that came meanwhile first."""
        conn = peer.owner
        if conn is None or conn.phase is CLOSED:
            return
        if held:
            conn.holds |= Hold.ANSWER
        else:
            conn.holds &= ~Hold.ANSWER
            if conn.phase in TALKING:
                self._queue_lines(conn)
        self._set_interest(conn)

    def _fail(self, conn):
        """An unexpected error while handling ``conn``: it alone is closed, the loop goes on.

        It leaves the room at once and its input is no longer handled, but the lines already
        queued for it are still written (CLOSING); a second error while closing closes it now."""
        sys.stderr.write("chat_server: error on %r, closing it:\n" % (conn,))
        print_traceback()
        sys.stderr.flush()
        try:
            if conn.phase is CLOSED:
                self._forget(conn)  # the error was in closing it: let go of it by force
            elif conn.phase in (Phase.CLOSING, Phase.LINGERING):
                self._close(conn, Reason.ERROR)
            else:
                self.chat.failed(conn.peer)
                self._close_after_flush(conn)
        except Exception:
            print_traceback()
            self._forget(conn)


class Accepting:
    """A newcomer: the listening socket, accepting without starving the members, admitting."""

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
            self.poller.register(sock, EVENT_READ, "accept")
            self._install_wakeup()
            return sock.getsockname()[:2]
        raise error

    def _install_wakeup(self):
        """A socket pair the C signal handler writes to, so a signal wakes select() at once."""
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        for sock in (self._wakeup_r, self._wakeup_w):
            sock.setblocking(False)
        self.poller.register(self._wakeup_r, EVENT_READ, "wakeup")

    def _drain_wakeup(self):
        try:
            while self._wakeup_r.recv(512):
                pass
        except OSError:
            pass
        self.hashing.finish()   # (a signal, or the password worker's results)

    def _wake(self):
        """From another thread: wake the loop (its wakeup socket, as a signal does)."""
        try:
            self._wakeup_w.send(b"w")
        except OSError:
            pass   # full: it is awake already

    def _accept(self):
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting()
                return  # ECONNABORTED and the like: that one connection is gone
            try:
                self._admit(sock, address)
            except Exception:
                print_traceback()
                sock.close()

    def _pause_accepting(self):
        """Out of descriptors: the pending connection stays in the backlog. Stop watching the
        listener (it would report readable forever) until a descriptor frees up or a while."""
        if not self.accept_paused:
            self.accept_paused = True
            self.poller.unregister(self.listener)
            self.after(EMFILE_PAUSE, self._resume_accepting, None)

    def _resume_accepting(self, _):
        if self.accept_paused and self.listener is not None:
            self.accept_paused = False
            self.poller.register(self.listener, EVENT_READ, "accept")

    def _admit(self, sock, address):
        sock.setblocking(False)
        tune_socket(sock, self.dead_peer)
        peer = Peer(format_address(address[0], address[1]) if isinstance(address, tuple)
                    else str(address))
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        conn = Conn(sock, peer, tls=self.tls is not None, burst=self.rate_burst)
        conn.stamp = time.monotonic()
        peer.owner = conn
        if self.cluster is not None:
            self.cluster.admitted(peer)
        self.conns[sock] = conn
        self._churned()
        if len(self.conns) > self.max_clients:
            conn.refusal = Lines.FULL  # told at once, or after its TLS handshake
        if self.join_timeout:
            self.joining.add(conn, conn.stamp)
        if conn.tls:
            self._move(conn, Phase.HANDSHAKE)
            self._set_interest(conn)  # the handshake starts when the client's hello arrives
        else:
            self._open(conn)

    def _open(self, conn):
        """Transport ready (TCP accepted, or TLS handshake done): the room greets it, or tells
        it why not (a full chat, which a TLS client can only be told after its handshake)."""
        if conn.refusal:
            self._enter(conn, self.chat.refuse(conn.peer, conn.refusal))
            return
        self._enter(conn, self.chat.greet(conn.peer))
        self._set_interest(conn)


class Handshaking:
    """TLS: the handshake, never blocking the loop; a plain-text client told what to do."""

    def _handshake(self, conn):
        if not conn.hello_seen:
            first = self._peek(conn)
            if first is None:
                return            # (woken for nothing)
            if first != TLS_HANDSHAKE_RECORD:
                self._refuse_plain_text(conn, first)
                return
            conn.hello_seen = True
        try:
            conn.sock.do_handshake()
        except TLS_WANTS_READ:
            conn.write_blocked = False
        except TLS_WANTS_WRITE:
            conn.write_blocked = True
        except (OSError, ValueError) as exc:
            # Not TLS (a plain-text client) or gone. Nothing can be said to it, but the operator
            # is told of the first: "why can't my friend connect?"
            if isinstance(exc, ssl.SSLError):
                self.chat.closed_before_joining(conn.peer, Reason.NOT_TLS)
            self._close(conn, Reason.CLOSED)
            return
        else:
            conn.write_blocked = False
            self._open(conn)
            if conn.sock.pending():
                self.tls_buffered.append(conn)
            return
        self._set_interest(conn)

    @staticmethod
    def _peek(conn):
        """The first byte the client sent, left in the kernel for OpenSSL to read (b"" at its
        end, None if nothing came). The plain socket's recv: TLS has not begun."""
        try:
            return socket.socket.recv(conn.sock, 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _refuse_plain_text(self, conn, first):
        """A client that speaks first and not TLS (nc, telnet, a chat client without --tls):
        told so in plain text, since it could read nothing else, and closed."""
        conn.tls = False   # what follows is plain TCP: no close_notify
        if first:
            try:
                socket.socket.send(conn.sock, (Lines.TLS_HINT + "\n").encode())
            except OSError:
                pass
            self.chat.closed_before_joining(conn.peer, Reason.NOT_TLS)
        self._close_after_flush(conn)


class Reading:
    """Input: reading, framing lines, the line limit, flood control, and a fair share of each
    turn for every connection with lines to handle."""

    def _on_readable(self, conn):
        if conn.phase is HANDSHAKE:
            self._handshake(conn)
        else:
            self._read(conn)

    def _read(self, conn):
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError, TLS_WANTS_READ):
            return
        except TLS_WANTS_WRITE:
            # TLS must write before it can read on (a renegotiation): wait until it can.
            conn.write_blocked = True
            self._set_interest(conn)
            return
        except OSError as exc:
            self._close(conn, reason_for(exc))
            return
        if data:
            if conn.tls:
                data = self._read_tls_rest(conn, data)
                if conn.tls_retry and not conn.write_blocked:
                    self._keep_before_writing()
                    self._send(conn)  # a write that waited for this read (see _send)
        else:
            conn.input_ended = True
        phase = conn.phase
        if phase is LINGERING or phase is CLOSING:
            # Being closed: its input no longer matters, only that our last lines get out.
            if conn.input_ended and (phase is LINGERING or not conn.peer.has_output()):
                self._close(conn, Reason.CLOSED)
            else:
                self._set_interest(conn)
            return
        if data:
            conn.inbuf = conn.inbuf + data if conn.inbuf else data
        if conn.in_backlog or conn.holds:
            # Lines of its own wait already (handled in order after this turn's reads), or it
            # is paused: the new input waits with them.
            if conn.input_ended or len(conn.inbuf) >= self.input_limit:
                self._set_interest(conn)
            return
        self._take_turn(conn, self._share)

    def _read_tls_rest(self, conn, data):
        """What the TLS layer already decrypted is invisible to select(): take it now, up to the
        read size; if more is left, come back for it next turn without waiting for select."""
        sock = conn.sock
        chunks = [data]
        size = len(data)
        while size < READ_SIZE and sock.pending():
            try:
                chunk = sock.recv(READ_SIZE - size)
            except (TLS_WANTS_READ, TLS_WANTS_WRITE):
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if sock.pending():
            self.tls_buffered.append(conn)
        return b"".join(chunks) if len(chunks) > 1 else data

    def _read_tls_buffered(self):
        """Read the TLS connections holding decrypted input. One that is not being read now
        (paused) is dropped from the list: _set_interest lists it again when reading resumes."""
        waiting, self.tls_buffered = self.tls_buffered, []
        for conn in waiting:
            if conn.mask & EVENT_READ and conn.phase is not CLOSED:
                try:
                    self._on_readable(conn)
                except Exception:
                    self._fail(conn)

    def _queue_lines(self, conn):
        """Give ``conn``'s input a turn: its complete lines, an over-long tail, its end."""
        if not conn.in_backlog:
            conn.in_backlog = True
            self.backlog.append(conn)

    def _handle_backlog(self):
        """Handle queued lines, at most about LINES_PER_TURN in all, shared fairly; what is left
        waits for the next turn, so one turn never queues unbounded output before a flush."""
        if not self.backlog:
            return
        ready, self.backlog = self.backlog, []
        share = max(1, LINES_PER_TURN // len(ready))
        for conn in ready:
            conn.in_backlog = False
            if conn.phase not in TALKING or conn.holds:
                continue
            try:
                self._take_turn(conn, share)
            except Exception:
                self._fail(conn)

    def _take_turn(self, conn, share):
        """Handle up to ``share`` of conn's complete lines now; what is left waits in the
        backlog for the next turn. At the end of its input, it leaves."""
        more = self._handle_lines(conn, share)
        if conn.phase not in TALKING:
            return
        if more:
            if not (conn.holds or conn.in_backlog):
                conn.in_backlog = True
                self.backlog.append(conn)
        elif conn.input_ended:
            self.chat.leave(conn.peer, Reason.CLOSED)
            self._close_after_flush(conn)
            return
        if conn.mask != EVENT_READ or conn.holds or conn.input_ended or \
                len(conn.inbuf) >= self.input_limit:
            self._set_interest(conn)  # something changed; else reading simply goes on

    def _handle_lines(self, conn, most):
        """Handle up to ``most`` complete lines of conn's input, as far as the flood limit and
        its own output queue allow. True if complete lines remain."""
        parts = conn.inbuf.split(b"\n", most)
        rest = parts.pop()
        over_rate = False
        if len(parts) > conn.tokens:   # the one comparison flood control costs while not hit
            allowed = self._top_up(conn)
            if len(parts) > allowed:
                rest = b"\n".join(parts[allowed:] + [rest])
                del parts[allowed:]
                over_rate = True
        peer = conn.peer
        current = conn.phase
        handle = self._line_handlers[current]
        limit = self.max_line_bytes
        handled = 0
        for line in parts:
            handled += 1
            if conn.skipping_long_line:   # the tail of a line already answered as too long
                conn.skipping_long_line = False
                continue
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > limit:
                self.chat.line_too_long(peer, limit)
                continue
            phase = handle(peer, line)
            if phase is not None:
                self._enter(conn, phase)
            if conn.phase is not current:   # (the answer, or an answer given at once)
                if conn.phase not in TALKING:
                    conn.tokens -= handled
                    conn.inbuf = b""
                    return False
                current = conn.phase
                handle = self._line_handlers[current]
            if conn.holds or ((conn.write_blocked or len(peer.out) > self._throttle_items)
                              and peer.above(self.high_water, self.chat.fanned)):
                if not conn.holds:
                    conn.holds |= Hold.HIGH_WATER
                rest = b"\n".join(parts[handled:] + [rest])   # (an answer is awaited)
                break
        conn.tokens -= handled
        more = b"\n" in rest
        if not more and len(rest) > limit + 1:  # +1: the \r of a \r\n still on its way
            if not conn.skipping_long_line:
                self.chat.line_too_long(peer, limit)
                conn.tokens -= 1
                conn.skipping_long_line = True
            rest = b""
        conn.inbuf = rest
        if over_rate:
            self._wait_for_rate(conn)
        return more

    def _top_up(self, conn):
        """Flood control's arithmetic, done only near the limit: the tokens earned since the
        last top-up, at most a burst. Returns the whole lines allowed now."""
        now = time.monotonic()
        conn.tokens = min(self.rate_burst, conn.tokens + (now - conn.stamp) * self.rate_limit)
        conn.stamp = now
        return max(int(conn.tokens), 0)

    def _wait_for_rate(self, conn):
        """Over the limit: stop reading until the next line is allowed (TCP holds the rest);
        a timer, not polling, so a flooder that waits costs nothing."""
        conn.holds |= Hold.RATE
        self.after(max(1.0 - conn.tokens, 0.0) / self.rate_limit, self._rate_allows, conn)

    def _rate_allows(self, conn):
        conn.holds &= ~Hold.RATE
        if conn.phase in TALKING:
            self._queue_lines(conn)
            self._set_interest(conn)


class Writing:
    """Output: every connection with new output written once per turn, the kernel's full buffers
    waited out, readers that stopped reading paused and then cut off."""

    def _flush_pending(self):
        """Write every connection that has new output: one send each (flush-before-sleep).

        A connection whose kernel buffer is full waits for EVENT_WRITE instead; one whose queue
        passed the send-queue limit is disconnected (which may queue more output: loop)."""
        while True:
            batch = self.chat.take_pending()
            if not batch:
                return
            for peer in batch:
                conn = peer.owner
                if conn is None or conn.phase is CLOSED:
                    continue
                try:
                    if not conn.write_blocked:
                        self._send(conn)
                        if not peer.out and conn.mask == EVENT_READ and \
                                conn.phase in TALKING and not conn.holds & Hold.HIGH_WATER:
                            continue  # all written and nothing changes: the common case
                    self._after_send(conn)
                except Exception:
                    self._fail(conn)

    def _on_writable(self, conn):
        if conn.phase is Phase.HANDSHAKE:
            self._handshake(conn)
            return
        self._keep_before_writing()
        conn.peer.take_room_lines()   # (what its room said so far this turn: this write has it)
        self._send(conn)
        if conn.phase is not Phase.CLOSED:
            self._after_send(conn)

    def _keep_before_writing(self):
        """A write in the middle of a turn (a connection that can take more now, a TLS write
        that waited for a read) may carry this turn's lines: what they say is committed first,
        as at the turn's end, so that nothing is acknowledged before it is kept."""
        if self.store.has_changes():
            self.store.commit()
        self.log.flush()   # (and what a client sees is logged already)

    def _send(self, conn):
        peer = conn.peer
        if not peer.out:
            return
        data = peer.out[0] if conn.tls_retry else peer.output()  # (held by hold())
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (TLS_WANTS_WRITE, TLS_WANTS_READ) as wants:
            if not conn.tls_retry:
                peer.hold(data)    # OpenSSL wants this very buffer again
                conn.tls_retry = True
            # Retried when the socket is writable, or (TLS must read first, a renegotiation)
            # after the next read, which _read then follows with the write.
            conn.write_blocked = isinstance(wants, TLS_WANTS_WRITE)
            return
        except OSError as exc:
            self._close(conn, reason_for(exc))
            return
        conn.tls_retry = False
        peer.sent(data, sent)
        conn.write_blocked = bool(peer.out)

    def _after_send(self, conn):
        if conn.phase is Phase.CLOSED:
            return
        peer = conn.peer
        if peer.queued_bytes() > self.max_send_queue:
            self._close(conn, Reason.SEND_QUEUE_FULL)  # a reader that stopped reading
            return
        if conn.holds & Hold.HIGH_WATER and peer.queued_bytes() <= self.low_water:
            conn.holds &= ~Hold.HIGH_WATER
            if conn.phase in TALKING:
                self._queue_lines(conn)
        if conn.phase is Phase.CLOSING and not peer.has_output():
            self._start_lingering(conn)
        self._set_interest(conn)

    def _set_interest(self, conn):
        """Tell the selector what this connection waits for now; no syscall when unchanged."""
        phase = conn.phase
        if phase is Phase.CLOSED:
            return
        mask = 0
        if phase is Phase.LINGERING or phase is Phase.HANDSHAKE or (
                phase in TALKING and not (conn.input_ended or conn.holds or self.stopping)
                and len(conn.inbuf) < self.input_limit):
            mask |= EVENT_READ
            if conn.tls and not conn.mask & EVENT_READ and phase in TALKING \
                    and conn.sock.pending():
                self.tls_buffered.append(conn)  # reading resumes: what TLS holds comes first
        if conn.write_blocked:
            mask |= EVENT_WRITE
        if mask == conn.mask:
            return
        if conn.mask == 0:
            self.poller.register(conn.sock, mask, conn)
        elif mask == 0:
            self.poller.unregister(conn.sock)
        else:
            self.poller.modify(conn.sock, mask, conn)
        conn.mask = mask


class Closing:
    """The end of a connection: its last lines written, FIN, a short linger, then close, with
    everything it held let go of at once."""

    def _close_after_flush(self, conn):
        """CLOSING: no more input is handled; close once the queued lines are written."""
        if conn.phase in (Phase.CLOSING, Phase.LINGERING, Phase.CLOSED):
            return
        self._move(conn, Phase.CLOSING)
        if not conn.peer.has_output():
            self._start_lingering(conn)
        else:
            self.closing.add(conn, time.monotonic())
            self._set_interest(conn)

    def _start_lingering(self, conn):
        """LINGERING: all output written: send FIN, then read until the peer closes (or a short
        while), so that close() does not answer unread input with a RST that could destroy our
        last lines."""
        self._move(conn, Phase.LINGERING)
        self.closing.discard(conn)
        try:
            if conn.tls:
                self._send_close_notify(conn)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn, Reason.CLOSED)
            return
        if conn.input_ended:
            self._close(conn, Reason.CLOSED)
            return
        self.lingering.add(conn, time.monotonic())
        self._set_interest(conn)

    @staticmethod
    def _send_close_notify(conn):
        """TLS's own end of the conversation; the peer's answer is not waited for."""
        try:
            conn.sock.unwrap()
        except (TLS_WANTS_READ, TLS_WANTS_WRITE, OSError, ValueError):
            pass

    def _close(self, conn, reason):
        """CLOSED: close one connection now, whatever its phase; tell the room if it had joined."""
        if conn.phase is Phase.CLOSED:
            return
        self._move(conn, Phase.CLOSED)
        if conn.mask:
            self.poller.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()
        del self.conns[conn.sock]
        for deadlines in self.deadlines:
            deadlines.discard(conn)
        self.chat.leave(conn.peer, reason)
        if self.cluster is not None:
            self.cluster.closed(conn.peer)
        self._release(conn)
        self._churned()
        if self.accept_paused:
            self._resume_accepting(None)  # a descriptor just came free

    @staticmethod
    def _release(conn):
        """Let go of what a closed connection held at once, whoever still refers to it (a timer,
        the room's pending list): its buffers, and the Conn-Peer cycle that would otherwise
        wait for the cyclic garbage collector."""
        conn.inbuf = b""
        conn.peer.out.clear()
        conn.peer.owner = None

    def _forget(self, conn):
        """Last resort after an error in _close itself: drop every reference to ``conn``."""
        conn.phase = Phase.CLOSED   # (by force: whatever went wrong, it is closed now)
        for step in (lambda: self.poller.unregister(conn.sock), conn.sock.close,
                     lambda: self.conns.pop(conn.sock, None),
                     lambda: [deadlines.discard(conn) for deadlines in self.deadlines],
                     lambda: self._release(conn)):
            try:
                step()
            except Exception:
                pass


class Timers:
    """What is due at a time: the fixed-length deadlines (Deadlines) and the rest in a heap
    (flood control's waits, the accept pause, the shutdown's grace, Redis's)."""

    def after(self, seconds, action, conn):
        """Call ``action(conn)`` in ``seconds`` (unless conn is closed by then)."""
        self._timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + seconds, self._timer_seq, action, conn))

    def _churned(self):
        """A connection opened or closed. A join storm (every join told to every member) leaves
        tens of MiB freed in the C heap that glibc keeps: 10,000 members held 83 MiB where 44
        are in use. Once the storm is over, give it back (release_unused_memory)."""
        self._churn += 1
        self._last_churn = time.monotonic()
        if self._churn >= TRIM_AFTER_CHURN and not self._trim_due:
            self._trim_due = True
            self.after(TRIM_QUIET, self._trim_when_quiet, None)

    def _trim_when_quiet(self, _):
        quiet_since = time.monotonic() - self._last_churn
        if quiet_since < TRIM_QUIET:
            self.after(TRIM_QUIET - quiet_since, self._trim_when_quiet, None)   # not over yet
            return
        self._trim_due = False
        self._churn = 0
        release_unused_memory(collect=False)   # (a few ms; a full collection could take more)

    def call_later(self, seconds, callback):
        """``callback()`` in ``seconds``, unless the handle returned is cancelled first."""
        handle = TimerHandle(callback)
        self.after(seconds, handle, None)
        return handle

    @staticmethod
    def monotonic():
        return time.monotonic()

    def _run_timers(self):
        now = time.monotonic()
        for deadlines in self.deadlines:
            for conn in deadlines.take_due(now):
                try:
                    deadlines.expired(conn)
                except Exception:
                    self._fail(conn)
        while self.timers and self.timers[0][0] <= now:
            _, _, action, conn = heapq.heappop(self.timers)
            if conn is None:
                action(conn)
                continue
            if conn.phase is Phase.CLOSED:
                continue
            try:
                action(conn)
            except Exception:
                self._fail(conn)

    def _join_expired(self, conn):
        """Its join timeout has come: if it has not joined by now, it is refused."""
        if conn.phase is Phase.HANDSHAKE:
            self._close(conn, Reason.CLOSED)  # no TLS yet, so nothing can be said
        elif conn.phase is Phase.PASSWORD:
            self._enter(conn, self.chat.refuse(conn.peer, Lines.PASSWORD_TIMEOUT))
        elif conn.phase is Phase.NICKNAME or conn.phase is Phase.NICK_PASSWORD:
            # (a registered nickname named and its password never given: no nickname yet, and
            # such a connection must not hold a place for ever)
            self._enter(conn, self.chat.refuse(conn.peer, Lines.JOIN_TIMEOUT))

    def _closing_expired(self, conn):
        if conn.phase is Phase.CLOSING:
            self._close(conn, Reason.CLOSED)

    def _linger_expired(self, conn):
        self._close(conn, Reason.CLOSED)


class Watching:
    """Sockets that are not connections of members: the Redis client's, which asks the loop to
    watch them (``watch``) and is called when they are ready; a cluster's pause and loss."""

    def watch(self, sock, readable, writable, handler):
        events = (EVENT_READ if readable else 0) | (EVENT_WRITE if writable else 0)
        known = self._watched.get(sock)
        if known == events:
            return
        if known is None or known == 0:
            if events:
                self.poller.register(sock, events, handler)
        elif events == 0:
            self.poller.unregister(sock)
        else:
            self.poller.modify(sock, events, handler)
        self._watched[sock] = events

    def unwatch(self, sock):
        if self._watched.pop(sock, 0):
            self.poller.unregister(sock)

    @staticmethod
    def _watched_event(handler, readable, writable):
        try:
            handler(bool(readable), bool(writable))
        except Exception:
            print_traceback()   # (the client has closed that connection; the loop goes on)

    def start_cluster(self, seconds=None):
        """Before serving: this node loads the chat from Redis (the snapshot, the log), or says
        why it can't (False, with cluster.problem)."""
        deadline = time.monotonic() + (seconds or REDIS_DEADLINE * 3)
        while self.cluster.state == ClusterNode.STARTING and self.cluster.problem is None:
            if time.monotonic() > deadline:
                self.cluster.problem = "%s did not answer" % self.cluster.address.shown
                break
            self.run_once(timeout=0.05)
        return self.cluster.state == ClusterNode.READY

    def cluster_paused(self, paused):
        """Redis is unreachable (or back): members are told, once; their lines wait."""
        text = Lines.PAUSED if paused else Lines.BACK
        for conn in list(self.conns.values()):
            if conn.phase not in TALKING or not conn.peer.member:
                continue
            self.chat.notice(conn.peer, text)
            if paused:
                conn.holds |= Hold.PAUSED
            else:
                conn.holds &= ~Hold.PAUSED
                self._queue_lines(conn)
            self._set_interest(conn)

    def cluster_lost(self):
        """This node's lease ended while Redis was away: every connection is closed (another
        node frees the nicknames), and the room core starts again, empty, for the new node."""
        notice = self.chat.line(Lines.SHUTTING_DOWN)
        for conn in list(self.conns.values()):
            if conn.phase in TALKING or conn.phase is Phase.NEW:
                self.chat.deliver(conn.peer, notice)
                self._close_after_flush(conn)
        self._flush_pending()   # (what the old room core queued: its last lines)
        self._make_chat()


class Stopping:
    """Signals, and the end: everyone told, the last lines given a moment to leave."""

    def install_signal_handlers(self):
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        self._wakeup_installed = True
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame):
        self.stopping = True

    def shutdown(self, grace=SHUTDOWN_GRACE):
        """Tell every connection, give the output up to ``grace`` seconds to leave, close all."""
        self.stopping = True
        if self.listener is not None:
            if not self.accept_paused:
                self.poller.unregister(self.listener)
            self.listener.close()
            self.listener = None
        self.backlog = []
        if self.cluster is not None:
            self._leave_the_cluster()
        else:
            self.chat.shut_down()
        for conn in list(self.conns.values()):
            if conn.phase in (Phase.PASSWORD, Phase.NICKNAME):
                self.chat.notice(conn.peer, Lines.SHUTTING_DOWN)
            if conn.phase is Phase.HANDSHAKE:
                self._close(conn, Reason.SHUTDOWN)
            else:
                self._close_after_flush(conn)
        self.timers = []
        self.joining.clear()
        self.after(grace, lambda _: None, None)  # bounds the wait below
        deadline = time.monotonic() + grace
        self._flush_pending()
        while self.conns and time.monotonic() < deadline:
            self.run_once(timeout=max(deadline - time.monotonic(), 0))
        for conn in list(self.conns.values()):
            self._close(conn, Reason.SHUTDOWN)
        self.log.flush()

    def _leave_the_cluster(self):
        """This node stops: its members are told, their leaves go to the log (the other nodes'
        members see them go), and its lease is given back."""
        notice = self.chat.line(Lines.SHUTTING_DOWN)
        for conn in list(self.conns.values()):
            peer = conn.peer
            if peer.member:
                self.chat.deliver(peer, notice)
                self.chat.leave(peer, Reason.SHUTDOWN)
        self.cluster.stop()

    def close(self):
        for conn in list(self.conns.values()):
            self._close(conn, Reason.SHUTDOWN)
        if self.cluster is not None:
            self.cluster.close()
        if self.listener is not None:
            self.listener.close()
        if self._wakeup_installed:
            # First, so that no signal handler writes to a closed socket: on Windows Ctrl-C is
            # handled in a thread of its own, which may not have written yet when the loop,
            # woken by something else, has already seen the signal and stopped.
            signal.set_wakeup_fd(-1)
            self._wakeup_installed = False
        for sock in (self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()
        self.poller.close()
        self.store.close()
        self.log.close()


class Server(Loop, Accepting, Handshaking, Reading, Writing, Closing, Timers, Watching,
             Stopping):
    """The chat server: the room core (``chat``) behind one selector loop, and every part of a
    connection's life above. Its state, all of it, is set up here."""

    # The attributes every turn touches, in slots (see FEW_ENOUGH_ATTRIBUTES); the rest are in
    # the instance's dict, which must stay under that number.
    __slots__ = ("_line_handlers", "_share", "_throttle_items", "backlog", "chat", "cluster",
                 "deadlines", "high_water", "input_limit", "log", "low_water", "max_line_bytes",
                 "max_send_queue", "poller", "stopping", "store", "timers", "tls_buffered")

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, log=None,
                 max_clients=None, max_line_bytes=DEFAULT_MAX_LINE_BYTES,
                 max_send_queue=DEFAULT_MAX_SEND_QUEUE, join_timeout=DEFAULT_JOIN_TIMEOUT,
                 history=DEFAULT_HISTORY, rate_limit=DEFAULT_RATE_LIMIT,
                 rate_burst=DEFAULT_RATE_BURST, password=None, tls=None, selector=None,
                 dead_peer=DEFAULT_DEAD_PEER, max_rooms=DEFAULT_MAX_ROOMS, store=None,
                 catch_up=DEFAULT_CATCH_UP, operators=(), cluster=None):
        self.host = host
        self.dead_peer = dead_peer
        self.port = port
        self.log = log or NullLog()
        self.cluster = cluster    # a ClusterNode, when this server is one node of several
        self.hashing = ThreadHashing(self._wake)
        self._chat_options = dict(history=history, password=password, max_rooms=max_rooms,
                                  catch_up=catch_up, operators=operators)
        self.store = store if store is not None else MemoryStore()
        self.poller = make_poller(selector)
        self.timers = []          # heap of (when, sequence, action, conn)
        self._timer_seq = 0
        self._churn = 0           # connections opened and closed since memory was last trimmed
        self._last_churn = 0.0
        self._trim_due = False
        self._make_chat()
        if max_clients is None:
            selecting = isinstance(getattr(self.poller, "selector", None),
                                   selectors.SelectSelector)
            max_clients = SELECT_MAX_CLIENTS if selecting else DEFAULT_MAX_CLIENTS
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
        # Reading a connection pauses while this much unhandled input waits: at least one read,
        # and room for a whole line of the longest kind, or such a line could never complete.
        self.input_limit = max(READ_SIZE, max_line_bytes + 2)
        self.join_timeout = join_timeout
        # Flood control: a token bucket per connection. Off is an endless bucket, so the check
        # per batch of lines is the same one comparison either way.
        self.rate_limit = rate_limit
        self.rate_burst = float(rate_burst) if rate_limit else float("inf")
        self.tls = tls            # an ssl.SSLContext, or None for plain TCP
        self.conns = {}           # socket -> Conn
        self.backlog = []         # Conns with complete lines not yet handled
        self.tls_buffered = []    # TLS Conns whose decrypted input select() can't see
        # Fixed-length timeouts, one ordered dict each (see Deadlines); the heap above is for
        # the rest (flood control's waits, the accept pause, the shutdown's grace).
        self.joining = Deadlines(join_timeout, self._join_expired)
        self.closing = Deadlines(CLOSING_SECONDS, self._closing_expired)
        self.lingering = Deadlines(LINGER_SECONDS, self._linger_expired)
        self.deadlines = (self.joining, self.closing, self.lingering)
        self._share = LINES_PER_TURN  # lines each connection read this turn may handle at once
        self.listener = None
        self.accept_paused = False
        self.stopping = False
        self._wakeup_r = self._wakeup_w = None
        self._wakeup_installed = False
        self._watched = {}        # socket -> events, of the sockets others watch (Redis's)
        if self.cluster is not None:
            self.cluster.attach(self)

    def _make_chat(self):
        """The room core, and what it tells the loop. A cluster's node has a replica's store
        and its log in Redis; a node that lost its lease starts again with a new one."""
        if self.cluster is not None:
            self.store = ClusterStore(max(self._chat_options["history"],
                                          self._chat_options["catch_up"]), self.cluster.search)
        self.chat = Chat(self.log.record, store=self.store, hashing=self.hashing,
                         shared_rooms=self.cluster is None, **self._chat_options)
        self.chat.on_phase = self._room_moved
        self.chat.on_hold = self._room_holds
        self.chat.on_timer = lambda seconds, action: self.after(seconds, lambda _: action(),
                                                                None)
        if self.cluster is not None:
            self.chat.append = self.chat.append_say = self.cluster.append  # (every kind alike)
            self.cluster.chat = self.chat
            # Nobody joins until the node has its replica (READY): starting again after a
            # loss, a nickname sent meanwhile was taken and never answered.
            self.chat.paused = self.cluster.state != ClusterNode.READY
        self._line_handlers = self.chat.line_handlers()
        self.chat.schedule_endings()   # (the bans and mutes of before a restart)


# =============================================================================================
# What the loop uses: TLS, the logs, the platform.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# TLS.
# ---------------------------------------------------------------------------------------------

class _NotRaised(Exception):
    """Stands for ssl's exceptions in the loop's except clauses until TLS is used."""


# A TLS socket's "try again when it is readable/writable", as distinct from a real error.
# (An except clause's names are looked up only when an exception is being matched.)
TLS_WANTS_READ = TLS_WANTS_WRITE = _NotRaised

TLS_HANDSHAKE_RECORD = b"\x16"   # the first byte of every TLS client's first message


def load_ssl():
    """Import ssl for TLS; RuntimeError if this Python has none (some minimal builds)."""
    global ssl, TLS_WANTS_READ, TLS_WANTS_WRITE
    try:
        import ssl as module
    except ImportError:
        raise RuntimeError("--tls-cert needs Python's ssl module, which this Python lacks")
    ssl = module
    TLS_WANTS_READ, TLS_WANTS_WRITE = ssl.SSLWantReadError, ssl.SSLWantWriteError
    return ssl


def tls_context(cert_file, key_file):
    """A server context for the certificate (TLS 1.2 or newer); OSError or ssl.SSLError if the
    files are wrong, RuntimeError if this Python has no ssl module."""
    ssl = load_ssl()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def describe_tls_file_error(exc, cert_file, key_file):
    """What is wrong with the certificate or key, in words (OpenSSL's are "PEM lib")."""
    reason = getattr(exc, "reason", None) or ("PEM_LIB" if "PEM lib" in str(exc) else None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if reason in ("PEM_LIB", "NO_START_LINE", "BAD_END_LINE"):
        try:
            with open(key_file or cert_file, encoding="ascii", errors="replace") as f:
                has_key = "PRIVATE KEY-----" in f.read()
        except OSError:
            has_key = True
        if not has_key:
            return ("no private key in %s (give it with --tls-key)" % cert_file if not key_file
                    else "no private key in %s" % key_file)
        return "not a PEM certificate and key"
    return getattr(exc, "strerror", None) or reason or str(exc)


def certificate_fingerprint(cert_file):
    """SHA-256 of the (first) certificate in the PEM file, as ``AA:BB:...`` (openssl's form)."""
    import hashlib
    ssl = load_ssl()
    with open(cert_file, encoding="ascii", errors="replace") as f:
        pem = f.read()
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem, re.DOTALL)
    if not match:
        raise ValueError("no certificate in %s" % cert_file)
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(match.group())).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


# ---------------------------------------------------------------------------------------------
# Logging: the seed's "log successful messages". Each sink's ``record`` takes a delivered line's
# bytes; it is a list's append (no Python call per record), and ``flush()``, once per loop turn
# like the sockets, writes what the turn recorded.
# ---------------------------------------------------------------------------------------------

class FileLog:
    """Appends lines to a file, rotating it at ``max_bytes`` (keeps ``backups`` old files).

    Writes are buffered and flushed once per loop turn, like the sockets. A file that can't be
    written (disk full, a rename Windows refuses) never stops the chat: the failure is said once
    on standard error and the chat goes on."""

    def __init__(self, path, max_bytes=LOG_FILE_MAX_BYTES, backups=LOG_FILE_BACKUPS,
                 warn=None):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.warn = warn or (lambda message: None)
        self._failing = False   # said so already: stay quiet until a write works again
        self._file = open_private(path)
        self._size = self._file.tell()
        self._lines = []
        self.record = self._lines.append
        self._unflushed = False   # written to the file object, not yet to the file

    def _write(self):
        data = b"".join(self._lines)
        self._lines.clear()
        try:
            self._file.write(data)
        except (OSError, ValueError) as exc:
            self._failed(exc)
            return
        self._unflushed = True
        self._size += len(data)
        if self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self):
        try:
            self._file.close()
            for n in range(self.backups - 1, 0, -1):
                older = "%s.%d" % (self.path, n)
                if os.path.exists(older):
                    os.replace(older, "%s.%d" % (self.path, n + 1))
            if self.backups:
                os.replace(self.path, self.path + ".1")
            else:
                os.remove(self.path)
        except OSError:
            # Windows refuses to rename a file another program holds open (a viewer, a backup
            # tool, a virus scanner): keep appending, and try again after another max_bytes.
            pass
        try:
            self._file = open_private(self.path)
        except OSError as exc:
            self._failed(exc)
        self._size = 0

    def _failed(self, exc):
        if not self._failing:
            self._failing = True
            self.warn("cannot write the log file %s: %s; records are lost until it can"
                      % (self.path, getattr(exc, "strerror", None) or exc))

    def flush(self):
        if self._lines:
            self._write()
        if not self._unflushed:
            return
        self._unflushed = False
        try:
            self._file.flush()
            self._failing = False
        except (OSError, ValueError) as exc:
            self._failed(exc)

    def close(self):
        self.flush()
        try:
            self._file.close()
        except OSError:
            pass


class StderrLog:
    def __init__(self):
        # The records are UTF-8, as in chat.log. Redirected on Windows, standard error would use
        # the ANSI code page and turn Cyrillic into \u escapes; a console keeps its own I/O.
        if not sys.stderr.isatty():
            try:
                sys.stderr.reconfigure(encoding="utf-8", errors="replace")
            except (AttributeError, ValueError):
                pass
        self._lines = []
        self.record = self._lines.append

    def flush(self):
        if self._lines:
            sys.stderr.write(b"".join(self._lines).decode("utf-8", "replace"))
            self._lines.clear()
        sys.stderr.flush()

    def close(self):
        self.flush()


class NullLog:
    def __init__(self):
        self._lines = []
        self.record = self._lines.append

    def flush(self):
        self._lines.clear()

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
        self._lines = []
        self.record = self._lines.append
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

    def _emit(self, line):
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
        lines = self._lines[:]
        self._lines.clear()   # (the same list: record is its bound append)
        for line in lines:    # one datagram a record, as syslog expects
            self._emit(line)
        self._full = False  # once per loop turn: try the socket again

    def close(self):
        self.flush()
        if self._sock is not None:
            self._sock.close()


def open_private(path):
    """``path`` opened to append bytes, created readable by its owner only (0600 on POSIX): a
    chat's records are nobody else's business. An existing file keeps its mode."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | BINARY, 0o600), "ab")


BINARY = getattr(os, "O_BINARY", 0)   # Windows: no newline translation


def default_syslog_address():
    for path in ("/dev/log", "/var/run/syslog"):
        if os.path.exists(path):
            return path
    return None


def open_file_log(path, warn, fall_back, why=None):
    """The log file; where it can't be opened, standard error if ``fall_back``, else the error,
    naming the file. One notice says where the records go and why, ``why`` (the file instead of
    syslog) first: never a notice that a second one contradicts."""
    try:
        sink = FileLog(path, warn=warn)
    except OSError as exc:
        reason = "cannot open the log file %s: %s" % (os.path.abspath(path), exc.strerror or exc)
        if not fall_back:
            raise OSError(reason)
        warn("%s; logging to standard error" % "; ".join(filter(None, (why, reason))))
        return StderrLog()
    if why:
        warn("%s; logging to %s" % (why, path))
    return sink


def open_log(mode, log_file, syslog_address, warn):
    """The sink ``--log`` asks for. ``auto``: syslog where its socket answers, else the file,
    else standard error."""
    if mode == "auto" and platform_name() == "windows":
        return open_file_log(log_file, warn, fall_back=True)
    if mode == "auto":
        syslog_address = syslog_address or default_syslog_address()
        if not syslog_address:
            return open_file_log(log_file, warn, fall_back=True,
                                 why="no syslog socket (/dev/log) on this machine")
        sink = SyslogLog(syslog_address)
        if sink.connected():
            return sink
        # A socket file left by a stopped daemon: logging there would lose every record.
        return open_file_log(log_file, warn, fall_back=True,
                             why="the syslog socket %s does not answer" % syslog_address)
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
        return open_file_log(log_file, warn, fall_back=False)
    if mode == "stderr":
        return StderrLog()
    return NullLog()


# ---------------------------------------------------------------------------------------------
# Redis: a client for the loop (a cluster's nodes meet in Redis). RESP2 over non-blocking
# sockets, in these parts, each built on the one before:
#
# * RespParser: an incremental RESP2 reader (the shape of hiredis's read.c): feed(bytes), then
#   gets() until it returns RESP_INCOMPLETE. A reply may arrive split over any number of reads;
#   nested arrays are filled through a stack, not recursion. An error reply is a RedisError
#   *value*, so the replies of a pipeline can hold one among the others; bytes that are not
#   RESP raise RespProtocolError. The replies already whole are parsed at once, the fast way
#   (_whole_replies: one split at CRLF, arrays of bulk strings as checked slices).
# * encode_command(*args): a command as a RESP array of bulk strings.
# * parse_redis_url(url) -> RedisAddress; redact_redis_url(url) for messages.
# * RedisConnection: one connection's life inside the loop, never blocking: connect, TLS for
#   rediss://, AUTH, SELECT, then pipelined commands whose callbacks are called in the order
#   they were sent, EVALSHA with a transparent NOSCRIPT reload, a deadline per command. It
#   talks to the loop only through loop.watch(sock, readable, writable, handler),
#   loop.unwatch(sock), loop.call_later(seconds, callback) -> handle (handle.cancel()) and
#   loop.monotonic(); its owner calls flush() once per loop turn, before the loop sleeps.
# * RedisLink: keeps one RedisConnection usable, connecting again with back-off after a loss.
#
# The promise to the owner: every command given to send or evalsha ends in exactly one of two
# ways: its callback gets its reply, or it is in the list on_lost(reason, unanswered) hands over
# (a RedisCommand, whose ``written`` says whether Redis may have run it). Nothing is assumed done
# or undone, and no error of Redis or the network escapes into the loop.
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

    That step-by-step parser costs a few method calls per element, and an XREAD reply of the
    cluster's log has some twenty elements per entry: so the replies that are whole when gets()
    is called are parsed first by ``_whole_replies``, which splits the input at every CRLF once
    and takes arrays of bulk strings (a stream entry's fields) as slices of that split, checked
    in C. Either way the values are the same; the tests compare the two.
    """

    def __init__(self):
        self._buf = b""
        self._pos = 0            # where the next unread byte of _buf is
        self._more = []          # pieces fed since, not yet joined to _buf
        self._more_size = 0
        self._need = 1           # bytes from _pos that the next step needs at least
        self._stack = []         # (items, size) of each array being filled, outermost first
        self._broken = None      # a protocol error: every later gets() raises it again
        self._ahead = collections.deque()  # whole replies parsed already, not yet taken

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
        if self._ahead:
            return self._ahead.popleft()
        if self._more:
            if len(self._buf) - self._pos + self._more_size < self._need:
                return RESP_INCOMPLETE
            self._buf = b"".join([self._buf[self._pos:]] + self._more)
            self._pos = 0
            self._more = []
            self._more_size = 0
        if not self._stack and self._pos < len(self._buf):
            # Between replies: every whole one there is, at once (the fast way, see
            # _whole_replies); what it leaves (the last, incomplete one, or an odd one) is the
            # step-by-step parser's below.
            replies, self._pos = _whole_replies(self._buf, self._pos)
            if replies:
                self._ahead.extend(replies)
                if self._pos == len(self._buf):
                    self._buf, self._pos = b"", 0
                return self._ahead.popleft()
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


# A bulk string's header, by its length: an array of bulk strings is checked against these in C.
# Up to 1 KiB (45 KiB of memory in every server; 4 KiB would be 183): a longer one is checked by
# the slower way, its array only.
_BULK_HEADS = [b"$%d" % size for size in range(1024)]
_FAST_DEPTH = 8    # arrays nested deeper are left to the step-by-step parser


class _NotFast(Exception):
    """The fast parser stops: this reply is incomplete, or not one it takes (a bulk string with
    CRLF inside, garbage); RespParser._parse takes it from there, or says what is wrong."""


def _whole_replies(buf, pos):
    """The whole replies in ``buf`` from ``pos`` on, parsed at once: (replies, where the first
    reply not taken starts). The input is split at every CRLF; a bulk string is whole when its
    data is one piece of the split of exactly its length (a CRLF inside it stops the fast way
    at that reply, as does an incomplete or a wrong reply)."""
    pieces = buf[pos:].split(b"\r\n") if pos else buf.split(b"\r\n")
    last = len(pieces) - 1     # pieces[last] is what follows the last CRLF: no whole line
    replies = []
    taken = 0
    while taken < last:
        try:
            value, after = _whole_value(pieces, taken, last, 0)
        except (_NotFast, ValueError, IndexError):
            break
        replies.append(value)
        taken = after
    if not replies:
        return replies, pos
    if taken == last:          # the usual case: all taken, the rest is what follows the last CRLF
        return replies, len(buf) - len(pieces[last])
    return replies, pos + sum(map(len, pieces[:taken])) + 2 * taken


def _whole_value(pieces, at, last, depth):
    """The value whose header is ``pieces[at]``, and the index of the piece after it."""
    if at >= last:
        raise _NotFast()     # (the rest of the reply has not come yet)
    head = pieces[at]
    kind = head[0]
    if kind == 36:                                        # $ bulk string
        if head == b"$-1":
            return None, at + 1
        if at + 1 >= last or len(pieces[at + 1]) != int(head[1:]):
            raise _NotFast()
        return pieces[at + 1], at + 2
    if kind == 42:                                        # * array
        size = int(head[1:])
        if size <= 0:
            if size == 0 or size == -1:
                return ([] if size == 0 else None), at + 1
            raise _NotFast()
        first, end = at + 1, at + 1 + 2 * size
        # All bulk strings? Tried when the first and last elements are (a stream entry's
        # [id, [fields]] is not: its fields are).
        if end <= last and pieces[first][:1] == b"$" and pieces[end - 2][:1] == b"$":
            values = pieces[first + 1:end:2]
            try:
                if list(map(_BULK_HEADS.__getitem__, map(len, values))) == pieces[first:end:2]:
                    return values, end     # all bulk strings, each exactly its length
            except IndexError:
                pass                       # (a long one: checked one by one below)
        if pieces[first] == b"*2":    # (arrays of pairs: perhaps the log's packed entries)
            entries = _stream_entries(pieces, first, size, last)
            if entries is not None:
                return entries, first + 8 * size
        if depth >= _FAST_DEPTH:
            raise _NotFast()
        items = []
        at = first
        for _ in range(size):
            head = pieces[at]
            if head[:1] == b"$" and at + 1 < last and head != b"$-1":
                value = pieces[at + 1]         # (a bulk string, the usual element, here)
                if len(value) != int(head[1:]):
                    raise _NotFast()
                at += 2
            else:
                value, at = _whole_value(pieces, at, last, depth + 1)
            items.append(value)
        return items, at
    if kind == 58:                                        # : integer
        return int(head[1:]), at + 1
    if kind == 43:                                        # + simple string
        return head[1:].decode("utf-8", "replace"), at + 1
    if kind == 45:                                        # - error
        return RedisError(head[1:].decode("utf-8", "replace")), at + 1
    raise _NotFast()


def _stream_entries(pieces, first, size, last):
    """``size`` stream entries of one field each ([id, [name, value]], the cluster's packed log
    entries) from ``pieces[first]`` on, taken as slices of the split and checked in C: every
    entry is the same 8 pieces. None if they are not that (then the general way takes them)."""
    end = first + 8 * size
    if end > last:
        return None
    if (pieces[first:end:8] + pieces[first + 3:end:8]).count(b"*2") != 2 * size:
        return None
    try:
        for head in (1, 4, 6):    # the id's, the name's and the value's headers
            if (list(map(_BULK_HEADS.__getitem__, map(len, pieces[first + head + 1:end:8])))
                    != pieces[first + head:end:8]):
                return None
    except IndexError:
        return None               # (a value past _BULK_HEADS: the general way checks it)
    return [[entry_id, [name, value]] for entry_id, name, value in
            zip(pieces[first + 2:end:8], pieces[first + 5:end:8], pieces[first + 7:end:8])]


def encode_command(*args):
    """``encode_command("SET", "k", 1)`` -> ``b"*3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\n1\\r\\n"``.
    Arguments are str (sent as UTF-8), bytes or int; anything else is a TypeError, rather than
    a guess at how Redis should read it.

    A batch of the cluster's entries is thousands of arguments: each is made bytes in one
    comprehension (the exact types first), their headers are found by length in C
    (_BULK_HEADS), and the whole is one join at CRLF."""
    data = [arg.encode("utf-8") if type(arg) is str else arg if type(arg) is bytes
            else _encoded_argument(arg) for arg in args]
    try:
        heads = list(map(_BULK_HEADS.__getitem__, map(len, data)))
    except IndexError:   # (a long argument)
        heads = [b"$%d" % len(one) for one in data]
    lines = [b""] * (2 * len(data) + 2)    # the count, then header and data of each, then b""
    lines[0] = b"*%d" % len(data)
    lines[1:-1:2] = heads
    lines[2:-1:2] = data
    return b"\r\n".join(lines)


def _encoded_argument(arg):
    """An argument other than an exact str or bytes, as encode_command sends it."""
    if type(arg) is int:
        return b"%d" % arg
    if isinstance(arg, bytes):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, int) and not isinstance(arg, bool):
        return b"%d" % arg
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    raise TypeError("a Redis argument is str, bytes or int, not %s" % type(arg).__name__)


@functools.lru_cache(maxsize=64)
def script_digest(script):
    """(SHA-1 in hex, as EVALSHA names it; the script as bytes). Scripts are the program's
    constants, so the digest is computed once each."""
    import hashlib
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
        import urllib.parse   # (a cluster's only: a chat without Redis does without it)
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
    import urllib.parse
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

    @property
    def socket(self):
        """The socket, for an owner that waits for a reply inside its turn (see buffered)."""
        return self._sock

    def buffered(self):
        """Whether replies can be taken now without waiting for the socket: TLS holds bytes it
        has decrypted already, which never make the socket readable."""
        return self._tls_context is not None and self._sock.pending() > 0

    def take_replies(self):
        """Read what Redis has sent and hand each whole reply to its command, now: as the loop
        does when the socket is readable, for an owner that waits for a reply inside its turn.
        (An exception raised by a callback closes the connection and goes on up, as there.)"""
        self._on_event(True, False)

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


# =============================================================================================
# The cluster: several servers (nodes) serving one chat, meeting in Redis.
#
# Redis holds the log, one stream (PREFIX:log): the sequencer. A node never applies a change of
# its own members itself: it appends the entry (the APPEND script: the node's lease checked, a
# nickname's claim checked, the entry added with the time and a number of its own) and every
# node, the appender too, applies what XREAD brings back, in the log's order. So every node's
# room core is the same replica of the chat: who is where (the other nodes' members too),
# rooms, accounts, bans; and every member of a room, on any node, sees its lines in one order,
# a sender's "Server: ok!" and echo at their place. One stream for every room, not one a room:
# presence moves across rooms (a /join is one entry, not two in two logs), a gap is one number
# to watch, and a node reads one key however many rooms there are; its ceiling, one Redis
# core's XADD rate, is far above what nodes of this kind produce.
#
# What must outlive the log (it is trimmed): the replica itself, written now and then by one
# node as a snapshot (PREFIX:snapshot) of the log's state at one entry; a node starts from the
# newest snapshot and the log after it. The kept messages of each room are a stream of their own
# (PREFIX:messages:ROOM, trimmed to --keep), written by the same script: /search reads it, and
# a starting node its rooms' last lines.
#
# Nicknames: each is claimed (PREFIX:claims, its look-alike keys -> "node/connection") in the
# script that appends its join or rename, so two nodes can never give one out twice. Each node
# holds a lease (PREFIX:lease:NODE, 10 s, renewed every second); every append checks it
# (fencing: a node that was cut off longer can't write). A node that can't renew in time closes
# its members' connections itself; the others' reaper then appends their leaves, once, and frees
# their nicknames. While Redis is unreachable, a node holds its members' lines (nothing is lost,
# nothing acknowledged) and says so.
#
# An entry in Redis is one stream field, "e": its number, time, kind and owner, then its own
# fields (ENTRY_FIELDS, by kind), joined by "\n" (a kept message adds its position, "s"). The
# script writes it without reading it, a node splits it twice: a message is 5 RESP elements in
# an XREAD, not 19 (a field and a name each), in the script 7 arguments, not 13. No field but
# an entry's last may hold a "\n" (every one is a name, a key, a number, JSON or part of one
# line, which never has one); the last, a message's text, may hold anything. A node still reads
# the entries of the versions before (a field for each: "n", "t", "k", "o"...), in the log after
# the snapshot and in the rooms' kept messages, which outlive an upgrade; it does not write them,
# so every node of a cluster is stopped before the new version starts (see OPERATIONS.md).
# =============================================================================================

LEASE_SECONDS = 10.0        # a node's lease: past it, its members are the reaper's
LEASE_RENEW_EVERY = 1.0     # renewals: a lost Redis is noticed within this and REDIS_DEADLINE
LEASE_MARGIN = 1.5          # a node closes its members this long before its lease can end
REDIS_DEADLINE = 2.0        # an unanswered command after this means Redis is gone
REAP_EVERY = 2.0            # how often a node looks for nodes whose lease ended
SNAPSHOT_EVERY = 60.0       # how often a node tries to be the one that writes the snapshot
LOG_READ_BLOCK_MS = 1000    # XREAD BLOCK: the reader's wait for new entries
LOG_READ_COUNT = 1000       # entries a read brings at most
LOG_WAIT = 0.01             # a turn that appended waits this long at most for its entries to
                            # come back (see ClusterNode.flush); one that waited in vain:
LOG_WAIT_REST = 1.0         # no turn waits for this long after it
APPEND_EARLY = 32           # a turn sends its entries as soon as it has this many (see append)
APPEND_BATCH = 500          # entries one run of the APPEND script takes at most (Redis waits
                            # for nothing else meanwhile: some 5 ms)

# The scripts: run atomically in Redis. ARGV[1] is always the cluster's key prefix.
#
# APPEND: a loop turn's entries of this node, in one run (one EVALSHA a turn, not one an entry:
# the command's cost in both processes is paid once; a turn with many lines sends them in runs
# of APPEND_EARLY as it reads them, see ClusterNode.append). ARGV: prefix, node, lease token,
# --keep, then seven for each entry: the node's number for it, kind, owner ("node/connection"),
# nickname keys to claim, keys to release, room key, and its own fields packed (ENTRY_FIELDS),
# which the script puts after the entry's number, time, kind and owner without reading them.
# The lease is checked once, for all of them (the script is atomic: no lease can end midway).
# The reply: one element per entry, in their order: its id in the log, "again" (sent again after
# a lost connection, and done already: once is enough), or an error (BUSY KEY: that nickname is
# someone else's; the entries after it go on, as if each had been sent alone; sent again, it is
# refused again, from the node's refusals, kept an hour). A batch whose first entry is past the
# node's next (an earlier batch has not run: Redis forgot the script, and the earlier one is
# being loaded and run again after it) is refused whole (GAP), and the node starts again: an
# entry must never run before one the node sent earlier, or that one would be taken for done.
APPEND_SCRIPT = r"""
local P, node, token, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('GET', P .. ':lease:' .. node) ~= token then
  return redis.error_reply('LEASE the lease of this node has ended')
end
local sent = tonumber(redis.call('HGET', P .. ':sent', node) or '0')
local done = sent
local time = redis.call('TIME')
local t = time[1] .. '.' .. string.format('%06d', time[2])

local refusals = P .. ':refused:' .. node

-- The log's number and each room's position: counted in Redis by the batch's first entry
-- (INCR, HINCRBY), then here, and written once at the end (the script is atomic: nothing else
-- counts meanwhile). A redis.call is most of an entry's cost in Redis, and Redis runs the
-- script while the node waits for its entries to come back; a batch of one costs what it did.
local n, n_written      -- the log's last number: as counted here, as in Redis
local function next_number()
  if n == nil then
    n = redis.call('INCR', P .. ':n')
    n_written = n
  else
    n = n + 1
  end
  return n
end
local positions, positions_written = {}, {}   -- room key -> its last position: here, in Redis
local function next_position(room)
  local s = positions[room]
  if s == nil then
    s = redis.call('HINCRBY', P .. ':positions', room, 1)
    positions_written[room] = s
  else
    s = s + 1
  end
  positions[room] = s
  return s
end

local function append(seq, kind, owner, claim, release, room, data)
  if seq <= sent then   -- sent again: done (or refused) once already
    local refused = redis.call('HGET', refusals, seq)
    if refused then return redis.error_reply('BUSY ' .. refused) end
    return 'again'
  end
  done = seq
  if claim ~= '' then
    for key in string.gmatch(claim, '%S+') do
      local holder = redis.call('HGET', P .. ':claims', key)
      if holder and holder ~= owner then
        redis.call('HSET', refusals, seq, key)
        redis.call('PEXPIRE', refusals, 3600000)   -- (an hour: a resend comes long before)
        return redis.error_reply('BUSY ' .. key)
      end
    end
  end
  local at = string.find(owner, '/', 1, true)
  local owner_node, conn = string.sub(owner, 1, at - 1), string.sub(owner, at + 1)
  if release ~= '' then
    for key in string.gmatch(release, '%S+') do
      if redis.call('HGET', P .. ':claims', key) == owner then
        redis.call('HDEL', P .. ':claims', key)
      end
    end
  end
  if claim ~= '' then
    for key in string.gmatch(claim, '%S+') do redis.call('HSET', P .. ':claims', key, owner) end
    redis.call('HSET', P .. ':conns:' .. owner_node, conn, claim)
  elseif kind == 'leave' then
    redis.call('HDEL', P .. ':conns:' .. owner_node, conn)
  end
  local entry = next_number() .. '\n' .. t .. '\n' .. kind .. '\n' .. owner .. '\n' .. data
  local id = redis.call('XADD', P .. ':log', '*', 'e', entry)
  if kind == 'say' or kind == 'act' then
    redis.call('XADD', P .. ':messages:' .. room, 'MAXLEN', '~', keep, id,
               's', next_position(room), 'e', entry)
  elseif kind == 'drop' then
    redis.call('DEL', P .. ':messages:' .. room)
    redis.call('HDEL', P .. ':positions', room)
    positions[room], positions_written[room] = nil, nil   -- (a say after it: from 1 again)
  end
  return id
end

if tonumber(ARGV[5]) > sent + 1 then   -- an earlier batch has not run: this one must not
  return redis.error_reply('GAP this node sent entry ' .. sent .. ', not ' .. ARGV[5] - 1)
end

local replies = {}
for i = 5, #ARGV, 7 do
  replies[#replies + 1] = append(tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
                                 ARGV[i + 4], ARGV[i + 5], ARGV[i + 6])
end
if done > sent then redis.call('HSET', P .. ':sent', node, done) end
if n ~= n_written then redis.call('SET', P .. ':n', n) end
for room, s in pairs(positions) do
  if s ~= positions_written[room] then redis.call('HSET', P .. ':positions', room, s) end
end
return replies
"""

# The chat's log format (PREFIX:format): what its nodes write. 2: an entry is one packed field;
# 3: an account holds login tokens (an account entry "token" or "untoken", which a node of
# format 2 would take for "unregister"). (Format 1, a field each, had no marker.) A node reads
# the formats of EARLIER_LOG_FORMATS too, and takes such a chat over (marks it with its own) once
# no node of another format holds a lease; a live one, or a chat marked with a format it does
# not know, and it refuses to start, rather than misread the log or have its entries misread.
LOG_FORMAT = 3
EARLIER_LOG_FORMATS = "1 2"   # (1: no marker)
FORMAT_SCRIPT = r"""
local P, format, me, earlier = ARGV[1], ARGV[2], ARGV[3], ' ' .. ARGV[4] .. ' '
local marked = redis.call('GET', P .. ':format')
if marked == format then return marked end
if marked and not string.find(earlier, ' ' .. marked .. ' ', 1, true) then return marked end
local nodes = redis.call('HGETALL', P .. ':nodes')
for i = 1, #nodes, 2 do   -- a live node whose entry names another format, or none: an earlier version
  local node, entry = nodes[i], nodes[i + 1]
  if node ~= me and not string.find(entry, '"format": ' .. format .. '}', 1, true)
      and redis.call('EXISTS', P .. ':lease:' .. node) == 1 then
    return 'running ' .. node
  end
end
redis.call('SET', P .. ':format', format)
return format
"""

RENEW_SCRIPT = r"""
if redis.call('GET', ARGV[1] .. ':lease:' .. ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('PEXPIRE', ARGV[1] .. ':lease:' .. ARGV[2], ARGV[4])
return 1
"""

# Every node whose lease has ended: its members leave (once: the node is forgotten with them).
REAP_SCRIPT = r"""
local P, me = ARGV[1], ARGV[2]
local reaped = 0
for _, node in ipairs(redis.call('HKEYS', P .. ':nodes')) do
  if node ~= me and redis.call('EXISTS', P .. ':lease:' .. node) == 0 then
    local conns = redis.call('HGETALL', P .. ':conns:' .. node)
    for i = 1, #conns, 2 do
      local owner = node .. '/' .. conns[i]
      for key in string.gmatch(conns[i + 1], '%S+') do
        if redis.call('HGET', P .. ':claims', key) == owner then
          redis.call('HDEL', P .. ':claims', key)
        end
      end
      local time = redis.call('TIME')
      local t = time[1] .. '.' .. string.format('%06d', time[2])
      local n = redis.call('INCR', P .. ':n')
      redis.call('XADD', P .. ':log', '*', 'e',      -- packed: no room, why "node gone"
                 n .. '\n' .. t .. '\nleave\n' .. owner .. '\n\nnode gone')
    end
    redis.call('DEL', P .. ':conns:' .. node)
    redis.call('HDEL', P .. ':nodes', node)
    reaped = reaped + 1
  end
end
return reaped
"""

# A snapshot replaces an older one only, and the log before it goes.
SNAPSHOT_SCRIPT = r"""
local P, n, id, data = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local old = tonumber(redis.call('HGET', P .. ':snapshot', 'n') or '0')
if n <= old then return 0 end
redis.call('HSET', P .. ':snapshot', 'n', n, 'id', id, 'data', data)
redis.call('XTRIM', P .. ':log', 'MINID', id)
return 1
"""


# Each kind's own fields in a packed entry, in their order; the room's name ("r", "" for none)
# first; the only one that may hold a "\n" last. A field that is None is left off the end
# (the text of /away or /topic: None is "back" or "cleared", "" an empty text).
ENTRY_FIELDS = {
    Entry.SAY: ("r", "nick", "b"),
    Entry.ACT: ("r", "nick", "x"),
    Entry.TOPIC: ("r", "x"),
    Entry.AWAY: ("r", "x"),
    Entry.JOIN: ("r", "nick", "acct", "addr"),
    Entry.RENAME: ("r", "nick", "acct", "addr"),
    Entry.LEAVE: ("r", "why", "tr", "tself"),
    Entry.MOVE: ("r", "to", "kh"),
    Entry.PRIVATE: ("r", "to", "x"),
    Entry.WAIT: ("r", "acct", "nick", "x"),
    Entry.ACCOUNT: ("r", "do", "key", "nick", "hash"),
    Entry.BAN: ("r", "ban"),
    Entry.UNBAN: ("r", "ban"),
    Entry.MUTE: ("r", "to", "mute"),
    Entry.UNMUTE: ("r", "key"),
    Entry.OPERATOR: ("r", "made", "key", "nick"),
    Entry.DROP: ("r",),
}


def pack_fields(values):
    """An entry's own fields (text; the last may be bytes), in ENTRY_FIELDS' order, as the one
    value the APPEND script takes. A "\n" in any but the last would shift the fields after it:
    a program error, refused here rather than written to the log."""
    *head, last = values
    for value in head:
        if "\n" in value:
            raise ValueError("a log entry's field other than its last holds a newline: %r"
                             % value)
    head = "\n".join(head).encode("utf-8")
    last = last if isinstance(last, bytes) else last.encode("utf-8")
    return head + b"\n" + last if values[:-1] else last


def unpack_entry(value):
    """A packed entry (the "e" field) as the fields of a stream entry of the versions before:
    a dict of names (text) to values (bytes), "n", "t", "k" and "o" included."""
    n, t, kind, owner, data = value.split(b"\n", 4)
    names = ENTRY_FIELDS.get(_FIELD_NAMES[kind], ("r",))
    fields = dict(zip(names, data.split(b"\n", len(names) - 1)))
    fields["n"], fields["t"], fields["k"], fields["o"] = n, t, kind, owner
    return fields


def stream_fields(values):
    """A stream entry's [name, value, ...] (of the log, or of a room's kept messages) as a dict,
    names as text, values as Redis gave them (bytes): packed ("e", last) or, written by a
    version before, a field each."""
    if len(values) >= 2 and values[-2] == b"e":
        fields = unpack_entry(values[-1])
        if len(values) > 2:      # (a kept message: its position "s" first)
            fields.update(zip(map(_FIELD_NAMES.__getitem__, values[:-2:2]), values[1:-2:2]))
        return fields
    # Built in C: the names are few, and decoded once each (_FieldNames).
    return dict(zip(map(_FIELD_NAMES.__getitem__, values[::2]), values[1::2]))


class ClusterStore(MemoryStore):
    """A node's store: the replica's memory of what the chat keeps (accounts, bans, rooms, who
    saw what, waiting messages), with each room's last ``window`` lines only, as the log applied
    made them; Redis has the rest (the kept messages, the snapshot), which /search asks for.
    Positions count each room's messages (the number Redis gives them too)."""

    answers_later = True

    def __init__(self, window, search):
        MemoryStore.__init__(self, keep=max(window, 1))
        self._search = search          # (room key, folded, count, done): Redis's answer

    def search(self, room_key, folded, count, done):
        self._search(room_key, folded, count, done)

    # -- the snapshot: the replica at one entry of the log ------------------------------------
    def dump(self):
        return {"rooms": [list(record) for record in self._rooms.values()],
                "positions": self._positions,
                "accounts": [[list(account), [alias for alias, owner in
                                              self._account_keys.items() if owner == key]]
                             for key, account in self._accounts.items()],
                "seen": [[account, room, position]
                         for (account, room), position in self._seen.items()],
                "waiting": {key: [line.decode("utf-8", "replace") for line in lines]
                            for key, lines in self._waiting.items()},
                "operators": self._operators,
                "bans": [list(ban) for ban in self._bans.values()],
                "mutes": [list(mute) for mute in self._mutes.values()]}

    def load(self, data):
        for record in data["rooms"]:
            self._rooms[record[0]] = RoomRecord(*record)
        self._positions.update(data["positions"])
        for account, keys in data["accounts"]:
            self.save_account(Account(*account), keys)
        for account, room, position in data["seen"]:
            self._seen[account, room] = position
        for key, lines in data["waiting"].items():
            self._waiting[key] = [line.encode("utf-8") for line in lines]
        self._operators.update(data["operators"])
        for ban in data["bans"]:
            self.save_ban(Ban(*ban))
        for mute in data["mutes"]:
            self.save_mute(Mute(*mute))

    def window(self, room_key, kept):
        """A room's last lines, as a starting node reads them: (position, line, text_size)."""
        self._messages[room_key] = collections.deque(kept, maxlen=self._keep)


def _json():
    """json, imported by a cluster's node only (a chat of one process does without it)."""
    import json
    return json


class TimerHandle:
    """A callback the loop calls later, unless cancelled first (the Redis client's timers)."""
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback):
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __call__(self, _):
        if not self.cancelled:
            self.callback()


def stream_id(text):
    """A stream entry's id ("1700000000000-3") as what orders it: (milliseconds, sequence)."""
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def cluster_text(value):
    """A stream field as text (Redis gives bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _FieldNames(dict):
    """Stream field names (bytes) -> text, each decoded once: the log's entries have a dozen
    names between them, so ``stream_fields`` finds them in this dict, in C."""

    def __missing__(self, name):
        text = cluster_text(name)
        if len(self) < 256:    # (names are the program's; a stranger's stream can't grow this)
            self[name] = text
        return text


_FIELD_NAMES = _FieldNames()


class ClusterNode:
    """This server as one node of a cluster: its lease, its two connections to Redis (one writes,
    one reads the log), the log applied to the room core, the reaper, the snapshots, and what
    happens while Redis is away.

    States: STARTING (loading the snapshot and the log), READY, PAUSED (Redis unreachable; the
    lease may still hold), LOST (the lease ended while away: members closed, starting again as
    a new node), STOPPED."""

    STARTING, READY, PAUSED, LOST, STOPPED = "starting", "ready", "paused", "lost", "stopped"

    def __init__(self, url, name=DEFAULT_CLUSTER, ca_file=None, keep=DEFAULT_KEEP):
        self.url = url
        self.prefix = name
        self.ca_file = ca_file
        self.keep = keep
        self.address = parse_redis_url(url)
        self.state = self.STARTING
        self.problem = None       # why it could not start (Redis unreachable), in words
        self.refused = False      # ... because of what Redis holds (another version's chat)
        self.started = False      # it has served: a refusal now stops the server, saying why
        self.server = None        # the Server, which calls ``attach`` once it has its chat
        self.chat = None
        self.identities = 0       # identities taken: a timer of an earlier one does nothing
        self.log_wait = LOG_WAIT  # see flush
        self._waiter = None       # (writer, reader, a selector on their sockets), for flush
        self._rest_until = 0.0    # no turn waits for its entries before this (monotonic)
        self._new_identity()

    def _new_identity(self):
        self.identities += 1
        self.node = os.urandom(6).hex()
        self.token = os.urandom(12).hex()
        self.last_id = "0-0"      # the last entry of the log applied
        self.last_n = 0           # and its number: the next must be one more
        self._conn_ids = 0
        self._op_ids = 0
        self.local = {}           # connection id -> Peer, of this node
        self.remote = {}          # "node/conn" -> Peer of another node
        self._in_flight = []      # appends sent and not yet answered (to send again)
        self._batch = []          # this turn's entries: [(their APPEND arguments, entry)]
        self._sent_in_turn = False  # a run of the script was sent earlier in this turn
        self._awaited = None      # the entries of the turn's last run of the script, unanswered
        self._own_last = None     # the log id of the last entry it added (None: it added none)
        self._awaiting = {}       # Peer -> the join or rename whose application it waits for
        self.lease_until = 0.0
        self._snapshot_due = time.monotonic() + SNAPSHOT_EVERY

    # -- starting -------------------------------------------------------------------------------
    def attach(self, server):
        """Called by the Server: the loop the links live in, and the room core to keep."""
        self.server = server
        self.chat = server.chat
        self.writer = RedisLink(server, self.address, self._writer_ready, self._writer_lost,
                                timeout=REDIS_DEADLINE, ca_file=self.ca_file)
        self.reader = None
        self._reading = False     # an XREAD is in flight on the reader

    def _writer_ready(self):
        if self.state in (self.STARTING, self.LOST):
            self._register()
        else:
            self._resume()

    def _register(self):
        """First the chat's log format (a node of another version must not serve it with this
        one), then the lease, this node's entry, and the snapshot to start from."""
        self.writer.evalsha(FORMAT_SCRIPT, (), (self.prefix, LOG_FORMAT, self.node,
                                                EARLIER_LOG_FORMATS), self._format_read)

    def _format_read(self, reply):
        if isinstance(reply, RedisError):
            return self._fail_start("Redis refused: %s" % reply.message)
        marked = cluster_text(reply)
        if marked == str(LOG_FORMAT):
            return self._register_node()
        if marked.startswith("running "):
            self._refuse_start("node %s of an earlier version serves it; stop every node, then"
                               " start this version" % marked[len("running "):])
        else:
            self._refuse_start("its nodes write log format %s and this chat_server writes %d;"
                               " every node of one chat runs the same version"
                               % (marked, LOG_FORMAT))

    def _refuse_start(self, problem):
        """What Redis holds rules this node out (not Redis unreachable): it does not start, or,
        starting again after a loss, the server stops (exit status 1), saying why."""
        if self.state != self.STARTING:
            return
        self.refused = True
        self.problem = problem
        if self.started:
            sys.stderr.write("chat_server: cannot serve the chat in Redis at %s: %s\n"
                             % (self.address.shown, problem))
            self.state = self.STOPPED
            self.server.stopping = True

    def _register_node(self):
        lease = self._key("lease:" + self.node)
        self.writer.send(("SET", lease, self.token, "PX", int(LEASE_SECONDS * 1000), "NX"),
                         self._checked)
        self.writer.send(("HSET", self._key("nodes"), self.node,
                          _json().dumps({"started": time.time(), "pid": os.getpid(),
                                         "format": LOG_FORMAT})),
                         self._checked)
        self.lease_until = time.monotonic() + LEASE_SECONDS
        self.writer.send(("HGETALL", self._key("snapshot")), self._snapshot_read)

    def _checked(self, reply):
        if isinstance(reply, RedisError):
            self._fail_start("Redis refused: %s" % reply.message)

    def _snapshot_read(self, reply):
        if isinstance(reply, RedisError):
            return self._fail_start("Redis refused: %s" % reply.message)
        fields = dict(zip(reply[::2], reply[1::2])) if reply else {}
        if fields:
            data = _json().loads(fields[b"data"])
            self.last_id, self.last_n = cluster_text(fields[b"id"]), int(fields[b"n"])
            self._restore(data)
            self._read_windows(data)
        self._read_log_after(self.last_id)

    def _restore(self, data):
        """The replica at the snapshot's entry: the store's tables, the rooms, who is where."""
        chat = self.chat
        chat.store.load(data["store"])
        chat.operators.update(key for key, _ in chat.store.operators())
        chat.bans.update(((ban.kind, ban.value), ban) for ban in chat.store.bans())
        chat.mutes.update((mute.key, mute) for mute in chat.store.mutes())
        chat._load_rooms()
        for name, ident, nick, account, away, address in data["members"]:
            peer = self._remote(ident, address)
            chat._named(peer, nick, account)
            peer.member = True
            peer.away = away
            room = chat.room_named(name) or chat._add_room(chat._new_room(name))
            chat._enter_room(peer, room)

    def _read_windows(self, data):
        """Each room's last lines, up to the snapshot's entry (the log after it adds the rest)."""
        window = self.chat.store._keep
        for record in data["store"]["rooms"]:
            key = record[0]
            self.writer.send(("XREVRANGE", self._key("messages:" + key), self.last_id, "-",
                              "COUNT", window),
                             lambda reply, key=key: self._window_read(key, reply))

    def _window_read(self, key, reply):
        if isinstance(reply, RedisError):
            return
        kept = []
        for _, values in reversed(reply):
            fields = stream_fields(values)
            line, size = self._message_line(fields)
            kept.append((int(fields["s"]), line, size))
        self.chat.store.window(key, kept)
        room = self.chat.room_named(self.chat.store._rooms[key].name) \
            if key in self.chat.store._rooms else None
        if room is not None:
            room.history.clear()
            room.history.extend(line for _, line, _ in kept[-self.chat.history_size:]
                                if self.chat.history_size)

    def _read_log_after(self, after):
        self.writer.send(("XRANGE", self._key("log"), "(" + after, "+", "COUNT", LOG_READ_COUNT),
                         self._log_caught_up)

    def _log_caught_up(self, reply):
        if isinstance(reply, RedisError):
            return self._fail_start("Redis refused: %s" % reply.message)
        for entry_id, values in reply:
            self._apply_one(cluster_text(entry_id), values)
        if len(reply) == LOG_READ_COUNT:
            return self._read_log_after(self.last_id)   # more: on, a batch at a time
        self._start_reading()
        self.state = self.READY
        self.started = True
        self.chat.paused = False
        self._schedule(LEASE_RENEW_EVERY, functools.partial(self._renew, self.identities))
        self._schedule(REAP_EVERY, functools.partial(self._reap, self.identities))

    def _fail_start(self, problem):
        """Redis refused a command of the start. The first start ends (the server exits 1,
        saying why); starting again after a loss, the node tries again in a moment, as a new
        node (a restarted Redis answers LOADING until its data is read: that must not leave a
        node that greets people and never lets them in)."""
        if self.state != self.STARTING:
            return
        if not self.started:
            self.problem = problem
            return
        sys.stderr.write("chat_server: starting again: %s; trying again\n" % problem)
        self.state = self.LOST
        self.server.cluster_lost()   # (what the attempt applied goes with the old room core)
        self._new_identity()
        self.state = self.STARTING
        self._schedule(REDIS_RECONNECT_MAX, functools.partial(self._register_again,
                                                               self.identities))

    def _register_again(self, identity):
        if identity == self.identities and self.state == self.STARTING and self.writer.ready:
            self._register()

    def _writer_lost(self, reason, unanswered):
        if self.state == self.STARTING and self.last_n == 0 and not self._in_flight:
            self.problem = reason   # (at start: the server exits, saying why)
            return
        self._in_flight[:0] = [command for command in unanswered
                               if command.script is not None]
        self._pause()

    # -- reading the log ------------------------------------------------------------------------
    def _start_reading(self):
        if self.reader is None:
            self.reader = RedisLink(self.server, self.address, self._read_more,
                                    self._reader_lost, timeout=REDIS_DEADLINE,
                                    ca_file=self.ca_file)
        elif self.reader.ready:
            self._read_more()

    def _read_more(self):
        if self.state in (self.STOPPED,) or self.reader is None or self._reading:
            return   # (None: lost, and starting again; _reading: one XREAD at a time, or a
        self._reading = True   # reconnect and a resume would each keep a chain of them going)
        self.reader.send(("XREAD", "COUNT", LOG_READ_COUNT, "BLOCK", LOG_READ_BLOCK_MS,
                          "STREAMS", self._key("log"), self.last_id), self._log_read)

    def _reader_lost(self, reason, unanswered):
        self._reading = False   # (its XREAD went with the connection)
        if self.state == self.READY:
            self._pause()

    def _log_read(self, reply):
        self._reading = False
        if isinstance(reply, RedisError):
            return self._pause()
        reader = self.reader
        for _, entries in reply or ():
            for entry_id, values in entries:
                self._apply_one(cluster_text(entry_id), values)
                if self.reader is not reader:
                    return   # (lost meanwhile: the replica starts again from a snapshot)
        if self.state in (self.READY, self.PAUSED, self.STARTING):
            self._read_more()

    def _apply_one(self, entry_id, values):
        """One entry of the log (its stream fields as Redis gave them), applied to the replica
        (in order: a gap, or a log that went back, means this node's replica can't be trusted:
        it starts again)."""
        if self.state == self.STOPPED:
            return
        if len(values) == 2 and values[0] == b"e":     # packed: see ENTRY_FIELDS
            n, t, kind, owner, data = values[1].split(b"\n", 4)
        else:                                           # the version before's: a field each
            fields = stream_fields(values)
            n, t, kind, data = fields["n"], fields["t"], None, None
        n = int(n)
        if n != self.last_n + 1 and self.last_n:
            if n <= self.last_n and stream_id(entry_id) <= stream_id(self.last_id):
                return   # read twice (an XREAD sent again after a reconnect): applied already
            return self._lose("the log of %s has a gap (%d after %d)"
                              % (self.address.shown, n, self.last_n))
        self.last_id, self.last_n = entry_id, n
        if kind == b"say":    # (nearly every entry: its fields split here, without a dict)
            room_name, _, body = data.split(b"\n", 2)
            entry = self._decode_say(owner, room_name, body)
        else:
            entry = self._decode(unpack_entry(values[1]) if data is not None else fields)
        if entry is None:
            return
        chat = self.chat
        chat.clock.pin(float(t))
        try:
            chat.apply(entry)
        finally:
            chat.clock.unpin()
        self._after_apply(entry)

    def _after_apply(self, entry):
        kind, _, peer, data = entry
        if peer.local and self._awaiting.get(peer) == kind:
            del self._awaiting[peer]
            self.chat.on_hold(peer, False)
            if peer.gone and peer.member:   # (its connection ended while it joined)
                self.chat.leave(peer, Reason.CLOSED)
        if kind == Entry.LEAVE and not peer.local:
            self.remote.pop(peer.ident, None)
        elif kind == Entry.LEAVE:
            self.local.pop(peer.ident.partition("/")[2], None)

    # -- entries: to the log and back -----------------------------------------------------------
    def append(self, entry):
        """The Chat's sequencer: the entry goes to Redis; it is applied when it comes back."""
        if self.state not in (self.READY, self.PAUSED):
            return
        kind, room, peer, data = entry
        claim = release = ""
        if kind in (Entry.JOIN, Entry.RENAME):
            claim = " ".join(nickname_keys(data[0]))
            if kind == Entry.RENAME:
                release = " ".join(key for key in nickname_keys(peer.nick)
                                   if key not in claim.split())
            self._awaiting[peer] = kind
            self.chat.on_hold(peer, True)
        elif kind == Entry.LEAVE:
            release = " ".join(nickname_keys(peer.nick))
        room_key = room.key if room is not None else ""
        if kind == Entry.DROP:
            room_key = room.key
        self._op_ids += 1
        self._batch.append(([self._op_ids, kind, peer.ident, claim, release, room_key,
                             self._encode(entry)], entry))
        if len(self._batch) >= APPEND_EARLY and self.state == self.READY and self.writer.ready:
            # A turn with many lines: Redis runs these while the node reads the rest, so
            # that the turn's wait for its entries (see flush) is for its last ones only.
            self._sent_in_turn = self._send_batch() or self._sent_in_turn
            self.writer.flush()

    def _send_batch(self):
        """The entries appended since the last run, in one run of the APPEND script (or, while
        Redis is away, kept to be sent when it is back). True if Redis has them to run."""
        sent = False
        while self._batch:
            batch, self._batch = self._batch[:APPEND_BATCH], self._batch[APPEND_BATCH:]
            args = [self.prefix, self.node, self.token, self.keep]
            for entry_args, _ in batch:
                args += entry_args
            entries = [entry for _, entry in batch]

            def answered(reply, entries=entries):
                self._batch_answered(entries, reply)
            if self.writer.ready and self.state == self.READY:
                self.writer.evalsha(APPEND_SCRIPT, (), args, answered)
                self._awaited, sent = entries, True
            else:
                self._in_flight.append(RedisCommand(("EVALSHA", "", 0) + tuple(args), answered,
                                                    APPEND_SCRIPT))
        return sent

    def _batch_answered(self, entries, reply):
        """Each entry's reply: its id (it comes back through the log, where it is applied and
        acknowledged), "again", or a refusal; or one error for all (the lease, a failure)."""
        if entries is self._awaited:   # (flush waits for the last one it added to come back)
            self._awaited = None
            self._own_last = None
            if isinstance(reply, list):
                for one in reversed(reply):
                    if isinstance(one, bytes) and one != b"again":
                        self._own_last = one
                        break
        if isinstance(reply, RedisError):
            # One error for all: the lease ended, or Redis could not run the script (busy with
            # another, loading, out of memory): none of them is known to be in the log, so
            # none is acknowledged; the node starts again (as when a command times out).
            if reply.code == "LEASE":
                return self._lose("the lease of this node has ended")
            return self._lose("Redis refused %d entries: %s" % (len(entries), reply))
        if not (isinstance(reply, list) and len(reply) == len(entries)):
            return self._lose("Redis answered %d entries with %r" % (len(entries), reply))
        for entry, one in zip(entries, reply):
            if isinstance(one, RedisError):
                self._refused(entry, one)

    def _refused(self, entry, reply):
        """One entry of a batch refused: a nickname claimed by someone else (BUSY KEY) is the
        only refusal the script makes of one entry alone."""
        kind, _, peer, data = entry
        if reply.code == "BUSY" and kind in (Entry.JOIN, Entry.RENAME):
            if peer.local:
                self._awaiting.pop(peer, None)
                self.chat.on_hold(peer, False)
                self.chat.notice(peer, Lines.NICK_BUSY.format(nick=data[0]))
        else:
            self._lose("Redis refused an entry (%s): %s" % (kind, reply))

    def _encode(self, entry):
        """The entry's own fields, packed (ENTRY_FIELDS; the peer goes in the script's own)."""
        kind, room, peer, data = entry
        room_name = room.name if room is not None else ""
        if kind == SAY:   # (nearly every entry: a room's name and a nickname never hold "\n")
            return b"\n".join((room_name.encode("utf-8"), peer.nick.encode("utf-8"), data))
        if kind == Entry.ACT:
            values = [room_name, peer.nick, data]
        elif kind in (Entry.TOPIC, Entry.AWAY):
            values = [room_name] if data is None else [room_name, data]
        elif kind in (Entry.JOIN, Entry.RENAME):
            values = [room_name, data[0], data[1] or "", peer.address]
        elif kind == Entry.LEAVE:
            values = [room_name, data[0], data[1] or "", data[2] or ""]
        elif kind == Entry.MOVE:
            values = [room_name, data[0], data[1] or ""]
        elif kind == Entry.PRIVATE:
            values = [room_name, data[0].ident, data[1]]
        elif kind == Entry.WAIT:
            values = [room_name, data[0], data[1], data[2]]
        elif kind == Entry.ACCOUNT:
            values = [room_name, data[0], data[1], data[2], data[3] or ""]
        elif kind in (Entry.BAN, Entry.UNBAN):
            values = [room_name, _json().dumps(list(data))]
        elif kind == Entry.MUTE:
            values = [room_name, data[0].ident, _json().dumps(list(data[1]))]
        elif kind == Entry.UNMUTE:
            values = [room_name, data]
        elif kind == Entry.OPERATOR:
            values = [room_name, "1" if data[0] else "", data[1], data[2]]
        else:
            values = [room_name]
        return pack_fields(values)

    def _decode(self, fields):
        """A log entry as the room core's tuple, its peers and rooms this node's objects."""
        kind = cluster_text(fields["k"])
        if kind == Entry.SAY:
            return self._decode_say(fields["o"], fields.get("r", b""), fields["b"])
        text = {name: cluster_text(value) for name, value in fields.items() if name != "b"}
        owner = text["o"]
        if kind == Entry.JOIN:
            peer = self._peer(owner) or self._remote(owner, text.get("addr", ""))
        else:
            peer = self._peer(owner)
        if peer is None:
            return None   # (an entry about a connection this replica never knew: none of ours)
        chat = self.chat
        room = peer.room if kind not in (Entry.JOIN, Entry.DROP) else chat.main
        if text.get("r") and kind in (Entry.SAY, Entry.ACT, Entry.TOPIC, Entry.DROP,
                                      Entry.MUTE):   # ("": none, in a packed entry)
            room = chat.room_named(text["r"])
            if room is None:
                return None
        if kind == Entry.SAY:
            data = fields["b"]
        elif kind in (Entry.ACT, Entry.TOPIC, Entry.AWAY):
            data = text.get("x")
        elif kind in (Entry.JOIN, Entry.RENAME):
            data = (text["nick"], text["acct"] or None)
        elif kind == Entry.LEAVE:
            # Applied once: a reaper's leave may follow the node's own. (Not peer.member: a
            # member of this node is no longer one from the moment it asked to leave.)
            if room is None or peer not in room.everyone:
                return None
            data = (text["why"], text.get("tr") or None, text.get("tself") or None)
        elif kind == Entry.MOVE:
            data = (text["to"], text["kh"] or None)
        elif kind == Entry.PRIVATE:
            target = self._peer(text["to"])
            if target is None:
                return None
            data = (target, text["x"])
        elif kind == Entry.WAIT:
            data = (text["acct"], text["nick"], text["x"])
        elif kind == Entry.ACCOUNT:
            data = (text["do"], text["key"], text["nick"], text["hash"] or None)
        elif kind in (Entry.BAN, Entry.UNBAN):
            values = _json().loads(text["ban"])
            data = Ban(*values) if kind == Entry.BAN else tuple(values)
        elif kind == Entry.MUTE:
            target = self._peer(text["to"])
            if target is None or not target.member:
                return None
            data = (target, Mute(*_json().loads(text["mute"])))
        elif kind == Entry.UNMUTE:
            data = text["key"]
        elif kind == Entry.OPERATOR:
            data = (bool(text["made"]), text["key"], text["nick"])
        else:
            data = None
        return (kind, room, peer, data)

    def _decode_say(self, owner, room_name, body):
        """A message, the entry nearly every one is (its owner, room name and text as Redis gave
        them): decoded without the general case's dict of every field as text."""
        peer = self._peer(cluster_text(owner))
        if peer is None:
            return None
        room = peer.room
        if room_name:    # ("": none)
            name = cluster_text(room_name)
            if room is None or room.name != name:   # (the same name: the same room)
                room = self.chat.room_named(name)
                if room is None:
                    return None
        return (Entry.SAY, room, peer, body)

    def _peer(self, ident):
        node, _, conn = ident.partition("/")
        if node == self.node:
            return self.local.get(conn)
        return self.remote.get(ident)

    def _remote(self, ident, address):
        peer = self.remote.get(ident)
        if peer is None:
            peer = self.remote[ident] = Peer(address, local=False)
            peer.ident = ident
        return peer

    def _message_line(self, fields):
        """A kept message (a stream entry of a room's messages) as its line, and its text's
        size."""
        ts = time.strftime("%Y-%m-%d %H:%M: ", time.localtime(float(fields["t"]))).encode()
        nick = cluster_text(fields["nick"])
        if cluster_text(fields["k"]) == Entry.SAY:
            body = fields["b"]
            return ts + SENT_HEAD.format(nick=nick).encode() + body + SENT_END, \
                len(body)
        text = cluster_text(fields["x"]).encode("utf-8")
        return ts + Lines.ACTION.format(nick=nick, text="").encode() + text + b"\n", len(text)

    def admitted(self, peer):
        """A new connection of this node: the name the log knows it by."""
        self._conn_ids += 1
        conn = str(self._conn_ids)
        peer.ident = "%s/%s" % (self.node, conn)
        self.local[conn] = peer

    def closed(self, peer):
        """A connection of this node ended before it joined (a member's leave does the rest:
        its peer stays known until the leave comes back through the log, or the leave would
        find nobody here, and the member would stay on this node's replica for good)."""
        if peer.room is None and peer not in self._awaiting:
            self.local.pop(peer.ident.partition("/")[2], None)

    # -- /search: the kept messages are Redis's -------------------------------------------------
    def search(self, room_key, folded, count, done):
        def read(reply):
            if isinstance(reply, RedisError):
                reply = []
            found = []
            for _, values in reversed(reply):
                fields = stream_fields(values)
                line, size = self._message_line(fields)
                if folded in text_of_line(line, len(line) - size - 1):
                    found.append(line)
            done(len(found), found[-count:] if count else [])
        if not self.writer.ready:
            return done(0, [])
        self.writer.send(("XREVRANGE", self._key("messages:" + room_key), "+", "-", "COUNT",
                          self.keep), read)

    # -- the lease, the reaper, the snapshots ---------------------------------------------------
    def _schedule(self, seconds, action):
        self.server.call_later(seconds, action)

    def _renew(self, identity):
        # (Only this identity's, READY or PAUSED: starting again, the writer may not be ready,
        # and the new identity's READY starts a chain of its own.)
        if identity != self.identities or self.state not in (self.READY, self.PAUSED):
            return
        self._schedule(LEASE_RENEW_EVERY, functools.partial(self._renew, identity))
        if self.state == self.PAUSED:
            return self._check_lease()
        sent = time.monotonic()

        def renewed(reply):
            if reply == 1:
                self.lease_until = sent + LEASE_SECONDS
            elif self.state == self.READY:
                self._lose("the lease of this node ended")
        self.writer.evalsha(RENEW_SCRIPT, (), (self.prefix, self.node, self.token,
                                               int(LEASE_SECONDS * 1000)), renewed)
        if time.monotonic() >= self._snapshot_due:
            self._snapshot_due = time.monotonic() + SNAPSHOT_EVERY
            self.write_snapshot()

    def _check_lease(self):
        """While away: before the lease can end, this node's members are closed (the reaper
        then frees their nicknames; never two nodes with one)."""
        if time.monotonic() >= self.lease_until - LEASE_MARGIN:
            self._lose("Redis was unreachable for longer than the lease")

    def _reap(self, identity):
        if identity != self.identities or self.state not in (self.READY, self.PAUSED):
            return
        self._schedule(REAP_EVERY, functools.partial(self._reap, identity))
        if self.state == self.READY:
            self.writer.evalsha(REAP_SCRIPT, (), (self.prefix, self.node), lambda reply: None)

    def write_snapshot(self):
        """This node's replica, as of the last entry applied, for nodes that start later."""
        data = {"store": self.chat.store.dump(),
                "members": [[peer.room.name, peer.ident, peer.nick, peer.account, peer.away,
                             peer.address]
                            for room in self.chat.room_list for peer in room.everyone]}
        self.writer.evalsha(SNAPSHOT_SCRIPT, (), (self.prefix, self.last_n, self.last_id,
                                                  _json().dumps(data)), lambda reply: None)

    # -- Redis away and back --------------------------------------------------------------------
    def _pause(self):
        if self.state == self.READY:
            self.state = self.PAUSED
            self.chat.paused = True
            self.server.cluster_paused(True)
        self._check_lease()

    def _resume(self):
        """The writer is back: if the lease still holds, what waited is sent, and on we go."""
        def renewed(reply):
            if reply != 1:
                return self._lose("the lease of this node ended while Redis was away")
            self.lease_until = sent + LEASE_SECONDS
            waiting, self._in_flight = self._in_flight, []
            for command in waiting:
                command.send_again(self.writer)
            self.state = self.READY
            self.chat.paused = False
            self.server.cluster_paused(False)
            self._start_reading()
        if self.state != self.PAUSED:
            return
        sent = time.monotonic()
        self.writer.evalsha(RENEW_SCRIPT, (), (self.prefix, self.node, self.token,
                                               int(LEASE_SECONDS * 1000)), renewed)

    def _lose(self, why):
        """This node's replica or lease can't be trusted: its connections are closed (the
        others' reaper appends their leaves) and it starts again as a new node."""
        if self.state in (self.LOST, self.STOPPED, self.STARTING):
            return
        self.state = self.LOST
        sys.stderr.write("chat_server: %s; closing this node's connections\n" % why)
        self.server.cluster_lost()
        self._new_identity()
        self.state = self.STARTING
        if self.reader is not None:
            self.reader.close()
            self.reader = None
            self._reading = False
        if self.writer.ready:
            self._register()

    def flush(self):
        """The loop's turn is over: its entries go out, in one command, with the rest; and
        the turn waits for them to come back (see _wait_for_own_entries)."""
        sent = self._send_batch() if self._batch else False
        sent, self._sent_in_turn = sent or self._sent_in_turn, False
        self.writer.flush()
        if self.reader is not None:
            self.reader.flush()
            if sent:
                self._wait_for_own_entries()

    def _wait_for_own_entries(self):
        """Wait, briefly, until the entries this turn added are back through XREAD and applied,
        so that the turn's writes carry their senders' echoes and their deliveries, as the
        server alone writes a turn's lines once its commit is done.

        Without it each line takes two turns at least, read in one, applied in another, and
        the members' lines are split between the turns: a write to each member every turn
        with half of a round of lines, twice the writes a line; and the node, Redis and the
        clients all run at once, waiting for each other's processor on a small machine.
        Redis runs a batch in well under a millisecond a few dozen entries, so the wait is
        short; it is bounded (``log_wait``), and after a wait in vain (a Redis far away, or
        too busy), no turn waits for LOG_WAIT_REST seconds: the entries are applied when they
        come, as ever (the wait changes when, never what, nor in what order)."""
        now = time.monotonic()
        if now < self._rest_until:
            return
        writer, reader = self.writer.connection, self.reader.connection
        if writer is None or reader is None:
            return
        waiter = self._waiter
        if waiter is None or waiter[0] is not writer or waiter[1] is not reader:
            self._close_waiter()
            selector = selectors.DefaultSelector()
            self._waiter = waiter = (writer, reader, selector)
            for connection in (writer, reader):
                selector.register(connection.socket, selectors.EVENT_READ, connection)
        selector = waiter[2]
        deadline = now + self.log_wait
        try:
            while (self.state == self.READY and writer.state is RedisState.READY
                   and reader.state is RedisState.READY):
                if self._awaited is None and (self._own_last is None or self._applied(
                        self._own_last)):
                    break
                buffered = [c for c in (writer, reader) if c.buffered()]
                if buffered:
                    ready = buffered
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._rest_until = time.monotonic() + LOG_WAIT_REST
                        break
                    ready = [key.data for key, _ in selector.select(left)]
                for connection in ready:
                    if connection.state is RedisState.READY:
                        connection.take_replies()
                if self.reader is None:
                    break   # (lost while applying: starting again)
                self.reader.flush()   # (the next XREAD, once one was answered)
        except Exception:
            print_traceback()   # (the connection is closed; the loop goes on, as with events)
        self.writer.flush()
        if self.reader is not None:
            self.reader.flush()

    def _applied(self, entry_id):
        """Whether the log has been applied up to ``entry_id`` (bytes, as Redis gave it)."""
        ms, _, seq = entry_id.partition(b"-")
        last_ms, _, last_seq = self.last_id.partition("-")
        return (int(last_ms), int(last_seq)) >= (int(ms), int(seq))

    def _close_waiter(self):
        if self._waiter is not None:
            self._waiter[2].close()
            self._waiter = None

    def stop(self):
        """A clean stop: this node's members' leaves are in the log, a snapshot written (the
        next node to start reads little of the log), its lease given back."""
        if self.state == self.READY:
            self._send_batch()   # (the members' leaves: before the lease is given back)
            self.write_snapshot()
            self.writer.send(("DEL", self._key("lease:" + self.node)), lambda reply: None)
            self.writer.send(("HDEL", self._key("nodes"), self.node), lambda reply: None)
        self.state = self.STOPPED

    def close(self):
        self._close_waiter()
        for link in (self.writer, self.reader):
            if link is not None:
                link.close()

    def _key(self, name):
        return "%s:%s" % (self.prefix, name)


# ---------------------------------------------------------------------------------------------
# The platform: its name, sockets, descriptors, addresses, tracebacks.
# ---------------------------------------------------------------------------------------------

# Shared with chat_client.py, which must have its own copy (each .pyz holds one module):
# keep the two identical; RepositoryTests fails when they drift.
def platform_name():
    """'windows' or 'posix'. CHAT_PLATFORM=windows lets the tests run the Windows paths on Linux."""
    forced = os.environ.get("CHAT_PLATFORM")
    if forced in ("windows", "posix"):
        return forced
    return "windows" if os.name == "nt" else "posix"



def print_traceback():
    """The exception being handled, on standard error (traceback is imported only then)."""
    import traceback
    traceback.print_exc(file=sys.stderr)


def release_unused_memory(collect=True):
    """Give the C heap's free pages back to the system (glibc's malloc_trim) once start-up is
    over: compiling this module, argparse, the data file's first reads and TLS leave about
    10 MiB of freed memory that glibc keeps for reuse and the server never needs again (and a
    join storm leaves more: see Timers._churned). Linux with glibc only; elsewhere nothing.
    Returns whether memory was trimmed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim   # (musl has none: AttributeError)
    except (ImportError, OSError, AttributeError):
        return False
    if collect:
        import gc
        gc.collect()
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


# macOS's numbers for the keepalive options Python names only from 3.10 (netinet/tcp.h).
MACOS_KEEPALIVE_OPTIONS = {"TCP_KEEPALIVE": 0x10, "TCP_KEEPINTVL": 0x101, "TCP_KEEPCNT": 0x102}


def tcp_option(name, named=socket, platform=sys.platform):
    """The socket option ``name`` as this platform numbers it, or None where it has none
    (``named``: what Python names, the socket module)."""
    option = getattr(named, name, None)
    if option is None and platform == "darwin":
        option = MACOS_KEEPALIVE_OPTIONS.get(name)
    return option


def tune_socket(sock, dead_peer=DEFAULT_DEAD_PEER):
    """Chat lines are small: no Nagle delay. A peer that vanished without a word (a laptop's
    lid, a pulled cable) is found within ``dead_peer`` seconds: keepalive probes after half of
    it idle, KEEPALIVE_PROBES of them over the other half; and, on Linux, TCP_USER_TIMEOUT for
    data sent and never acknowledged, which keepalive does not cover (it waits while any is).
    The idle time is TCP_KEEPIDLE on Linux and Windows 10 1709+, TCP_KEEPALIVE on macOS;
    older Windows takes idle and interval by ioctl (its 10 probes are fixed). Each option is
    set on its own: one a platform refuses loses only itself."""
    idle = max(1, int(dead_peer / 2))
    interval = max(1, int((dead_peer - idle) / KEEPALIVE_PROBES))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        return  # the connection may already be gone; reading it will tell
    idle_set = False
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPALIVE", idle),
                        ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", KEEPALIVE_PROBES),
                        ("TCP_USER_TIMEOUT", int(dead_peer * 1000))):
        option = tcp_option(name)
        if option is None:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            continue
        idle_set = idle_set or name in ("TCP_KEEPIDLE", "TCP_KEEPALIVE")
    if not idle_set and hasattr(socket, "SIO_KEEPALIVE_VALS"):   # older Windows, Wine
        try:   # (milliseconds)
            sock.ioctl(socket.SIO_KEEPALIVE_VALS,
                       (1, idle * 1000, max(1, int((dead_peer - idle) * 100))))
        except (OSError, ValueError):
            pass


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


# Shared with chat_client.py, which must have its own copy (each .pyz holds one module):
# keep the two identical; RepositoryTests fails when they drift.
def format_address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def is_loopback(host):
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    import ipaddress
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


# =============================================================================================
# The command line.
# =============================================================================================

# Shared with chat_client.py, which must have its own copy (each .pyz holds one module):
# keep the two identical; RepositoryTests fails when they drift.
class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr naming the option, exit status 2."""

    def error(self, message):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def typed(description, convert, valid):
    """An argparse type: ``convert`` the text, check ``valid``; else "'x' is not {description}"."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError("%r is not %s" % (text, description))
        return value
    parse.__name__ = description  # what argparse would name in its own messages
    return parse


port_number = typed("a port number (0 to 65535)", int, lambda v: 0 <= v <= 65535)
positive_int = typed("a whole number of at least 1", int, lambda v: v >= 1)
count = typed("a whole number of 0 or more", int, lambda v: v >= 0)
seconds = typed("a number of seconds (0 or more)", float, lambda v: v >= 0 and v != float("inf"))
rate = typed("a number of lines a second (0 or more)", float,
             lambda v: v >= 0 and v != float("inf"))


def nick_list(text):
    """--operators: nicknames separated by commas, each one a nickname."""
    nicks = [normalise_nickname(nick) for nick in text.split(",") if nick.strip()]
    for nick in nicks:
        problem = nickname_problem(nick)
        if problem:
            raise argparse.ArgumentTypeError("%r is not a nickname" % nick)
    return tuple(nicks)


def host_name(text):
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an address is needed, such as 127.0.0.1, 0.0.0.0 or ::1")
    return text


def parse_args(argv):
    parser = OneLineParser(
        prog="chat_server",
        description="Console chat server: people join with chat_client, nc or telnet.")
    parser.add_argument("--version", action="version", version="chat_server " + VERSION)
    parser.add_argument("--host", type=host_name, default=DEFAULT_HOST,
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
                        help="seconds to give the password and choose a nickname, 0 for no"
                             " limit (default 60)")
    parser.add_argument("--history", type=count, default=DEFAULT_HISTORY, metavar="N",
                        help="room lines a newcomer is shown on joining, 0 for none"
                             " (default %(default)s)")
    parser.add_argument("--dead-peer-timeout", type=seconds, default=DEFAULT_DEAD_PEER,
                        metavar="SECONDS",
                        help="a client that vanished without a word (a closed laptop, a pulled"
                             " cable) is found and disconnected within this time (default 90)")
    parser.add_argument("--data", metavar="PATH",
                        help="the SQLite file that keeps rooms, messages, accounts and bans across"
                             " restarts (default %s; :memory: keeps nothing after the server"
                             " stops)" % DEFAULT_DATA)
    parser.add_argument("--keep", type=count, default=DEFAULT_KEEP, metavar="N",
                        help="messages kept per room (default %(default)s)")
    parser.add_argument("--durable", action="store_true",
                        help="wait for the disk at every commit: nothing acknowledged is lost"
                             " even to a power cut (slower where flushes are slow)")
    parser.add_argument("--catch-up", type=count, default=DEFAULT_CATCH_UP, metavar="N",
                        help="lines of 'Messages since you left' a registered member is shown at"
                             " most (default %(default)s)")
    parser.add_argument("--operators", type=nick_list, default=(), metavar="NICK[,NICK...]",
                        help="registered nicknames that may kick, ban, mute, /op and /drop;"
                             " nobody can take these names from them")
    parser.add_argument("--redis", metavar="URL",
                        help="be one node of a cluster: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]"
                             " (rediss:// for TLS); the chat is kept in Redis, not in --data")
    parser.add_argument("--redis-ca", metavar="PEM",
                        help="the certificate authority that rediss:// checks Redis against"
                             " (default: the system's)")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, metavar="NAME",
                        help="the chat's name in Redis, the prefix of its keys (default"
                             " %(default)s): nodes with the same --redis and --cluster serve"
                             " one chat")
    parser.add_argument("--max-rooms", type=positive_int, default=DEFAULT_MAX_ROOMS, metavar="N",
                        help="rooms at once, #main included (default %(default)s)")
    parser.add_argument("--rate-limit", type=rate, default=DEFAULT_RATE_LIMIT, metavar="N",
                        help="lines a second each connection may send on average, 0 for no"
                             " limit (default 10)")
    parser.add_argument("--rate-burst", type=positive_int, default=DEFAULT_RATE_BURST,
                        metavar="N", help="lines a connection may send at once (default 50)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="ask newcomers for the password on this file's first line (or set"
                             " the environment variable CHAT_PASSWORD)")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="speak TLS with this certificate (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM",
                        help="the certificate's private key (default: in the --tls-cert file)")
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key: needs --tls-cert")
    if args.redis:
        try:
            parse_redis_url(args.redis)
        except ValueError as exc:
            parser.error("--redis: %s" % exc)
        if args.data is not None or args.durable:   # (said, not silently ignored)
            parser.error("--redis: a cluster keeps its memory in Redis, not in --data or"
                         " --durable's file")
    elif args.data is None:
        args.data = DEFAULT_DATA
    return args


def open_store(path, keep, durable, warn):
    """The store ``--data`` asks for: the SQLite file, or memory for ":memory:". Where the file
    can't be created (a read-only folder) or this Python has no sqlite3, memory, said once on
    standard error; a file that can't be used is a DataFileError (exit 1, the file untouched)."""
    if path == ":memory:":
        return MemoryStore(keep)
    try:
        import sqlite3  # noqa: F401  (some minimal Python builds have none)
    except ImportError:
        warn("this Python has no sqlite3 module: nothing is kept after the server stops")
        return MemoryStore(keep)
    try:
        store = SQLiteStore(path, keep, durable)
    except OSError as exc:
        warn("cannot create the data file %s: %s; nothing is kept after the server stops"
             % (os.path.abspath(path), getattr(exc, "strerror", None) or exc))
        return MemoryStore(keep)
    if store.opening_note:
        warn(store.opening_note)
    return store


def read_password(path, environ):
    """The password: the file's first line without its line ending, else CHAT_PASSWORD, else
    None. ValueError for an empty one (it would let anyone in while looking protected)."""
    if path:
        with open(path, encoding="utf-8-sig") as f:
            password = f.readline().rstrip("\r\n")
        source = "--password-file: %s" % path
    else:
        password = environ.get("CHAT_PASSWORD")
        source = "CHAT_PASSWORD"
        if password is None:
            return None
    if not password:
        raise ValueError("%s is empty: give a password, or none at all" % source)
    return password


def print_now(line):
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
    try:
        password = read_password(args.password_file, os.environ)
    except OSError as exc:
        warn("--password-file: cannot read %s: %s" % (args.password_file, exc.strerror or exc))
        return 1
    except UnicodeDecodeError:
        warn("--password-file: %s is not UTF-8 text" % args.password_file)
        return 1
    except ValueError as exc:
        warn(str(exc))
        return 1
    tls = fingerprint = None
    if args.tls_cert:
        try:
            tls = tls_context(args.tls_cert, args.tls_key)
            fingerprint = certificate_fingerprint(args.tls_cert)
        except RuntimeError as exc:
            warn(str(exc))
            return 1
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            warn("--tls-cert: cannot use %s%s: %s" % (
                args.tls_cert, " and " + args.tls_key if args.tls_key else "",
                describe_tls_file_error(exc, args.tls_cert, args.tls_key)))
            return 1
    raise_fd_limit()
    try:
        store = (open_store(args.data, args.keep, args.durable, warn) if not args.redis
                 else None)
    except DataFileError as exc:
        warn(str(exc))
        return 1
    try:
        log = open_log(args.log, args.log_file, args.syslog_address, warn)
    except OSError as exc:
        warn(str(exc))
        if store is not None:
            store.close()
        return 1
    try:
        cluster = (ClusterNode(args.redis, args.cluster, args.redis_ca, args.keep)
                   if args.redis else None)
    except (OSError, ValueError, RuntimeError) as exc:
        warn("cannot reach Redis at %s: %s" % (redact_redis_url(args.redis),
                                                 getattr(exc, "strerror", None) or exc))
        return 1
    if store is not None:
        store.log = log.record   # (the store says in the log when it can't write, and when)
    server = Server(args.host, args.port, log, max_clients=args.max_clients,
                    max_line_bytes=args.max_line_bytes, max_send_queue=args.max_send_queue,
                    join_timeout=args.join_timeout, history=args.history,
                    rate_limit=args.rate_limit, rate_burst=args.rate_burst,
                    password=password, tls=tls, dead_peer=args.dead_peer_timeout,
                    max_rooms=args.max_rooms, store=store, catch_up=args.catch_up,
                    operators=args.operators, cluster=cluster)
    if cluster is not None and not server.start_cluster():
        warn(("cannot serve the chat in Redis at %s: %s" if cluster.refused else
              "cannot reach Redis at %s: %s") % (cluster.address.shown, cluster.problem))
        server.close()
        return 1
    for nick in args.operators:
        if server.chat.store.account_for(nickname_keys(nick)) is None:
            warn('--operators: "%s" is not registered; it becomes an operator once it registers'
                 % nick)
    try:
        host, port = server.listen()
    except (OSError, UnicodeError) as exc:
        warn("cannot listen on %s: %s" % (format_address(args.host, args.port),
                                          getattr(exc, "strerror", None) or exc))
        server.close()
        return 1
    server.install_signal_handlers()
    address = format_address(host, port)
    print_now(Lines.LISTENING.format(address=address))
    if fingerprint:
        print_now(Lines.FINGERPRINT.format(fingerprint=fingerprint))
    print_now(Lines.READY)
    if tls is None and not is_loopback(args.host):
        warn((Lines.OPEN_TO_ALL if password is None else Lines.PASSWORD_IN_CLEAR)
             .format(address=address))
    log.record(server.chat.line(Lines.LOG_STARTED.format(address=address)))
    log.flush()
    release_unused_memory()
    try:
        server.serve_forever()
    finally:
        log.record(server.chat.line(Lines.LOG_STOPPED))
        server.close()
    # On a terminal, Ctrl-C left "^C" where the line would begin: start it over.
    print_now(("\r" if sys.stdout.isatty() else "") + Lines.STOPPED)
    return 1 if cluster is not None and cluster.refused else 0


# =============================================================================================
# Appendix: the tables of letters. Invisible ones, the scripts, and those that look alike.
# =============================================================================================

# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties.txt): invisible when rendered. The
# letters among them (the Hangul fillers) pass str.isalnum() and would make an invisible nickname.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)

# A letter's script is the first word of its Unicode name ("CYRILLIC SMALL LETTER A"); these
# words name the same script differently. (The standard library has no Script property.)
# Modifier letters belong to no alphabet of their own (the Hawaiian ʻokina in "Hawaiʻi").
SCRIPT_ALIASES = {"CJK": "HAN", "IDEOGRAPHIC": "HAN", "KATAKANA-HIRAGANA": "KATAKANA",
                  "MODIFIER": None}
# Scripts that one language writes together: Japanese, Korean.
SCRIPT_FAMILIES = (frozenset({"HAN", "HIRAGANA", "KATAKANA"}), frozenset({"HAN", "HANGUL"}))

# Letters of Cyrillic and Greek that look like Latin ones (from Unicode TR #39's confusables).
# Capitals and small letters apart, because a letter can look Latin in one case only: Cyrillic
# "В" looks like "B" but "в" does not look like "b"; Greek "Ν" looks like "N" but "ν" like "v".
LOOK_ALIKE_CAPITALS = {
    # Cyrillic
    "А": "A", "В": "B", "Е": "E", "Ѐ": "È", "Ё": "Ë", "Ѕ": "S", "І": "I", "Ї": "Ï", "Ј": "J",
    "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "У": "Y", "Х": "X",
    "Ү": "Y", "Һ": "H", "Ӏ": "I", "Ԛ": "Q", "Ԝ": "W", "Ӓ": "Ä", "Ӧ": "Ö", "Ь": "B", "Ѵ": "V",
    "Ԍ": "G",
    # Greek
    "Ϝ": "F", "Ϻ": "M", "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Ϊ": "Ï",
    "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Ϋ": "Ÿ", "Χ": "X",
    "Ϳ": "J",
}
LOOK_ALIKE_SMALL = {
    # Cyrillic
    "а": "a", "е": "e", "ѐ": "è", "ё": "ë", "ѕ": "s", "і": "i", "ї": "ï", "ј": "j", "о": "o",
    "р": "p", "с": "c", "у": "y", "х": "x", "ү": "y", "һ": "h", "ӏ": "l", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ӓ": "ä", "ӧ": "ö", "ӱ": "ÿ", "ь": "b", "г": "r", "ѵ": "v", "ѡ": "w", "ҽ": "e",
    "ꙇ": "i",
    # Digits that pass for letters (digits go with any alphabet)
    "0": "o", "1": "l",
    # Greek
    "α": "a", "γ": "y", "ι": "i", "ϊ": "ï", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "σ": "o",
    "τ": "t", "υ": "u", "ϋ": "ü", "χ": "x", "ω": "w", "ϳ": "j",
}
# (Not here: "ϒ", "ϲ", "Ϲ"; NFKC has made them "Υ", "ς", "Σ" before a skeleton is taken.)
# A capital I passes for a small l in most fonts: a skeleton of the name as written, before
# case is folded, catches "aIice" for "alice".
LOOK_ALIKE_AS_WRITTEN = {"I": "l", "Ӏ": "l", "Ι": "l"}
_CAPITALS = str.maketrans(LOOK_ALIKE_CAPITALS)
_SMALL = str.maketrans(LOOK_ALIKE_SMALL)
_AS_WRITTEN = str.maketrans(LOOK_ALIKE_AS_WRITTEN)


# The same ranges as one character class: a join checks a nickname in one C-level search.
INVISIBLE = re.compile("[%s]" % "".join("%s-%s" % (re.escape(chr(low)), re.escape(chr(high)))
                                        for low, high in DEFAULT_IGNORABLE))


if __name__ == "__main__":
    sys.exit(main())
