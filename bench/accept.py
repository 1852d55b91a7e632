"""Durable acceptance, measured: tgrelay vs persist-queue's SQLiteAckQueue in one run.

    python bench/accept.py [--messages 20000] [--json results.json]

Every figure is with ``synchronous=full`` on a fresh SQLite file in a temporary directory.
Measured:
  * sequential ``send()``: p50/p99 latency and msg/s;
  * ``send()`` from 16 threads: msg/s (group commit shares one fsync among waiting callers);
  * ``send_many`` in batches of 500: msg/s;
  * HTTP ``POST /v1/messages/batch`` (500 a request) over keep-alive: msg/s;
  * baseline: persist-queue ``SQLiteAckQueue`` put + get + ack per message, 1 and 16 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from supervision import RelaySystem, parse_config

THREADS = 16
BATCH = 500


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def relay_in(directory: Path, name: str) -> RelaySystem:
    config = parse_config(f'[store]\npath = "{directory / name}.db"\narchive_path = ""\nsynchronous = "full"\n'
                          f'[http]\nlisten = "127.0.0.1:0"\n'
                          f'[pools.default]\n[[pools.default.tokens]]\nname = "bench"\n'
                          f'token = "123456789:{"B" * 35}"\n', environ={})
    return RelaySystem.start(config, send=False)


def in_threads(count: int, per_thread: int, work: Callable[[int, int], None]) -> float:
    barrier = threading.Barrier(count + 1)

    def run(worker: int) -> None:
        barrier.wait()
        for index in range(per_thread):
            work(worker, index)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def bench_sequential(directory: Path, count: int) -> dict[str, float]:
    with relay_in(directory, "sequential") as relay:
        latencies = []
        for index in range(count):
            started = time.perf_counter()
            relay.send(chat_id=index + 1, text=f"sequential {index}")
            latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "msg_per_s": count / sum(latencies)}


def bench_threads(directory: Path, count: int) -> dict[str, float]:
    per_thread = count // THREADS
    with relay_in(directory, "threads") as relay:
        elapsed = in_threads(THREADS, per_thread, lambda worker, index: relay.send(
            chat_id=worker * 10_000_000 + index + 1, text=f"threaded {index}"))
    return {"msg_per_s": per_thread * THREADS / elapsed}


def bench_send_many(directory: Path, count: int) -> dict[str, float]:
    with relay_in(directory, "batches") as relay:
        started = time.perf_counter()
        for first in range(0, count, BATCH):
            results = relay.send_many([{"chat_id": index + 1, "text": f"batch {index}"}
                                       for index in range(first, first + BATCH)])
            assert not any(isinstance(result, Exception) for result in results)
        elapsed = time.perf_counter() - started
    return {"msg_per_s": count / elapsed}


def bench_http_batch(directory: Path, count: int) -> dict[str, float]:
    import requests

    from supervision.http_api import HttpApi

    with relay_in(directory, "http") as relay:
        api = HttpApi(relay, relay.config.http)
        api.start()
        try:
            session = requests.Session()
            started = time.perf_counter()
            for first in range(0, count, BATCH):
                body = {"messages": [{"chat_id": index + 1, "text": f"http {index}"}
                                     for index in range(first, first + BATCH)]}
                session.post(f"{api.url}/v1/messages/batch", json=body, timeout=30).raise_for_status()
            elapsed = time.perf_counter() - started
        finally:
            api.stop()
    return {"msg_per_s": count / elapsed}


def bench_persist_queue(directory: Path, count: int, threads: int) -> dict[str, float]:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(str(directory / f"persist-queue-{threads}"), multithreading=True)
    per_thread = count // threads

    def put_get_ack(worker: int, index: int) -> None:
        queue.put({"chat_id": worker * 10_000_000 + index + 1, "text": f"baseline {index}"})
        item = queue.get()
        queue.ack(item)

    elapsed = in_threads(threads, per_thread, put_get_ack)
    return {"msg_per_s": per_thread * threads / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--baseline-messages", type=int, default=3_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tgrelay-bench-", dir=os.environ.get("BENCH_DIR")) as temp:
        directory = Path(temp)
        results = {
            "machine": machine(),
            "send_sequential": bench_sequential(directory, min(args.messages, 10_000)),
            "send_16_threads": bench_threads(directory, args.messages),
            "send_many_500": bench_send_many(directory, args.messages),
            "http_batch_500": bench_http_batch(directory, args.messages),
            "baseline_persist_queue_1_thread": bench_persist_queue(directory, args.baseline_messages, 1),
            "baseline_persist_queue_16_threads": bench_persist_queue(directory, args.baseline_messages, THREADS),
        }
    baseline = max(results["baseline_persist_queue_1_thread"]["msg_per_s"],
                   results["baseline_persist_queue_16_threads"]["msg_per_s"])
    print(f"machine: {results['machine']}\n")
    print("| measurement (synchronous=full) | msg/s | vs best baseline |")
    print("|---|---:|---:|")
    for name, figures in results.items():
        if name == "machine":
            continue
        print(f"| {name} | {figures['msg_per_s']:,.0f} | {figures['msg_per_s'] / baseline:.1f}x |")
    sequential = results["send_sequential"]
    print(f"\nsequential send(): p50 {sequential['p50_ms']:.3f} ms, p99 {sequential['p99_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
