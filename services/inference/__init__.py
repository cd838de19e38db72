"""The inference service: InferenceService (Generate, ListModels, CountTokens) over an inference_core Engine."""

from services.inference.server import SERVICE_NAME, create_engine, create_server, main, servicer_of
from services.inference.servicer import InferenceServicer

__all__ = ["SERVICE_NAME", "InferenceServicer", "create_engine", "create_server", "main", "servicer_of"]
