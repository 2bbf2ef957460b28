"""llm-engine: an LLM's whole life in one readable package.

    from engine import GPT, GPTConfig, SamplingParams
    from engine.generate import generate, stream

    engine.generate(model, tokenizer, prompts, ...); engine.stream(...)   # the same functions

The names are imported on first use, so that what tokenize's worker processes import (engine.cli,
engine.shards, engine.tokenizer) leaves torch out. `engine.generate` is the submodule (importing it
makes the package's `generate` that module, whatever __init__ says), which is callable: calling it
calls engine.generate.generate.
"""
import importlib

_HOMES = {"GPTConfig": "engine.config", "GPT": "engine.model", "SamplingParams": "engine.sampling",
          "stream": "engine.generate"}

__all__ = [*_HOMES, "generate"]


def __getattr__(name):
    if name == "generate":
        return importlib.import_module("engine.generate")
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
