"""llm-engine: an LLM's whole life in one readable package."""
from engine.config import GPTConfig
from engine.model import GPT

__all__ = ["GPTConfig", "GPT"]
