#!/usr/bin/env python3
"""Terminal client for the console chat (chat_server.py, or any server of ../shared/PROTOCOL.md).

* POSIX: one thread, one selectors loop over the socket and standard input. On a terminal, GNU
  readline's callback interface gives line editing and history inside that loop, and a line that
  arrives while you type is printed above your input, which is then redrawn intact.
* Windows, or wherever standard input cannot be selected: a daemon thread reads standard input and
  sends it; the main thread reads the socket and prints.
* Standard input not a terminal (a pipe, a file): every line is sent; at its end the socket is
  half-closed and the client prints what the server still sends until it closes.

Whatever the server sends is made harmless before it reaches the screen: invalid UTF-8 becomes
U+FFFD, control characters are shown as ^X, so no escape sequence from the wire reaches the
terminal. Standard library only, Python 3.8 or newer: zipped alone into chat_client.pyz.
"""

import argparse
import os
import re
import selectors
import socket
import sys
import threading

VERSION = "2.0.0"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
PROMPT = "> "
READ_SIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0
MAX_UNSENT = 256 * 1024  # stop reading stdin while this much typed or piped input is unsent

CLOSED_BY_SERVER = "Connection closed by the server."
CANNOT_CONNECT = "Cannot connect to {address}: {reason}."
REFUSED_HINT = " Is the server running?"

# Control characters (C0 but TAB, DEL, C1) are shown in caret or \x notation instead.
CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _visible(match):
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7f:
        return "^?"
    return "\\x%02x" % code


def render(raw):
    """Bytes of one line from the wire -> text that is safe to print on a terminal."""
    return CONTROL_CHARS.sub(_visible, raw.decode("utf-8", "replace"))


def platform_name():
    """'windows' or 'posix'. CHAT_PLATFORM=windows lets the tests run the Windows paths on Linux."""
    forced = os.environ.get("CHAT_PLATFORM")
    if forced in ("windows", "posix"):
        return forced
    return "windows" if os.name == "nt" else "posix"


def format_address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class ClientExit(Exception):
    """Ends the client: ``message`` (if any) goes to stderr, ``status`` is the exit status."""

    def __init__(self, status, message=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


def connect(host, port):
    address = format_address(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except ConnectionRefusedError as exc:
        raise ClientExit(1, CANNOT_CONNECT.format(address=address, reason=exc.strerror)
                         + REFUSED_HINT)
    except socket.timeout:
        raise ClientExit(1, CANNOT_CONNECT.format(address=address, reason="timed out"))
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ClientExit(1, CANNOT_CONNECT.format(address=address, reason=reason))
    sock.settimeout(None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


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


# ---------------------------------------------------------------------------------------------
# Screens: how a received line is shown.
# ---------------------------------------------------------------------------------------------

class PlainScreen:
    """Prints lines as they come (a pipe, or a terminal without readline)."""

    def show(self, text):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def close(self):
        pass


class Readline:
    """GNU readline's callback interface, from the library the ``readline`` module loaded.

    CPython's module offers no callback API, so the few functions it lacks are bound with ctypes;
    ``load()`` returns None where anything is missing (no readline, libedit without them), and
    the client then reads plain lines instead."""

    NEEDED = ("rl_callback_handler_install", "rl_callback_read_char",
              "rl_callback_handler_remove", "rl_save_prompt", "rl_restore_prompt",
              "rl_replace_line", "rl_redisplay", "rl_forced_update_display")

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
        self.point = ctypes.c_int.in_dll(lib, "rl_point")
        self.line_buffer = ctypes.c_char_p.in_dll(lib, "rl_line_buffer")
        # Ctrl-C must reach Python as KeyboardInterrupt, not readline's own handler.
        ctypes.c_int.in_dll(lib, "rl_catch_signals").value = 0
        try:
            ctypes.c_int.in_dll(lib, "rl_catch_sigwinch").value = 0
        except ValueError:
            pass
        self._free = ctypes.CDLL(None).free
        self._free.argtypes = [ctypes.c_void_p]
        self._callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        self._callback = None
        self.lines = []   # completed lines, None for end of input (Ctrl-D)

    def install(self, prompt):
        def on_line(pointer):
            if pointer is None:
                self.lines.append(None)
                return
            raw = self.ctypes.string_at(pointer)
            self._free(pointer)  # readline hands the line over; it is ours to free
            line = raw.decode("utf-8", "replace")
            if line.strip():
                # Here, not later: readline moves its history position to the end as soon as
                # this callback returns, and Up must find this line.
                self.module.add_history(line)
            self.lines.append(line)
        self._callback = self._callback_type(on_line)  # kept referenced while installed
        self.lib.rl_callback_handler_install(prompt.encode(), self._callback)

    def read_char(self):
        self.lib.rl_callback_read_char()

    def remove(self):
        self.lib.rl_callback_handler_remove()  # also puts the terminal back as it was

    def print_above(self, text):
        """Print a line above the prompt and redraw the prompt with the half-typed input."""
        lib = self.lib
        saved_line = self.line_buffer.value or b""
        saved_point = self.point.value
        lib.rl_save_prompt()
        lib.rl_replace_line(b"", 0)
        lib.rl_redisplay()               # the input line is now empty on screen
        sys.stdout.write("\r" + text + "\n")
        sys.stdout.flush()
        lib.rl_restore_prompt()
        lib.rl_replace_line(saved_line, 0)
        self.point.value = saved_point
        lib.rl_forced_update_display()   # prompt and input again, cursor where it was


class ReadlineScreen:
    def __init__(self, readline):
        self.readline = readline

    def show(self, text):
        self.readline.print_above(text)

    def close(self):
        self.readline.remove()
        sys.stdout.write("\r\x1b[K")  # wipe the prompt readline redrew; the shell's comes next
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# POSIX: one thread, one selectors loop.
# ---------------------------------------------------------------------------------------------

class SelectClient:
    """The socket and standard input in one selectors loop."""

    def __init__(self, sock, stdin_fd, readline=None):
        self.sock = sock
        self.stdin_fd = stdin_fd
        self.readline = readline
        self.screen = ReadlineScreen(readline) if readline else PlainScreen()
        self.selector = selectors.DefaultSelector()
        self.incoming = LineSplitter()
        self.unsent = b""
        self.input_done = False       # stdin ended: the socket is (or will be) half-closed
        self.last_input_byte = b"\n"  # a piped last line without \n gets one at the end
        self.stdin_watched = False
        self.sock_mask = 0

    def run(self):
        self.sock.setblocking(False)
        if self.readline:
            self.readline.install(PROMPT)
        try:
            self._watch_stdin(True)
            self._update_socket()
            while True:
                for key, events in self.selector.select():
                    if key.fileobj is self.sock:
                        if events & selectors.EVENT_WRITE:
                            self._send_unsent()
                        if events & selectors.EVENT_READ:
                            self._receive()
                    else:
                        self._read_stdin()
                self._update_socket()
        finally:
            self.screen.close()
            self.selector.close()

    # -- the socket -----------------------------------------------------------------------------
    def _receive(self):
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._show_lines(self.incoming.rest())
            raise ClientExit(1, "Connection lost: %s." % (exc.strerror or exc))
        if not data:
            self._show_lines(self.incoming.rest())
            # After our own end of input the server closing is the expected end: no message.
            raise ClientExit(0, None if self.input_done and not self.readline
                             else CLOSED_BY_SERVER)
        self._show_lines(self.incoming.feed(data))

    def _show_lines(self, lines):
        for line in lines:
            self.screen.show(render(line))

    def _send_unsent(self):
        try:
            sent = self.sock.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ClientExit(1, "Connection lost: %s." % (exc.strerror or exc))
        self.unsent = self.unsent[sent:]
        if not self.unsent and self.input_done:
            self._half_close()

    def _half_close(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _update_socket(self):
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.unsent else 0)
        if mask != self.sock_mask:
            if self.sock_mask:
                self.selector.modify(self.sock, mask)
            else:
                self.selector.register(self.sock, mask)
            self.sock_mask = mask
        self._watch_stdin(not self.input_done and len(self.unsent) < MAX_UNSENT)

    def _queue(self, data):
        self.unsent += data
        self._send_unsent()

    # -- standard input -------------------------------------------------------------------------
    def _watch_stdin(self, on):
        if on != self.stdin_watched:
            if on:
                self.selector.register(self.stdin_fd, selectors.EVENT_READ)
            else:
                self.selector.unregister(self.stdin_fd)
            self.stdin_watched = on

    def _read_stdin(self):
        if self.readline:
            self.readline.read_char()
            for line in self.readline.lines:
                if line is None:
                    raise ClientExit(0)  # Ctrl-D on an empty line: leave quietly
                self._queue(line.encode("utf-8", "replace") + b"\n")
            del self.readline.lines[:]
            return
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self._queue(data)
            self.last_input_byte = data[-1:]
            return
        # End of input: finish the last line, half-close once everything is sent.
        self.input_done = True
        if self.last_input_byte != b"\n":
            self.unsent += b"\n"
        if not self.unsent:
            self._half_close()
        self._watch_stdin(False)


# ---------------------------------------------------------------------------------------------
# Windows (and unselectable stdin): a thread reads standard input.
# ---------------------------------------------------------------------------------------------

class ThreadedClient:
    """The main thread reads the socket and prints; a daemon thread reads stdin and sends."""

    def __init__(self, sock, stdin=None):
        self.sock = sock
        self.stdin = stdin or sys.stdin
        self.screen = PlainScreen()
        self.input_done = threading.Event()

    def _pump_stdin(self):
        try:
            for line in iter(self.stdin.readline, ""):
                if not line.endswith("\n"):
                    line += "\n"
                self.sock.sendall(line.encode("utf-8", "replace"))
        except (OSError, ValueError):  # the main thread closed the socket, or stdin: just stop
            pass
        finally:
            self.input_done.set()
            try:
                self.sock.shutdown(socket.SHUT_WR)  # Ctrl-Z Enter / end of pipe: we are done
            except OSError:
                pass

    def run(self):
        threading.Thread(target=self._pump_stdin, name="stdin", daemon=True).start()
        incoming = LineSplitter()
        # A timeout, so that Ctrl-C (KeyboardInterrupt) is seen even while nothing arrives.
        self.sock.settimeout(0.25)
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except socket.timeout:
                continue
            except OSError as exc:
                raise ClientExit(1, "Connection lost: %s." % (exc.strerror or exc))
            lines = incoming.feed(data) if data else incoming.rest()
            for line in lines:
                self.screen.show(render(line))
            if not data:
                raise ClientExit(0, None if self.input_done.is_set() else CLOSED_BY_SERVER)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def port_number(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 1 to 65535")
    return value


def parse_args(argv):
    parser = OneLineParser(prog="chat_client",
                           description="Terminal client for the console chat.")
    parser.add_argument("--version", action="version", version="chat_client " + VERSION)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="server address (default %(default)s)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="server port (default %(default)s)")
    return parser.parse_args(argv)


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


def make_client(sock):
    if not stdin_is_selectable():
        return ThreadedClient(sock)
    readline = Readline.load() if sys.stdin.isatty() and sys.stdout.isatty() else None
    return SelectClient(sock, sys.stdin.fileno(), readline)


def configure_stdio():
    """UTF-8 on standard input and output unless they are a console, as on the wire.

    A pipe or a file on Windows uses the ANSI code page (cp1252 and the like), so piped Cyrillic
    was sent as mojibake and printed as '????'. A console (or a POSIX terminal) keeps the
    encoding Python chose for it: on Windows that is the console's own Unicode I/O. A character
    that cannot be shown becomes '?' instead of ending the client; invalid UTF-8 piped in, U+FFFD.
    """
    for stream in (sys.stdin, sys.stdout):
        try:
            if stream.isatty():
                if stream is sys.stdout:
                    stream.reconfigure(errors="replace")
            else:
                stream.reconfigure(encoding="utf-8", errors="replace")
        except (AttributeError, ValueError, OSError):
            pass  # no such stream (pythonw), or one replaced by something that is not text I/O


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_stdio()
    try:
        sock = connect(args.host, args.port)
        try:
            make_client(sock).run()
        finally:
            sock.close()
    except ClientExit as done:
        if done.message:
            sys.stderr.write(done.message + "\n")
        return done.status
    except KeyboardInterrupt:
        return 0  # Ctrl-C: leave quietly
    return 0


if __name__ == "__main__":
    sys.exit(main())
