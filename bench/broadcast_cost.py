"""The cost of one line to every member, in process: N members of one room over loopback TCP,
a line queued to all, and the server's write of it (``Writing._flush_pending``) timed against a
bare loop of ``sock.send`` over the same sockets (what no server can go below: one ``send`` a
member). Standard library only; the members' clients are this process's own sockets, drained
between the timings, so nothing else runs meanwhile.

    python3 bench/broadcast_cost.py [--path chat_server.py] [--members 5000] [--lines 7]

Prints each line's two timings and their medians. 10,000 members need 20,000 descriptors
(``ulimit -n``).
"""
import argparse
import importlib.util
import socket
import statistics
import time

LINE = b"2026-12-07 15:00: u0 sent hello everyone\n"


def load(path):
    spec = importlib.util.spec_from_file_location("chat_server_measured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def join_all(chat_server, server, port, members):
    clients = []
    for n in range(members):
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        client.send(b"u%d\n" % n)
        clients.append(client)
        if n % 200 == 0:
            for _ in range(5):
                server.run_once(timeout=0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        joined = [conn for conn in server.conns.values() if conn.phase is chat_server.Phase.MEMBER]
        if len(joined) == members:
            return clients, joined
        server.run_once(timeout=0.01)
    raise SystemExit("only %d of %d joined" % (len(joined), members))


def drain(clients):
    for client in clients:
        try:
            while client.recv(1 << 16):
                pass
        except BlockingIOError:
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="chat_server.py")
    parser.add_argument("--members", type=int, default=5000)
    parser.add_argument("--lines", type=int, default=7)
    args = parser.parse_args()
    chat_server = load(args.path)
    server = chat_server.Server(port=0, rate_limit=0, history=0, max_clients=args.members + 10)
    port = server.listen()[1]
    clients, joined = join_all(chat_server, server, port, args.members)
    for _ in range(20):
        server.run_once(timeout=0)
    drain(clients)
    socks = [conn.sock for conn in joined]
    flushes, bare = [], []
    for _ in range(args.lines):
        server.chat.to_room(server.chat.main, LINE)
        start = time.perf_counter()
        server._flush_pending()
        flushes.append((time.perf_counter() - start) * 1e3)
        drain(clients)
        start = time.perf_counter()
        for sock in socks:
            sock.send(LINE)
        bare.append((time.perf_counter() - start) * 1e3)
        drain(clients)
        print("server's write %.1f ms   bare send loop %.1f ms" % (flushes[-1], bare[-1]))
    print("members %d: median server's write %.1f ms, bare send loop %.1f ms, ratio %.2f"
          % (args.members, statistics.median(flushes), statistics.median(bare),
             statistics.median(flushes) / statistics.median(bare)))
    server.close()


if __name__ == "__main__":
    main()
