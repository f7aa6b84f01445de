"""The cost of the data file's commit, in process: SQLiteStore.commit() timed (wall clock) over
many loop turns of a few lines each, into a new file in a temporary folder. Standard library only.

    python3 bench/commit_cost.py [--commits N] [--lines-per-commit K] [--path chat_server.py]

Prints the mean, median, p99 and worst commit, and how many times the loop folded the WAL in
itself (SQLiteStore._fold_wal_in: when the Checkpointer's thread could not finish).
"""
import argparse
import importlib.util
import os
import shutil
import tempfile
import time

LINE = b"2026-12-07 12:00: alice: hello there, a message of an ordinary size\n"


def load(path):
    spec = importlib.util.spec_from_file_location("chat_server_measured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(server, commits, lines_per_commit):
    folder = tempfile.mkdtemp(prefix="commit-cost-")
    try:
        store = server.SQLiteStore(os.path.join(folder, "chat.db"))
        folds = []
        if hasattr(store, "_fold_wal_in"):
            fold = store._fold_wal_in
            store._fold_wal_in = lambda: folds.append(1) or fold()
        times = []
        for _ in range(commits):
            for _ in range(lines_per_commit):
                store.keep("#main", LINE, 48)
            start = time.perf_counter()
            store.commit()
            times.append(time.perf_counter() - start)
        store.close()
    finally:
        shutil.rmtree(folder, True)
    times.sort()
    n = len(times)
    return {"mean_us": 1e6 * sum(times) / n, "median_us": 1e6 * times[n // 2],
            "p99_us": 1e6 * times[int(n * 0.99)], "worst_ms": 1e3 * times[-1],
            "loop_folds": len(folds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=20000)
    parser.add_argument("--lines-per-commit", type=int, default=3)
    parser.add_argument("--path", default=os.path.join(os.path.dirname(os.path.abspath(
        __file__)), "..", "chat_server.py"))
    args = parser.parse_args()
    result = measure(load(args.path), args.commits, args.lines_per_commit)
    print("commits %d, %d lines each: mean %.1f us, median %.1f us, p99 %.1f us, worst %.1f ms,"
          " folded by the loop %d times" % (args.commits, args.lines_per_commit,
                                             result["mean_us"], result["median_us"],
                                             result["p99_us"], result["worst_ms"],
                                             result["loop_folds"]))


if __name__ == "__main__":
    main()
