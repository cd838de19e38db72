"""Models registered by folder: every HF model directory in ``<data_dir>/models`` is served under its folder's name,
loaded the first time a client lists the models or names it (how `meshpilot train` deploys what it trained)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path

from inference_core import Engine, EngineError
from inference_core.model_loading import find_models

log = logging.getLogger(__name__)

MODELS_DIR_NAME = "models"


def models_directory(data_dir: Path) -> Path:
    """Where trained models are registered: ``<data_dir>/models/<model id>/`` (a HF model directory each)."""
    return data_dir / MODELS_DIR_NAME


class ModelDirectory:
    """The models of ``directory`` not served yet, and an engine for each (``make_engine(model_id, path)``, not
    started). A model whose engine failed to load is not tried again until this process restarts."""

    def __init__(self, directory: Path, make_engine: Callable[[str, Path], Engine]) -> None:
        self.directory = directory
        self._make_engine = make_engine
        self._failed: set[str] = set()

    def new_models(self, served: Collection[str]) -> dict[str, Path]:
        """Registered models that are neither served nor failed, by id."""
        found = find_models(self.directory)
        return {model_id: path for model_id, path in found.items() if model_id not in {*served, *self._failed}}

    async def load(self, model_id: str, path: Path) -> Engine | None:
        """A started engine serving ``path``, or None (logged) when it cannot be loaded."""
        try:
            engine = self._make_engine(model_id, path)
            await engine.start()
        except EngineError as e:
            self._failed.add(model_id)
            log.error("registered model %s (%s) could not be loaded: %s", model_id, path, e)
            return None
        log.info("serving registered model %s from %s", model_id, path)
        return engine
