"""llm-engine: an LLM's whole life in one readable package.

    from engine import GPT, GPTConfig, SamplingParams
    from engine.generate import generate, stream

The names are imported on first use, so that what tokenize's worker processes import (engine.cli,
engine.shards, engine.tokenizer) leaves torch out. generate and stream are not names of the
package itself: the submodule engine.generate takes the name `generate` as soon as it is imported.
"""
import importlib

_HOMES = {"GPTConfig": "engine.config", "GPT": "engine.model", "SamplingParams": "engine.sampling"}

__all__ = list(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
