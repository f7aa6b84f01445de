#!/usr/bin/env python3
"""The cluster's cost, measured: chat_server nodes on a redis-server of its own; standard library.

    flock /tmp/bench.lock python3 bench/cluster_bench.py --max-steal 0.05 --max-others 0.05
    python3 bench/cluster_bench.py --only latency --runs 1 --seconds 1     # smoke
    python3 bench/cluster_bench.py --only node-vs-alone-100 --runs 1 --duration 10 \
        --profile /tmp/prof --py-spy /tmp/tools/bin/py-spy   # where a node's time goes

Issue 26's performance section, on this 2-core machine, one scenario at a time (--only):

  node-vs-alone-100  fanout-100-w1 of chat_bench.py (100 clients in #main, each keeping one
                     message in flight, driven by bench/chatload.c) against the server alone
                     ("alone": its defaults, the data file chat.db in the run's folder), the same
                     server with --redis on a redis-server without persistence ("redis"), and
                     with an append-only file ("redis-aof", appendfsync everysec, Redis's
                     default); alternated run by run. The target: redis / alone >= 0.7 of the
                     deliveries/s.
  two-nodes-100      the same 100 clients spread over two nodes of one Redis (clients alternate:
                     50 on each, one room), against one node with all 100: the deliveries/s of
                     the whole chat, and the CPU of each node, of redis-server and of the
                     generator.
  latency            one sender and one receiver in #main, the sender writing LATENCY_TEXT lines
                     at a steady --rate for --seconds: from a line's send to its delivery to the
                     receiver (p50, p99), and to its sender's echo ("Server: ok!" and echo: in a
                     cluster, once Redis has it). Both on the server alone ("alone"), both on one
                     node ("one node"), the sender on node A and the receiver on node B
                     ("across nodes").
  redis-commands     the commands Redis ran (INFO commandstats, read over a raw socket, the
                     commands scripts run counted too) per message, by name, for --messages
                     messages from one member of a room of 10 and of 100 members, on one node
                     and spread over two; each message waits for its echo and for every
                     delivery before the next goes. What Redis runs in the background (lease
                     renewals, the reaper, the readers' empty XREADs) is measured over an idle
                     stretch first and taken off. The count must not grow with the members.

What is reused from chat_bench.py: Server (each node, as users run it: a subprocess on a free
port, logging to a file, --rate-limit 0), LoadGen (the Python clients of the latency and
commands scenarios), build_chatload, Limits, measure_calmly and run (runs alternated, a run done
again while the machine is disturbed: --max-steal, --max-others), machine_shares, percentile.
Every redis-server is this script's own: a free port, a temporary folder, stopped after the run.
The fan-out drives every node and samples every process with one chatload (several ports and
several -p). Ratios are taken run by run (a round of the alternation), then their median.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import chat_bench  # noqa: E402  (its servers, clients, generator and calmness guards)
from chat_bench import free_port, proc_cpu, proc_rss  # noqa: E402

REDIS_START_DEADLINE = 20.0
LATENCY_TEXT = b"latency %d"      # the sender's lines, numbered
LATENCY_DELIVERED = re.compile(rb" sent latency (\d+)\n")
LATENCY_ECHOED = re.compile(rb"YOU SEND USERS latency (\d+)\n")
COMMAND_STAT = re.compile(r"^cmdstat_([^:]+):calls=(\d+)", re.M)


# ---------------------------------------------------------------------------------------------
# Redis: a redis-server of this script's own, and the few commands it sends it over a socket.
# ---------------------------------------------------------------------------------------------

def resp_command(*words):
    """A command in RESP, the way redis-cli sends it: an array of bulk strings."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode() if isinstance(word, str) else word
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_reply(sock):
    """One reply to a simple command: +status, -error, :integer or $bulk (all INFO and PING
    answer with). Returns bytes; an error raises RuntimeError."""
    data = b""
    while b"\r\n" not in data:
        data += _recv(sock)
    head, rest = data.split(b"\r\n", 1)
    kind, value = head[:1], head[1:]
    if kind == b"-":
        raise RuntimeError("redis: %s" % value.decode("utf-8", "replace"))
    if kind != b"$":
        return value
    size = int(value)
    while len(rest) < size + 2:
        rest += _recv(sock)
    return rest[:size]


def _recv(sock):
    chunk = sock.recv(65536)
    if not chunk:
        raise RuntimeError("redis closed the connection")
    return chunk


def redis_call(port, *words, timeout=5.0):
    """One command on a connection of its own; its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(resp_command(*words))
        return read_reply(sock)


def command_calls(port):
    """{command: calls so far} from INFO commandstats (lower case, "script|load" style names),
    without the INFO that asks."""
    text = redis_call(port, "INFO", "commandstats").decode()
    calls = {name: int(count) for name, count in COMMAND_STAT.findall(text)}
    calls.pop("info", None)
    return calls


def calls_between(before, after):
    return {name: after[name] - before.get(name, 0) for name in after
            if after[name] != before.get(name, 0)}


class RedisServer:
    """redis-server on a free port in a temporary folder, without RDB snapshots; with an
    append-only file (``appendonly``, fsync every second: Redis's default) or none."""

    def __init__(self, command="redis-server", appendonly=False):
        self.dir = tempfile.mkdtemp(prefix="cluster-bench-redis-")
        self.port = free_port()
        self.appendonly = appendonly
        argv = [command, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--dir", self.dir,
                "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def _wait_ready(self):
        end = time.monotonic() + REDIS_START_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited (%s): %s"
                                   % (self.proc.returncode, self.log_tail()))
            try:
                if redis_call(self.port, "PING", timeout=1) == b"PONG":
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > end:
                raise RuntimeError("redis-server did not answer on port %d" % self.port)
            time.sleep(0.05)

    def log_tail(self):
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-500:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A rig: what one run measures, a redis-server (or none) and its chat_server nodes.
# ---------------------------------------------------------------------------------------------

class Rig:
    """``nodes`` chat_server processes (chat_bench.Server: free port, log file, ``server_args``),
    with ``--redis`` on a fresh redis-server unless ``redis`` is None ("plain" or "aof"). It
    stands in for chat_bench's Server in measure_once: cpu_seconds() is every process's CPU (so
    that the machine's share used by others leaves Redis out), stop() stops them all, the nodes
    first. ``extra`` sets attributes the scenario reads (members, for redis-commands)."""

    def __init__(self, setup, nodes=1, redis=None, **extra):
        self.redis, self.nodes = None, []
        self.__dict__.update(extra)
        try:
            args = list(setup.server_args)
            if redis is not None:
                self.redis = RedisServer(setup.redis_command, appendonly=redis == "aof")
                args += ["--redis", self.redis.url]
            for _ in range(nodes):
                self.nodes.append(chat_bench.Server(server_args=args,
                                                    server_path=setup.server_path))
        except BaseException:
            self.stop()
            raise

    def processes(self):
        """[(label, pid)]: the nodes (node_a, node_b... or server alone), then redis."""
        if self.redis is None and len(self.nodes) == 1:
            named = [("server", self.nodes[0].proc.pid)]
        else:
            named = [("node_%s" % chr(ord("a") + i), node.proc.pid)
                     for i, node in enumerate(self.nodes)]
        if self.redis is not None:
            named.append(("redis", self.redis.proc.pid))
        return named

    def cpu_seconds(self):
        return sum(proc_cpu(pid) for _, pid in self.processes())

    def rss_bytes(self):
        return sum(proc_rss(pid) for _, pid in self.processes())

    def stop(self):
        for node in self.nodes:
            node.stop()
        if self.redis is not None:
            self.redis.stop()


# ---------------------------------------------------------------------------------------------
# The scenarios: each takes a running rig and returns its metrics (a flat dict of numbers).
# ---------------------------------------------------------------------------------------------

def run_chatload(chatload, rig, clients, window, warmup, duration):
    """chatload against every node of ``rig`` (clients alternate between them), sampling every
    process of the rig over the measured window. Its JSON line, parsed."""
    argv = [chatload, "-d", "chat", "-b", "500", "-j", "300"]
    for _, pid in rig.processes():
        argv += ["-p", str(pid)]
    argv += [",".join(str(node.port) for node in rig.nodes), str(clients), str(window),
             str(duration), str(warmup)]
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=300 + warmup + duration + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError("chatload did not finish: %s" % chat_bench.describe(argv)) from None
    if done.returncode != 0:
        raise RuntimeError("chatload exited %d: %s; node: %s" % (
            done.returncode, done.stderr.decode("utf-8", "replace").strip() or "(no message)",
            rig.nodes[0].stderr_text()[-300:]))
    return json.loads(done.stdout)


def scenario_fanout(rig, clients, window, warmup, duration, chatload, profile=None):
    """chat_bench's fanout-N-wW over the rig: the chat's deliveries/s, messages/s and round
    trip, and each process's share of a core over the window (cpu_server or cpu_node_a,
    cpu_node_b..., cpu_redis), with the machine's steal and others' shares. ``profile``
    (py-spy, folder): each chat_server process sampled by py-spy through the whole run."""
    spies = start_profiles(rig, profile, warmup + duration + 2) if profile else []
    calls0 = command_calls(rig.redis.port) if rig.redis else {}
    try:
        out = run_chatload(chatload, rig, clients, window, warmup, duration)
    finally:
        for spy in spies:
            spy.wait()
    calls = calls_between(calls0, command_calls(rig.redis.port)) if rig.redis else {}
    elapsed, deliveries = out["elapsed_s"], out["deliveries"]
    nan = float("nan")
    metrics = chat_bench.chatload_rates(out)
    ours = 0.0
    for (label, _), process in zip(rig.processes(), out["processes"]):
        cpu = process.get("cpu_s", nan)
        ours += cpu
        metrics["cpu_" + label] = cpu / elapsed
    metrics["cpu_all_servers"] = ours / elapsed
    metrics["cpu_us_per_delivery"] = ours / deliveries * 1e6 if deliveries else nan
    metrics["loadgen_cpu_share"] = out["loadgen_cpu_s"] / elapsed
    metrics.update(chat_bench.machine_shares(out["stat_before"], out["stat_after"],
                                             ours + out["loadgen_cpu_s"], out["clk_tck"]))
    if calls.get("evalsha"):
        # Over the whole run, joins included (100 against tens of thousands of messages): how
        # many log reads a node needed per message appended, i.e. how well they batch.
        metrics["xread_per_evalsha"] = calls.get("xread", 0) / calls["evalsha"]
    return metrics


def start_profiles(rig, profile, seconds):
    """py-spy record (raw folded stacks) of every chat_server process of the rig, for
    ``seconds``, into the folder as SCENARIO-LABEL-PROCESS-N.txt. Sampling pauses the process
    (py-spy's default): the run's figures are not the unprofiled ones."""
    py_spy, folder = profile
    spies = []
    for label, pid in rig.processes():
        if label == "redis":
            continue
        stem = re.sub(r"[^\w-]+", "_", "%s-%s-%s" % (rig.scenario, rig.label, label))
        number = 1
        while os.path.exists(os.path.join(folder, "%s-%d.txt" % (stem, number))):
            number += 1
        spies.append(subprocess.Popen(
            [py_spy, "record", "-f", "raw", "-d", str(int(seconds + 0.999)), "-p", str(pid),
             "-o", os.path.join(folder, "%s-%d.txt" % (stem, number))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def join_on(load, node, count):
    """``count`` more clients of ``load`` (one selector for all) joined through ``node``."""
    load.port = node.port
    load.join(count)
    return load.clients[-count:]


def scenario_latency(rig, rate, seconds, warmup):
    """From a line's send to its delivery to the receiver and to its sender's echo, at ``rate``
    lines a second: the sender on the first node, the receiver on the last one."""
    load = chat_bench.LoadGen(rig.nodes[0])
    try:
        sender = join_on(load, rig.nodes[0], 1)[0]
        receiver = join_on(load, rig.nodes[-1], 1)[0]
        sent, delivered, echoed = {}, {}, {}

        def on_lines(client, lines):
            now = time.perf_counter()
            pattern, seen = ((LATENCY_DELIVERED, delivered) if client is receiver
                             else (LATENCY_ECHOED, echoed))
            for number in pattern.findall(lines):
                seen[int(number)] = now

        count = int(rate * (warmup + seconds))
        start = time.perf_counter()
        for number in range(count):
            due = start + number / rate
            while time.perf_counter() < due:
                load.pump(max(due - time.perf_counter(), 0), on_lines)
            sent[number] = time.perf_counter()
            load.send(sender, LATENCY_TEXT % number + b"\n")
        end = time.perf_counter() + 5.0
        while (len(delivered) < count or len(echoed) < count) and time.perf_counter() < end:
            load.pump(0.1, on_lines)
        return latency_metrics(sent, delivered, echoed, int(rate * warmup), rate)
    finally:
        load.close()


def latency_metrics(sent, delivered, echoed, skip, rate):
    """p50/p99 in ms of the lines after the first ``skip`` (the warm-up), and those lost."""
    measured = [n for n in sent if n >= skip]
    to_receiver = [delivered[n] - sent[n] for n in measured if n in delivered]
    to_echo = [echoed[n] - sent[n] for n in measured if n in echoed]
    pct = chat_bench.percentile
    return {"lines": len(measured), "rate_per_s": rate,
            "delivery_p50_ms": pct(to_receiver, 0.50) * 1000,
            "delivery_p99_ms": pct(to_receiver, 0.99) * 1000,
            "delivery_max_ms": max(to_receiver) * 1000 if to_receiver else float("nan"),
            "echo_p50_ms": pct(to_echo, 0.50) * 1000,
            "echo_p99_ms": pct(to_echo, 0.99) * 1000,
            "not_delivered": len(measured) - len(to_receiver),
            "not_echoed": len(measured) - len(to_echo)}


def scenario_commands(rig, messages, idle):
    """The commands Redis ran per message, by name (``cmd_NAME``, per message), for ``messages``
    messages into a room of ``rig.members`` members spread over the rig's nodes (the sender on
    the first). The background rate is measured over ``idle`` seconds first and taken off."""
    load = chat_bench.LoadGen(rig.nodes[0])
    try:
        for i, node in enumerate(rig.nodes):  # the members alternate between the nodes
            share = len(range(i, rig.members, len(rig.nodes)))
            join_on(load, node, share)
        load.drain()
        port = rig.redis.port
        quiet0 = command_calls(port)
        time.sleep(idle)
        quiet1 = command_calls(port)
        background = calls_between(quiet0, quiet1)
        start = time.perf_counter()
        send_and_wait(load, load.clients[0], messages, rig.members - 1)
        elapsed = time.perf_counter() - start
        busy = calls_between(quiet1, command_calls(port))
    finally:
        load.close()
    return commands_metrics(busy, background, elapsed, idle, messages, rig.members)


def send_and_wait(load, sender, messages, others):
    """One message at a time: the next once the echo and every delivery of this one are in."""
    got = {"echoes": 0, "deliveries": 0}

    def on_lines(client, lines):
        got["echoes"] += lines.count(chat_bench.CHAT.done)
        got["deliveries"] += lines.count(chat_bench.CHAT.delivery)

    for number in range(messages):
        load.send(sender, chat_bench.MESSAGE)
        end = time.monotonic() + 10.0
        while got["echoes"] <= number or got["deliveries"] < (number + 1) * others:
            load.pump(0.5, on_lines)
            if time.monotonic() > end:
                raise RuntimeError("message %d: %d echoes, %d of %d deliveries" % (
                    number, got["echoes"], got["deliveries"], (number + 1) * others))


def commands_metrics(busy, background, elapsed, idle, messages, members):
    metrics = {"members": members, "messages": messages,
               "seconds_sending": elapsed,
               "background_per_s": sum(background.values()) / idle}
    total = 0.0
    for name in sorted(set(busy) | set(background)):
        net = busy.get(name, 0) - background.get(name, 0) * elapsed / idle
        metrics["cmd_" + name] = net / messages
        total += net
    metrics["commands_per_message"] = total / messages
    return metrics


# ---------------------------------------------------------------------------------------------
# Whom each scenario compares.
# ---------------------------------------------------------------------------------------------

class Setup:
    """The command line's choices; contenders(scenario) for chat_bench.run."""

    def __init__(self, args):
        self.server_path = os.path.abspath(args.server)
        self.server_args = (shlex.split(args.server_args) if args.server_args is not None
                            else chat_bench.default_server_args(self.server_path))
        self.redis_command = args.redis_server

    def rig(self, label, nodes=1, redis="plain", **extra):
        extra["label"] = label
        words = ["python3", os.path.relpath(self.server_path)] + self.server_args
        if redis is not None:
            words += ["--redis", "redis://127.0.0.1:PORT"]
        description = "%s%s%s" % (
            " ".join(words), "" if nodes == 1 else ", %d nodes" % nodes,
            {None: "", "plain": "; redis-server --save '' --appendonly no",
             "aof": "; redis-server --save '' --appendonly yes"}[redis])
        return chat_bench.Contender(
            label, lambda: Rig(self, nodes=nodes, redis=redis, **extra), description)

    def contenders(self, scenario):
        return [self.rig(label, scenario=scenario.name, **rig)
                for label, rig in CONTENDERS[scenario.name]]


# Per scenario, its contenders in the order they alternate: (label, Rig's keywords).
CONTENDERS = {
    "node-vs-alone-100": [("alone", {"redis": None}), ("redis", {}),
                          ("redis-aof", {"redis": "aof"})],
    "two-nodes-100": [("two nodes", {"nodes": 2}), ("one node", {})],
    "latency": [("alone", {"redis": None}), ("one node", {}), ("across nodes", {"nodes": 2})],
    "redis-commands": [("%d members, %d node%s" % (m, n, "s"[:n > 1]),
                        {"nodes": n, "members": m}) for n in (1, 2) for m in (10, 100)],
}


def scenarios(args, chatload):
    def fanout(rig):
        return scenario_fanout(rig, args.clients, 1, args.warmup, args.duration, chatload,
                               profile)
    profile = (args.py_spy, args.profile) if args.profile else None
    table = [
        chat_bench.Scenario("node-vs-alone-100", fanout, "cluster"),
        chat_bench.Scenario("two-nodes-100", fanout, "cluster"),
        chat_bench.Scenario("latency", lambda rig: scenario_latency(
            rig, args.rate, args.seconds, args.latency_warmup), "cluster"),
        chat_bench.Scenario("redis-commands", lambda rig: scenario_commands(
            rig, args.messages, args.idle), "cluster"),
    ]
    return {s.name: s for s in table}


# ---------------------------------------------------------------------------------------------
# The report: medians, the spread of the runs, and the ratios to the first column.
# ---------------------------------------------------------------------------------------------

def medians(samples):
    """Median per key over the runs, keys in the order the runs first have them; a key a run
    lacks (a command Redis ran in some runs only) counts 0 there."""
    keys = list(dict.fromkeys(key for sample in samples for key in sample))
    return {key: statistics.median(s.get(key, 0.0) for s in samples) for key in keys}


def spread(samples, key):
    values = [s.get(key, 0.0) for s in samples]
    return min(values), max(values)


def number(value):
    return "%.3f" % value if abs(value) < 1000 else "%.0f" % value


def report_scenario(name, by_label, failures, disturbed, runs):
    labels = list(by_label)
    table = {label: medians(samples) for label, samples in by_label.items()}
    keys = []
    for label in labels:
        keys += [k for k in table[label] if k not in keys]
    keys.sort(key=lambda k: (k.startswith("cmd_"),))
    print("\n%-22s" % name + "".join("  %-30s" % ("%s (n=%d)" % (label, len(by_label[label])))
                                     for label in labels))
    for key in keys:
        line = "  %-20s" % key
        for label in labels:
            samples = by_label[label]
            if key not in table[label]:
                line += "  %-30s" % "-"
                continue
            low, high = spread(samples, key)
            cell = "%s [%s-%s]" % (number(table[label][key]), number(low), number(high))
            line += "  %-30s" % cell
        print(line)
    for label in labels[1:]:
        print_ratio(by_label[labels[0]], by_label[label], labels[0], label)
    for label, errors in failures.get(name, {}).items():
        print("  FAILED %s: %d of %d runs; first: %s" % (label, len(errors), runs, errors[0]))
    for label, count in disturbed.get(name, {}).items():
        print("  DISTURBED %s: %d of %d runs kept over the limits" % (label, count, runs))
    print("JSON " + json.dumps({"scenario": name, "runs": by_label, "medians": table},
                               sort_keys=True))


def print_ratio(firsts, others, first, other, key="deliveries_per_s"):
    """other / first, run by run (the runs of one round alternate: the same machine state),
    the median of those and their spread; and the ratio of the medians."""
    pairs = [(a[key], b[key]) for a, b in zip(firsts, others) if key in a and key in b]
    if not pairs:
        return
    ratios = [chat_bench.ratio(b, a) for a, b in pairs]
    print("  ratio %s / %s, %s: %.3f run by run [%.3f-%.3f] (of the medians: %.3f)" % (
        other, first, key, statistics.median(ratios), min(ratios), max(ratios),
        chat_bench.ratio(statistics.median(b for _, b in pairs),
                         statistics.median(a for a, _ in pairs))))


def report(results, failures, disturbed, runs, setup, limits, command_line):
    print("# cluster_bench: %s" % command_line)
    print("# machine: %d cores, %s, Python %s; redis: %s; medians of %d runs [min-max]"
          % (os.cpu_count(), platform.platform(), platform.python_version(),
             redis_version(setup.redis_command), runs))
    print("# nodes: %s" % setup.rig("").description)
    print("# generator: bench/chatload.c (gcc -O2) for the fan-out; chat_bench.LoadGen "
          "(Python) for latency and redis-commands")
    guards = ", ".join("%s %s" % pair for pair in (("--max-steal", limits.max_steal),
                                                   ("--max-others", limits.max_others))
                       if pair[1] is not None)
    print("# cpu_*: share of one core over the measured window; machine shares per run%s"
          % (" (at most %s, runs done again up to %d times)" % (guards, limits.retries)
             if guards else ""))
    for name, by_label in results.items():
        report_scenario(name, by_label, failures, disturbed, runs)


def redis_version(command):
    return chat_bench.program_version([command, "--version"])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(CONTENDERS),
                        help="run only this scenario (repeatable; default all)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender (default 3)")
    parser.add_argument("--server", default=chat_bench.SERVER, metavar="PATH",
                        help="the chat_server.py to measure (default: this checkout's)")
    parser.add_argument("--server-args", metavar='"OPTIONS"',
                        help='chat_server options of every node and of the server alone, '
                             '--redis added to the nodes (default "--rate-limit 0")')
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server",
                        metavar="PATH", help="the redis-server to start (default: the PATH's)")
    parser.add_argument("--clients", type=int, default=100,
                        help="fan-out clients (default 100)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="fan-out seconds before measuring (default 1)")
    parser.add_argument("--duration", type=float, default=4.0,
                        help="fan-out seconds measured (default 4)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="latency: lines a second (default 200)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="latency: seconds measured (default 5)")
    parser.add_argument("--latency-warmup", type=float, default=0.5,
                        help="latency: seconds of lines sent first and not counted (default 0.5)")
    parser.add_argument("--messages", type=int, default=1000,
                        help="redis-commands: messages counted (default 1000)")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="redis-commands: idle seconds for the background (default 2)")
    parser.add_argument("--profile", metavar="FOLDER",
                        help="fan-out: record every chat_server process with py-spy into "
                             "FOLDER (raw folded stacks; profiled runs are slower: not for "
                             "the figures)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", metavar="PATH",
                        help="py-spy for --profile (default: the PATH's)")
    parser.add_argument("--max-steal", type=float, metavar="SHARE",
                        help="do a run again when the hypervisor stole more than this share")
    parser.add_argument("--max-others", type=float, metavar="SHARE",
                        help="wait for, and do a run again unless, other processes use at most "
                             "this share of the machine")
    parser.add_argument("--calm-wait", type=float, default=60.0, metavar="SECONDS",
                        help="with --max-others: how long to wait for calm (default 60)")
    parser.add_argument("--retries", type=int, default=3,
                        help="runs done again at most when disturbed (default 3)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if shutil.which(args.redis_server) is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="cluster-bench-")
    try:
        chatload, why_not = chat_bench.build_chatload(folder)
        if chatload is None:
            raise SystemExit("the fan-out needs bench/chatload.c built: %s" % why_not)
        setup = Setup(args)
        chat_bench.SCENARIOS.update(scenarios(args, chatload))  # chat_bench.run looks there
        limits = chat_bench.Limits(args.max_steal, args.max_others, args.retries,
                                   args.calm_wait)
        names = args.only or list(CONTENDERS)
        results, failures, disturbed = chat_bench.run(names, args.runs, setup, limits)
        report(results, failures, disturbed, args.runs, setup, limits, " ".join(
            ["python3", "bench/cluster_bench.py"]
            + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
