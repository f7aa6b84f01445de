"""/search in process: SQLiteStore.search timed in a room of 10,000 kept messages (a row each, as
a room at human pace commits them), for a word in 1% of them (tag007), in none (zebra) and in
all (quick), in two chat_server.py files side by side (built alike, alternated round by round).
Standard library only.

    python3 bench/search_cost.py BEFORE.py AFTER.py [--rounds 3] [--searches 50]

Prints each file's p50 and p99 per word, the medians of the rounds."""
import argparse
import importlib.util
import os
import shutil
import statistics
import tempfile
import time

TEXT = b"the quick brown fox jumps over the lazy dog"
WORDS = ("tag007", "zebra", "quick")


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(module, folder, messages=10000):
    store = module.SQLiteStore(os.path.join(folder, "chat.db"))
    for position in range(1, messages + 1):
        text = b"message %d tag%03d %s" % (position, position % 100, TEXT)
        store.keep("#main", b"2026-12-07 10:00: u%d sent " % (position % 10) + text + b"\n",
                   len(text))
        store.commit()
    return store


def timed(store, word, searches):
    times = []
    for _ in range(searches):
        start = time.perf_counter()
        store.search("#main", word, 20, lambda *found: None)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[max(int(len(times) * 0.99) - 1, 0)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--searches", type=int, default=50)
    args = parser.parse_args()
    folders, stores = [], []
    for index, path in enumerate(args.paths):
        folders.append(tempfile.mkdtemp(prefix="search-cost-"))
        stores.append(build(load(path, "chat_server_%d" % index), folders[-1]))
    results = {}
    for _ in range(args.rounds):
        for path, store in zip(args.paths, stores):
            for word in WORDS:
                results.setdefault((path, word), []).append(timed(store, word, args.searches))
    for (path, word), rounds in results.items():
        print("%s %-7s p50 %5.1f ms  p99 %5.1f ms" % (
            path, word, statistics.median(r[0] for r in rounds),
            statistics.median(r[1] for r in rounds)))
    for store, folder in zip(stores, folders):
        store.close()
        shutil.rmtree(folder, True)


if __name__ == "__main__":
    main()
