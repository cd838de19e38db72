"""Entry point of the knowledge service's child processes: ``serve STORE FD`` (a query worker) or ``build DB SPEC``."""

from __future__ import annotations

import json
import sys
from multiprocessing.connection import Connection


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        from services.knowledge.worker import serve_requests

        serve_requests(Connection(int(argv[2])), argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "build":
        from services.knowledge.dataset import DatasetSpec
        from services.knowledge.store import build_store

        triples, seconds = build_store(argv[1], DatasetSpec.from_json(argv[2]))
        print(json.dumps({"triples": triples, "seconds": seconds}))
        return 0
    print("usage: python -m services.knowledge.worker_process serve STORE FD | build DB SPEC_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
