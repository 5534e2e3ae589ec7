"""Engines: the model behind autocaption. `load_engine` imports the chosen backend lazily, so torch and
transformers are imported only when a model is really needed (not for `--help` or `check`)."""

from __future__ import annotations

from autocaption.config import ModelConfig
from autocaption.engine.base import Answer, Cancelled, Engine, EngineInfo, Job, Prompt

__all__ = ["Answer", "Cancelled", "Engine", "EngineInfo", "Job", "Prompt", "load_engine"]


def load_engine(model: ModelConfig) -> Engine:
    """Load the model described by `model` and keep it resident until `close()`."""
    if model.engine == "openai":
        from autocaption.engine.openai import OpenAIEngine  # stdlib only: no torch for a remote model

        return OpenAIEngine.load(model)
    from autocaption.engine.llava import LlavaEngine  # torch is heavy: imported only here, on demand

    return LlavaEngine.load(model)
