"""Entry point of the knowledge service's child processes: a query worker (``serve``) or the store builder (``build``)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from multiprocessing.connection import Connection


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker busy in a runaway query never reads the EOF its parent's death leaves on the socket, so a thread watches
    # for the parent instead (pyoxigraph lets other threads run during a query). Not PR_SET_PDEATHSIG: it fires when
    # the parent *thread* that started the worker exits, and workers are started from short-lived threads.
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "serve":
        _exit_when_orphaned(int(argv[3]))
        from services.knowledge.worker import serve_requests

        serve_requests(Connection(int(argv[2])), argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "build":
        from services.knowledge.dataset import DatasetSpec
        from services.knowledge.store import build_store

        triples, seconds = build_store(argv[1], DatasetSpec.from_json(argv[2]))
        print(json.dumps({"triples": triples, "seconds": seconds}))
        return 0
    print(
        "usage: python -m services.knowledge.worker_process serve STORE FD PARENT_PID | build DB SPEC_JSON",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
