"""A child process for crash tests: accepts messages as fast as it can from several threads and
prints ``<id> <text>`` for every acknowledged one, until it is killed."""

from __future__ import annotations

import sys
import threading

from supervision import RelaySystem, load_config


def main(config_path: str, threads: int) -> None:
    relay = RelaySystem.start(load_config(config_path), send=False)
    lock = threading.Lock()
    print("ready", flush=True)

    def accept_forever(worker: int) -> None:
        index = 0
        while True:
            text = f"w{worker}-m{index}"
            receipt = relay.send(chat_id=worker * 10_000_000 + index + 1, text=text)
            with lock:
                sys.stdout.write(f"{receipt.id} {text}\n")
                sys.stdout.flush()
            index += 1

    for worker in range(threads):
        threading.Thread(target=accept_forever, args=(worker,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
