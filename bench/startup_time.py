#!/usr/bin/env python3
"""Start-up time of chat_server, from starting the process to "Server is ready for work!".

    python3 bench/startup_time.py OLD/chat_server.py chat_server.py [--runs 9]

Each server file is started RUNS times (`--port 0 --log off`, a new folder each, default data
file): with no bytecode cache (a copy of the file in that new folder, PYTHONDONTWRITEBYTECODE=1:
compiled at every start), then where it is, bytecode cache allowed (after the first start the
file's __pycache__ is used); prints the median and range of each. Standard library only.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def once(script, env, fresh_copy):
    folder = tempfile.mkdtemp(prefix="chat-startup-")
    if fresh_copy:   # (in a folder of its own: no __pycache__ from an earlier start)
        script = shutil.copy(script, folder)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, "--port", "0", "--log", "off"], cwd=folder,
                            stdout=subprocess.PIPE, env=env)
    for line in proc.stdout:
        if b"ready" in line:
            break
    elapsed = time.perf_counter() - start
    proc.terminate()
    proc.wait()
    proc.stdout.close()
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("servers", nargs="+")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    for cache in (False, True):
        env = dict(os.environ)
        if cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        else:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        for script in map(os.path.abspath, args.servers):
            times = [once(script, env, not cache) for _ in range(args.runs)]
            print("%-18s %s: median %.0f ms [%.0f-%.0f]"
                  % ("bytecode cache" if cache else "no bytecode cache", script,
                     1000 * statistics.median(times), 1000 * min(times), 1000 * max(times)))


if __name__ == "__main__":
    main()
