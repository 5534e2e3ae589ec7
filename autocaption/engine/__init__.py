"""Engines: the model behind autocaption. `load_engine` imports the chosen backend lazily, so torch and
transformers are imported only when a model is really needed (not for `--help` or `check`)."""

from __future__ import annotations

from pathlib import Path

from autocaption import dependencies
from autocaption.config import ModelConfig
from autocaption.dependencies import DependencyError
from autocaption.engine.base import Answer, Cancelled, Engine, EngineInfo, Job, Prompt

__all__ = ["Answer", "Cancelled", "Engine", "EngineInfo", "Job", "Prompt", "load_engine"]


def load_engine(model: ModelConfig, cache_dir: Path | None = None) -> Engine:
    """Load the model described by `model` and keep it resident until `close()`. `cache_dir`: where compiled
    decode steps are kept between runs (state.dir/torch-compile)."""
    if model.engine == "openai":
        dependencies.check(name for name in dependencies.declared() if name not in dependencies.ENGINE)
        from autocaption.engine.openai import OpenAIEngine  # stdlib only: no torch for a remote model

        return OpenAIEngine.load(model)
    dependencies.check()  # before torch is imported: a version outside the tested ranges is one line
    try:
        from autocaption.engine.local import LocalEngine  # torch is heavy: imported only here, on demand
    except ImportError as exc:  # a transformers release without the internals compat.py fences
        raise DependencyError(f"the installed torch/transformers cannot be used: {exc}") from None
    return LocalEngine.load(model, cache_dir)
