"""The C++ extensions built from csrc/: engine._sampler, engine._decode_attention, engine._decode_step.
Each is optional: a source checkout without `pip install -e .` has none, and the Python paths
(slower) run instead."""
import importlib


def extension(name: str):
    """The module engine.<name> (e.g. "_sampler"), or None when it is not built."""
    try:
        return importlib.import_module(f"engine.{name}")
    except ImportError:
        return None
