"""The project's one error type for bad input, and the exception that ends training on Ctrl-C.

Anything a user hands us (command-line arguments, data files, checkpoint and Hugging Face
folders, sampling parameters) that is wrong raises InputError with one line naming the thing
and what was expected. The CLI prints that line and exits 2. Every other exception is a bug
and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input: the message names the argument or file and what is wrong with it."""


class Interrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is safely written (here, not in engine.train, so that
    the CLI catches it without importing torch)."""
