"""GPTConfig and its named presets."""
from dataclasses import asdict, dataclass, fields

from engine.errors import InputError

ARCHS = ("gpt2", "llama")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Added with the Llama family: a GPT-2 config.json written before them may lack them.
LLAMA_FIELDS = ("arch", "n_kv_head", "intermediate_size", "rope_theta", "rope_scaling", "rms_norm_eps",
                "tie_embeddings", "qk_norm", "attn_bias", "head_dim")


@dataclass
class GPTConfig:
    """GPT-2 hyperparameters with nanoGPT's field names, and the Llama family's (arch "llama":
    RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention; Qwen2 and Qwen3 are Llamas
    with attn_bias and qk_norm)."""

    vocab_size: int = 50257
    block_size: int = 1024  # longest context (GPT-2: the rows of the position table)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2: biases in every Linear and LayerNorm; the Llama family has none
    layer_norm_epsilon: float = 1e-5
    arch: str = "gpt2"
    n_kv_head: int | None = None  # key/value heads, a divisor of n_head (grouped-query attention); None: n_head
    intermediate_size: int | None = None  # the MLP's hidden width; None: 4 * n_embd (GPT-2's)
    rope_theta: float = 10000.0  # rotary base: the slowest rotation's period grows with it
    rope_scaling: dict | None = None  # Llama-3's long-context frequency scaling: ROPE_SCALING_KEYS -> numbers
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True  # lm_head shares the token table
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before the rotation
    attn_bias: bool = False  # Qwen2: biases in the q, k, v projections only
    head_dim: int | None = None  # None: n_embd // n_head; Qwen3's is larger

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        if self.arch not in ARCHS:
            raise InputError(f"GPTConfig.arch must be one of {list(ARCHS)}, got {self.arch!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_embeddings", "qk_norm", "attn_bias"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("layer_norm_epsilon", "rms_norm_eps", "rope_theta"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise InputError(f"GPTConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if (self.arch == "gpt2" or self.head_dim is None) and self.n_embd % self.n_head:
            raise InputError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch == "gpt2":
            self._check_gpt2()
        elif self.bias:
            raise InputError("GPTConfig.bias must be false with arch 'llama' (attn_bias adds Qwen2's q, k, v biases)")
        for name in ("n_kv_head", "intermediate_size", "head_dim"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise InputError(f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise InputError(f"GPTConfig.head_dim must be even (rotary pairs), got {self.head_dim}")
        if self.intermediate_size is None and self.arch == "llama":
            raise InputError("GPTConfig.intermediate_size is required with arch 'llama' (the SwiGLU width)")
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    def _check_gpt2(self):
        """GPT-2 as we run it: the Llama fields keep their defaults (or name GPT-2's own values)."""
        gpt2 = dict(n_kv_head=(None, self.n_head), head_dim=(None, self.n_embd // self.n_head),
                    intermediate_size=(None, 4 * self.n_embd), tie_embeddings=(True,), qk_norm=(False,), attn_bias=(False,), rope_scaling=(None,))
        for name, allowed in gpt2.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"GPTConfig.{name}={getattr(self, name)!r} needs arch 'llama' (GPT-2 allows {allowed[-1]!r})")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.arch == "gpt2":  # null, as they follow from n_embd and n_head: a hand-edited config.json stays whole
            d.update(n_kv_head=None, head_dim=None, intermediate_size=None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From to_dict's output: every field (a GPT-2's may lack the Llama ones), nothing else."""
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d) - set(LLAMA_FIELDS))
        if unknown:
            raise InputError(f"unknown fields {unknown}; expected {sorted(known)}")
        if missing:
            raise InputError(f"missing fields {missing}")
        return cls(**d)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"GPTConfig.{name} must be a positive integer, got {value!r}")


def _check_rope_scaling(scaling):
    if not isinstance(scaling, dict) or sorted(scaling) != sorted(ROPE_SCALING_KEYS):
        raise InputError(f"GPTConfig.rope_scaling must be null or a dict of exactly {list(ROPE_SCALING_KEYS)}, got {scaling!r}")
    if not all(_is_number(v) and v > 0 for v in scaling.values()):
        raise InputError(f"GPTConfig.rope_scaling values must be positive numbers, got {scaling!r}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise InputError(f"GPTConfig.rope_scaling: high_freq_factor must exceed low_freq_factor, got {scaling!r}")


LLAMA = dict(arch="llama", bias=False)
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
    # The Llama family. llama-tiny is tiny's size as a Llama (GQA 4:2): 1.05M parameters.
    "llama-tiny": dict(**LLAMA, vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                       intermediate_size=384, rope_theta=10000.0, rms_norm_eps=1e-5),
    # Published shapes (their config.json on the Hub); parameter counts checked in tests/test_llama.py.
    "smollm2-135m": dict(**LLAMA, vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5),
    "smollm2-360m": dict(**LLAMA, vocab_size=49152, block_size=8192, n_layer=32, n_head=15, n_kv_head=5, n_embd=960,
                         intermediate_size=2560, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(**LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                         intermediate_size=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen3-0.6b": dict(**LLAMA, vocab_size=151936, block_size=40960, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
                       head_dim=128, intermediate_size=3072, rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True),
}

DEMO_PRESETS = ("tiny", "llama-tiny")  # CPU-sized, the GPT-2 and the Llama family's: what `llm-engine demo --preset` takes


@dataclass
class TrainConfig:
    """How a run trains (engine.train.train): the CLI's training flags, with their defaults."""
    max_steps: int
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 0  # micro-batches per optimizer step for the whole job; 0 = one per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    # the triton backend's attention backward: True, bitwise-equal gradients run to run (a separate dQ
    # pass); False, dQ by atomics in the dK/dV pass (two fewer matmuls). True stays the default
    # until a GPU has measured both (issue 19).
    deterministic: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum < 0:
            raise InputError(f"--grad-accum must be >= 0 (0 = one micro-batch per process), got {self.grad_accum}")
        if self.lr <= 0:
            raise InputError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise InputError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
