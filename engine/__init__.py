"""llm-engine: an LLM's whole life in one readable package.

    from engine import GPT, GPTConfig, SamplingParams, generate, stream
"""
from engine.config import GPTConfig
from engine.model import GPT
from engine.sampling import SamplingParams
from engine.generate import generate, stream  # noqa: E402  (after SamplingParams: generate imports it)

__all__ = ["GPTConfig", "GPT", "SamplingParams", "generate", "stream"]
