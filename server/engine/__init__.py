"""The engine: one frozen base model, a prompt cache and a scheduler thread behind EngineClient."""

from server.engine.engine import Engine, build_engine
from server.engine.errors import InvalidRequestError
from server.engine.model_loader import ModelLoadError

__all__ = ["Engine", "InvalidRequestError", "ModelLoadError", "build_engine"]
