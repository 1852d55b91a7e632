"""End-to-end sending throughput, measured against a baseline in the same run.

    python bench/send.py [--messages 3000] [--json results.json] [--skip-limits]

The Bot API simulator runs as its own process (``tgrelay simulate``), so the relay and the
baseline each have a whole interpreter, and both talk to it over loopback HTTP.

1. No limits, no latency: messages accepted with ``send_many`` until every one is confirmed
   (persistence, dedup, actors, balancing and confirmation included), against a plain
   ``requests`` loop sending the same messages to the same simulator with the same
   concurrency (tokens x workers per token). Also with StatsD metrics on (to a local UDP
   socket that nobody reads) vs off.
2. Telegram's limits (30/s per bot, 1/s per chat) and 100 ms latency, distinct chats:
   10 tokens against 300 msg/s, then 30 tokens against 900 msg/s; sustained throughput and
   the relay's CPU per confirmed message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import tempfile
import threading
import time
from pathlib import Path

import requests
from loadlib.processes import SimulatorProcess

from actors.token import TokenSettings
from simulator import make_bots
from supervision import RelaySystem, parse_config

WORKERS = TokenSettings.__dataclass_fields__["workers"].default


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def relay_config(directory: Path, sim: SimulatorProcess, tokens: int, max_per_second: int,
                 statsd_port: int | None = None) -> str:
    pool = "".join(f'[[pools.default.tokens]]\nname = "t{index}"\ntoken = "{bot.token}"\n'
                   f"max_per_second = {max_per_second}\n"
                   for index, bot in enumerate(make_bots(tokens)))
    statsd = f'[statsd]\nhost = "127.0.0.1"\nport = {statsd_port}\n' if statsd_port else ""
    return (f'[store]\npath = "{directory / "relay.db"}"\narchive_path = ""\n'
            f'[telegram]\napi_base_url = "{sim.url}"\nper_chat_per_second = 1\n{statsd}'
            f"[pools.default]\n{pool}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_relay(directory: Path, sim: SimulatorProcess, tokens: int, count: int, max_per_second: int,
              statsd_port: int | None = None, first_chat: int = 1) -> dict[str, float]:
    """Accept ``count`` messages to distinct chats; time until every one is confirmed."""
    config = parse_config(relay_config(directory, sim, tokens, max_per_second, statsd_port), environ={})
    with RelaySystem.start(config) as relay:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        for first in range(0, count, 1000):
            relay.send_many([{"chat_id": first_chat + index, "text": f"bench {index}"}
                             for index in range(first, min(count, first + 1000))])
        while True:
            counts = relay.stats()["counts"]
            if counts["confirmed"] + counts["failed"] >= count:
                break
            time.sleep(0.02)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return {"msg_per_s": count / elapsed, "confirmed": counts["confirmed"], "failed": counts["failed"],
            "cpu_us_per_msg": cpu / count * 1e6, "elapsed_s": elapsed}


def run_plain_loop(sim: SimulatorProcess, tokens: int, count: int, concurrency: int,
                   first_chat: int) -> dict[str, float]:
    """The baseline: ``concurrency`` threads, each with a keep-alive session, no persistence."""
    secrets = [bot.token for bot in make_bots(tokens)]
    next_index = iter(range(count))
    lock = threading.Lock()

    def work() -> None:
        session = requests.Session()
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            answer = session.post(f"{sim.url}/bot{secrets[index % tokens]}/sendMessage",
                                  json={"chat_id": first_chat + index, "text": f"loop {index}"}, timeout=10)
            answer.raise_for_status()

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"msg_per_s": count / (time.perf_counter() - started)}


def no_limits(directory: Path, count: int, tokens: int = 2) -> dict[str, dict[str, float]]:
    sim = SimulatorProcess(directory, tokens, ["--no-limits"])
    try:
        concurrency = tokens * WORKERS
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        results = {
            "plain_requests_loop": run_plain_loop(sim, tokens, count, concurrency, 10_000_000),
            "tgrelay_metrics_off": run_relay(directory / "off", sim, tokens, count, 100_000),
            "tgrelay_metrics_on": run_relay(directory / "on", sim, tokens, count, 100_000,
                                            statsd_port=sink.getsockname()[1], first_chat=20_000_000),
        }
        sink.close()
        results["settings"] = {"tokens": tokens, "concurrency": concurrency, "messages": count}
        return results
    finally:
        sim.stop()


def with_limits(directory: Path, tokens: int, seconds: float) -> dict[str, float]:
    sim = SimulatorProcess(directory, tokens, ["--latency-ms", "100"])
    try:
        count = int(tokens * 30 * seconds)
        result = run_relay(directory, sim, tokens, count, 30)
        result["target_msg_per_s"] = tokens * 30
        result["share_of_target"] = result["msg_per_s"] / (tokens * 30)
        return result
    finally:
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=20, help="length of each limited run")
    parser.add_argument("--skip-limits", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="tgrelay-bench-") as temp:
        directory = Path(temp)
        for name in ("off", "on", "t10", "t30"):
            (directory / name).mkdir()
        free = no_limits(directory, args.messages)
        results["no_limits"] = free
        loop, off, on = (free[key]["msg_per_s"] for key in
                         ("plain_requests_loop", "tgrelay_metrics_off", "tgrelay_metrics_on"))
        print(f"machine: {results['machine']}")
        print(f"\nno limits, no latency, {free['settings']['messages']} messages, "
              f"{free['settings']['tokens']} tokens x {WORKERS} workers:")
        print(f"  plain requests loop:    {loop:8,.0f} msg/s")
        print(f"  tgrelay, metrics off:   {off:8,.0f} msg/s  ({off / loop:.2f}x the loop), "
              f"{free['tgrelay_metrics_off']['cpu_us_per_msg']:.0f} us CPU per message")
        print(f"  tgrelay, metrics on:    {on:8,.0f} msg/s  ({(on - off) / off:+.1%} vs off)")
        if not args.skip_limits:
            for tokens, name in ((10, "t10"), (30, "t30")):
                limited = with_limits(directory / name, tokens, args.seconds)
                results[f"limits_{tokens}_tokens"] = limited
                print(f"\nTelegram limits + 100 ms latency, {tokens} tokens: {limited['msg_per_s']:.1f} msg/s "
                      f"of {limited['target_msg_per_s']} ({limited['share_of_target']:.1%}), "
                      f"{limited['cpu_us_per_msg']:.0f} us CPU per message, "
                      f"{limited['failed']} failed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
