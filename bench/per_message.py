"""CPU per message at 10 members, in process: several chat_server.py files side by side, each
measured in alternation with the others (the minimum of many short blocks), so that a busy
shared machine moves them all alike. Standard library only.

    python3 bench/per_message.py core NAME=PATH[:VARIANT] ...   # the room core alone
    python3 bench/per_message.py loop NAME=PATH[:file] ...      # the whole loop turn

``core``: a Chat with 10 members; a turn is every member saying one line (``--per-turn=N``:
N of them), then take_pending() and each recipient's queue taken as if sent. No sockets, no
log file. VARIANT (for measuring only): ``noapply`` appends a message straight to apply_say,
``nokeep`` keeps nothing in the store.

``loop``: a real Server on 127.0.0.1 with 10 members on real sockets and a log file; a round is
``--senders=N`` members (10) sending one line each, then two loop turns (all of it handled and
written in the first), then the members' reads. Only the server's turns are timed, with
time.thread_time (the kernel's work in its reads and sends included). ``:file`` gives the
server a data file (SQLiteStore) instead of memory; version 2 has no store.
"""
import gc
import importlib.util
import os
import socket
import sys
import tempfile
import time

LINE = b"hello this is a benchmark message of some length, 00000"
BLOCKS = 40


def load(name, path):
    spec = importlib.util.spec_from_file_location("chat_server_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def core_case(srv, variant, per_turn):
    logged = []
    chat = srv.Chat(logged.append)
    peers = []
    for i in range(10):
        peer = srv.Peer("127.0.0.1:%d" % (1000 + i))
        chat.nickname_line(peer, b"user%d" % i)
        peers.append(peer)
    for peer in peers:
        peer.out.clear()
        peer._bytes = peer._counted = 0
    chat.take_pending()
    if "noapply" in variant:
        chat.append_say = chat.append = chat.apply_say
    if "nokeep" in variant:
        chat._keep_message = lambda key, line, size: 1
    senders, handle = peers[:per_turn], chat.member_line

    def turn():
        start = time.perf_counter()
        for peer in senders:
            handle(peer, LINE)
        for peer in chat.take_pending():
            data = peer.output()
            peer.sent(data, len(data))
        logged.clear()
        return time.perf_counter() - start
    return turn, per_turn


def loop_case(srv, variant, senders):
    folder = tempfile.mkdtemp()
    options = {"rate_limit": 0}
    if "store" in srv.Server.__init__.__code__.co_varnames:   # version 3
        options["store"] = (srv.SQLiteStore(os.path.join(folder, "chat.db")) if variant == "file"
                            else srv.MemoryStore())
    server = srv.Server("127.0.0.1", 0, srv.FileLog(os.path.join(folder, "chat.log")), **options)
    server.listen()
    port = server.listener.getsockname()[1]
    clients = []
    for i in range(10):
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        clients.append(client)
        for _ in range(20):
            server.run_once(0.01)
        client.sendall(b"user%d\n" % i)
        for _ in range(20):
            server.run_once(0.01)

    def drain():
        for client in clients:
            try:
                while client.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass
    drain()

    def turn():
        for client in clients[:senders]:
            client.send(LINE + b"\n")
        start = time.thread_time()
        server.run_once(0)
        server.run_once(0)
        spent = time.thread_time() - start
        drain()
        return spent
    return turn, senders


def main(argv):
    mode, count, cases = argv[0], 10, []
    for arg in argv[1:]:
        if arg.startswith(("--per-turn=", "--senders=")):
            count = int(arg.partition("=")[2])
    for arg in argv[1:]:
        if arg.startswith("--"):
            continue
        name, _, rest = arg.partition("=")
        path, _, variant = rest.partition(":")
        make = core_case if mode == "core" else loop_case
        cases.append((name,) + make(load(name, path), variant, count))
    gc.disable()   # (a collection in one block and not another is noise here)
    rounds = 2000 if mode == "core" else 200
    blocks = {name: [] for name, _, _ in cases}
    for _ in range(BLOCKS):
        for name, turn, messages in cases:
            spent = sum(turn() for _ in range(rounds))
            blocks[name].append(spent / (rounds * messages) * 1e6)
    for name, _, _ in cases:
        values = sorted(blocks[name])
        print("%-12s min %.2f  p25 %.2f  median %.2f  us a message" % (
            name, values[0], values[len(values) // 4], values[len(values) // 2]))


if __name__ == "__main__":
    main(sys.argv[1:])
