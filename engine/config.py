"""GPTConfig and its named presets."""
from dataclasses import asdict, dataclass, fields

from engine.errors import InputError


@dataclass
class GPTConfig:
    """GPT-2 hyperparameters, with nanoGPT's field names."""

    vocab_size: int = 50257
    block_size: int = 1024  # longest context the position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise InputError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise InputError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if not _is_number(self.layer_norm_epsilon) or not self.layer_norm_epsilon > 0:
            raise InputError(f"GPTConfig.layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From to_dict's output: every field, nothing else."""
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown:
            raise InputError(f"unknown fields {unknown}; expected {sorted(known)}")
        if missing:
            raise InputError(f"missing fields {missing}")
        return cls(**d)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PRESETS = {
    # 1.09M parameters (0.93M with the demo's trained vocabulary): learns the built-in world on 2 CPU cores in ~80 s.
    "tiny": dict(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128),
    # 14.0M: a Shakespeare-sized model for a single GPU or a patient CPU.
    "small": dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384),
    # The GPT-2 family (OpenAI's sizes).
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}
