"""`python -m services.edge`: the edge alone, without the meshpilot CLI (`meshpilot serve edge` runs the same)."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common import tracing
from services.common.config import ConfigError, load_config
from services.edge.server import main


def run() -> int:
    try:
        config = load_config()
        logging.basicConfig(
            level=config.log_level.upper(), format="%(asctime)s edge %(levelname)s %(name)s: %(message)s"
        )
        tracing.configure("edge")
        asyncio.run(main(config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
