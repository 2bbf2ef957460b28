"""Hugging Face interop: GPT-2, Llama, Qwen2 and Qwen3 weights in and out, and our kernels inside HF models.

    gpt = from_hf("path/to/gpt2")            # a local HF folder, or a GPT2LMHeadModel / LlamaForCausalLM / ... object
    hf_model = to_hf(gpt)                    # a transformers model of the same family with the same weights
    export(gpt, tokenizer, "out/")           # a folder AutoModelForCausalLM.from_pretrained loads
    patch(hf_model, backend="triton")        # our norms and attention inside the HF model
    unpatch(hf_model)                        # back to what it was

The two models hold the same numbers under different names and layouts: HF's GPT-2 keeps
its projections in `Conv1D` modules whose weight is [in, out], ours are nn.Linear [out, in],
so those four weights per block are transposed; the names are otherwise nanoGPT's (HF files
saved from GPT2Model lack the "transformer." prefix). The Llama family keeps the same names:
HF's q, k, v projections are stacked into c_attn, gate and up into c_fc (llama_names). Nothing is ever downloaded, and reading
a folder needs no `transformers` (only safetensors / torch); to_hf, export and patch need it.

patch(): LayerNorm (GPT-2) and RMSNorm (Llama, Qwen2, Qwen3) modules get a forward that calls
the backend's layer_norm / rms_norm (same parameters, so the state_dict is unchanged). Attention goes through transformers'
AttentionInterface: our function is registered under "llm_engine_<backend>" and the model's
attention implementation set to it. HF hands attention functions an optional mask; our
kernels take only `causal` and `kv_start` (left padding), so the mask is read once per
forward:
  - None or purely causal             -> our kernel;
  - exactly left padding              -> our kernel with kv_start (the number of pad tokens);
  - anything else (right padding, holes, a bias), attention dropout in training, or
    output_attentions                 -> HF's SDPA function, with a warning once per patch.
(transformers 4.x's head_mask argument is not supported.)
With left padding, the outputs at the padding positions differ from HF's (our padding queries
attend to padding keys, HF's to nothing); every real position matches.
"""
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from engine import reference
from engine.backends import get_backend
from engine.checkpoint import check_vocab, model_from_weights, read_json, read_pickle, read_safetensors, read_tokenizer
from engine.config import ROPE_SCALING_KEYS, GPTConfig
from engine.errors import InputError
from engine.model import GPT

# GPT2Config's defaults: HF writes config.json with only the fields that differ from them.
GPT2_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False,
    add_cross_attention=False,
    tie_word_embeddings=True,
)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, like ours
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # old transformers' causal-mask buffers, not weights
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
LLAMA_TYPES = ("llama", "qwen2", "qwen3")  # SmolLM2 and Llama 3.2 are "llama"
LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")


# ---------------------------------------------------------------------------------------------
# Weights in
# ---------------------------------------------------------------------------------------------
def config_from_hf(hf_config: dict, source="config.json") -> GPTConfig:
    """GPTConfig from a GPT-2, Llama, Qwen2 or Qwen3 config (config.json's dict); InputError
    naming any field we can't run."""
    if "model_type" not in hf_config:  # HF always writes it; our own checkpoints' config.json has none
        raise InputError(f"{source} has no model_type: not a Hugging Face config (an llm-engine checkpoint "
                         "folder loads with --ckpt / engine.checkpoint.load_checkpoint)")
    model_type = hf_config["model_type"]
    if model_type == "gpt2":
        return gpt2_config_from_hf(hf_config, source)
    if model_type in LLAMA_TYPES:
        return llama_config_from_hf(hf_config, source)
    raise InputError(f"{source}: model_type is {model_type!r}; supported: {['gpt2', *LLAMA_TYPES]}")


def gpt2_config_from_hf(hf_config: dict, source) -> GPTConfig:
    c = {**GPT2_DEFAULTS, **hf_config}
    try:  # checks the sizes' types and values first: the checks below compute with them
        config = GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
                           n_embd=c["n_embd"], dropout=0.0, bias=True, layer_norm_epsilon=c["layer_norm_epsilon"])
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    if c["activation_function"] not in TANH_GELUS:
        raise InputError(f"{source}: activation_function must be one of {TANH_GELUS}, got {c['activation_function']!r}")
    if c["n_inner"] not in (None, 4 * config.n_embd):
        raise InputError(f"{source}: n_inner must be null or 4*n_embd={4 * config.n_embd}, got {c['n_inner']!r}")
    expected = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    add_cross_attention=False, tie_word_embeddings=True)
    for name, value in expected.items():
        if bool(c[name]) != value:
            raise InputError(f"{source}: {name}={c[name]!r} is not supported (GPT-2 as we run it needs {value})")
    return config


def llama_config_from_hf(c: dict, source) -> GPTConfig:
    """GPTConfig(arch="llama") from a Llama / Qwen2 / Qwen3 config.json."""
    model_type = c["model_type"]
    missing = [name for name in LLAMA_REQUIRED if name not in c]
    if missing:
        raise InputError(f"{source}: {model_type} config lacks {missing}")
    # transformers 5 writes rope_parameters; older files have rope_theta and rope_scaling
    rope = c.get("rope_parameters") or {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict):
        raise InputError(f"{source}: rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InputError(f"{source}: rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    unsupported = dict(hidden_act=(c.get("hidden_act", "silu"), "silu"), mlp_bias=(c.get("mlp_bias", False), False),
                       use_sliding_window=(c.get("use_sliding_window", False), False),
                       attention_bias=(c.get("attention_bias", False), False))  # Llama/Qwen3's: o_proj's bias too
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise InputError(f"{source}: {name}={value!r} is not supported (we run {needed!r})")
    n_head = c["num_attention_heads"]
    try:
        return GPTConfig(
            arch="llama", bias=False, vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
            n_layer=c["num_hidden_layers"], n_head=n_head, n_kv_head=c.get("num_key_value_heads") or n_head,
            n_embd=c["hidden_size"], head_dim=c.get("head_dim"), intermediate_size=c["intermediate_size"],
            rope_theta=rope.get("rope_theta", 10000.0),
            rope_scaling={k: rope.get(k) for k in ROPE_SCALING_KEYS} if rope_type == "llama3" else None,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False),
            qk_norm=model_type == "qwen3", attn_bias=model_type == "qwen2")
    except InputError as err:
        raise InputError(f"{source}: {err}") from None


def llama_names(config: GPTConfig) -> list:
    """(our name, HF names, split sizes) for every Llama-family tensor: ours holds the HF tensors
    concatenated along the rows (q, k, v into c_attn; gate, up into c_fc), split back by sizes."""
    q, kv, inter = config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.intermediate_size
    per_layer = [
        ("ln_1.weight", ["input_layernorm.weight"], None),
        ("attn.c_attn.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"], [q, kv, kv]),
        *([("attn.c_attn.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"], [q, kv, kv])]
          if config.attn_bias else []),
        *([("attn.q_norm.weight", ["self_attn.q_norm.weight"], None), ("attn.k_norm.weight", ["self_attn.k_norm.weight"], None)]
          if config.qk_norm else []),
        ("attn.c_proj.weight", ["self_attn.o_proj.weight"], None),
        ("ln_2.weight", ["post_attention_layernorm.weight"], None),
        ("mlp.c_fc.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], [inter, inter]),
        ("mlp.c_proj.weight", ["mlp.down_proj.weight"], None),
    ]
    names = [("transformer.wte.weight", ["model.embed_tokens.weight"], None)]
    for i in range(config.n_layer):
        names += [(f"transformer.h.{i}.{ours}", [f"model.layers.{i}.{n}" for n in hf], sizes) for ours, hf, sizes in per_layer]
    names.append(("transformer.ln_f.weight", ["model.norm.weight"], None))
    if not config.tie_embeddings:
        names.append(("lm_head.weight", ["lm_head.weight"], None))
    return names


def llama_state_dict_from_hf(config: GPTConfig, hf_state: dict, source) -> dict:
    """Our names for HF Llama-family tensors. A tensor we don't know keeps its HF name, and one
    whose pieces are missing stays missing, for model_from_weights to report."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, not a weight
    ours, used = {}, set()
    for name, hf_names, _ in llama_names(config):
        if not all(n in hf_state for n in hf_names):
            continue
        pieces = [hf_state[n] for n in hf_names]
        if len({p.shape[1:] for p in pieces}) > 1 or any(p.dim() == 0 for p in pieces):
            raise InputError(f"{source}: {hf_names} have shapes {[list(p.shape) for p in pieces]}, which don't stack")
        ours[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        used.update(hf_names)
    if config.tie_embeddings and "lm_head.weight" in hf_state:
        ours["lm_head.weight"] = hf_state["lm_head.weight"]  # checked against the token table in model_from_weights
        used.add("lm_head.weight")
    return {**ours, **{k: v for k, v in hf_state.items() if k not in used}}


def state_dict_from_hf(hf_state: dict) -> dict:
    """Our names and layouts for HF GPT-2 tensors (with or without the "transformer." prefix)."""
    ours = {}
    for key, tensor in hf_state.items():
        if key.endswith(HF_BUFFERS):
            continue
        name = key if key.startswith("transformer.") or key == "lm_head.weight" else "transformer." + key
        # a Conv1D weight that is not 2-D is left as it is, for model_from_weights to report its shape
        ours[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2 else tensor
    return ours


def _tensor_dict(value, path) -> dict:
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())):
        raise InputError(f"{path}: expected a dict of tensor names to tensors")
    return value


def _read_weights(folder: Path):
    """(name -> tensor, the file they came from) from the first weights file the folder holds."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors"), folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: no weight_map from tensor names to shard files")
        weights = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise InputError(f"{index}: shard {shard!r} is outside the folder")
            for name, tensor in read_safetensors(folder / shard).items():
                if name in weights:
                    raise InputError(f"{folder / shard}: {name} is in another shard too")
                weights[name] = tensor
        return weights, index
    if (folder / "pytorch_model.bin").is_file():
        return _tensor_dict(read_pickle(folder / "pytorch_model.bin"), folder / "pytorch_model.bin"), folder / "pytorch_model.bin"
    raise InputError(f"{folder}: no weights; expected one of {list(WEIGHT_FILES)}")


def from_hf(model_or_folder, backend: str = "auto") -> GPT:
    """Our GPT from a Hugging Face GPT-2, Llama, Qwen2 or Qwen3: a GPT2LMHeadModel (or
    GPT2Model, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) object, or a local
    folder holding config.json and model.safetensors (or shards) or pytorch_model.bin. Weights
    come out fp32, on the CPU. A folder is untrusted input: whatever is wrong with it raises
    InputError naming the file."""
    if isinstance(model_or_folder, nn.Module):
        config = config_from_hf(model_or_folder.config.to_dict(), "model.config")
        # copies: the weights are assigned, not copied, into our model, which must not share them
        hf_state = {k: v.detach().to("cpu", copy=True) for k, v in model_or_folder.state_dict().items()}
        source = "model"
    else:
        folder = Path(model_or_folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder (expected a Hugging Face model folder: GPT-2, Llama, Qwen2 or Qwen3)")
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: no config.json (expected a Hugging Face model folder: "
                             f"config.json + one of {list(WEIGHT_FILES)})")
        config = config_from_hf(read_json(folder / "config.json"), folder / "config.json")  # before reading gigabytes
        hf_state, source = _read_weights(folder)
    if config.arch == "llama":
        return model_from_weights(config, llama_state_dict_from_hf(config, hf_state, source), source, backend)
    return model_from_weights(config, state_dict_from_hf(hf_state), source, backend)


def load_hf(folder, backend: str = "auto"):
    """(GPT, Tokenizer or None) from a local HF folder (GPT-2, Llama, Qwen2, Qwen3): what `--hf PATH` loads.
    The tokenizer is the folder's tokenizer.json as is, with the Jinja chat template and special
    tokens of its tokenizer_config.json (or chat_template.jinja) if any; None when there is none."""
    model = from_hf(folder, backend=backend)
    path = Path(folder) / "tokenizer.json"
    tokenizer = read_tokenizer(path) if path.is_file() else None
    if tokenizer is not None:
        check_vocab(model, tokenizer, path)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Weights out
# ---------------------------------------------------------------------------------------------
def to_hf(gpt: GPT, **config_overrides):
    """A transformers model holding a copy of gpt's weights (same device and dtype): a
    GPT2LMHeadModel, or for arch "llama" a Qwen3ForCausalLM (qk_norm), Qwen2ForCausalLM
    (attn_bias) or LlamaForCausalLM. config_overrides go to its config (e.g. bos_token_id / eos_token_id)."""
    hf = llama_to_hf(gpt, config_overrides) if gpt.config.arch == "llama" else gpt2_to_hf(gpt, config_overrides)
    wte = gpt.transformer.wte.weight
    return hf.to(device=wte.device, dtype=wte.dtype).eval()


def llama_to_hf(gpt: GPT, config_overrides: dict):
    import transformers

    c = gpt.config
    if c.qk_norm and c.attn_bias:
        raise InputError("to_hf: no Hugging Face model has both Qwen3's qk_norm and Qwen2's q/k/v-only biases")
    name = "Qwen3" if c.qk_norm else "Qwen2" if c.attn_bias else "Llama"
    rope = dict(rope_type="llama3", **c.rope_scaling) if c.rope_scaling else dict(rope_type="default")
    hf_config = getattr(transformers, f"{name}Config")(**{
        **dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, hidden_size=c.n_embd,
               intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
               num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
               rope_parameters=dict(rope, rope_theta=c.rope_theta), tie_word_embeddings=c.tie_embeddings,
               hidden_act="silu", attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None),
        **config_overrides,
    })
    hf = getattr(transformers, f"{name}ForCausalLM")(hf_config)
    ours = gpt.state_dict()
    state = {}
    for our_name, hf_names, sizes in llama_names(c):
        pieces = ours[our_name].split(sizes) if sizes else [ours[our_name]]
        state.update(zip(hf_names, pieces))
    if c.tie_embeddings:
        state["lm_head.weight"] = ours["lm_head.weight"]
    with torch.no_grad():
        hf.load_state_dict(state)
    return hf


def gpt2_to_hf(gpt: GPT, config_overrides: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = gpt.config
    if not c.bias:
        raise InputError("to_hf: GPT-2 always has biases; this model has config.bias=False")
    eos = 50256 if c.vocab_size == 50257 else None  # GPT-2's <|endoftext|>; unknown for other vocabularies
    hf_config = GPT2Config(**{
        **dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
               n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
               resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=0.0,  # we have no attention dropout
               bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True),
        **config_overrides,
    })
    hf = GPT2LMHeadModel(hf_config)
    state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in gpt.state_dict().items()}
    with torch.no_grad():
        hf.load_state_dict(state)
    return hf


def export(model: GPT, tokenizer, out_folder):
    """Write a folder transformers loads (AutoModelForCausalLM / AutoTokenizer.from_pretrained):
    config.json, model.safetensors, generation_config.json, and with a tokenizer its
    tokenizer.json + tokenizer_config.json. Written to a temporary folder, then renamed."""
    out = Path(out_folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"export: {out} exists and is not an empty folder")
    ids = {}
    if tokenizer is not None and tokenizer.template is not None:  # a Hugging Face tokenizer with its chat template
        bos, eos = (tokenizer.special_tokens.get(f"{n}_token") for n in ("bos", "eos"))
        ids = dict(bos_token_id=tokenizer.hf.token_to_id(bos) if bos else None, eos_token_id=tokenizer.hf.token_to_id(eos) if eos else None)
    elif tokenizer is not None:
        from engine.tokenizer import BOS

        bos = tokenizer.special_ids.get(BOS)
        ids = dict(bos_token_id=bos, eos_token_id=bos)
    hf = to_hf(model, **ids)
    if tokenizer is not None and tokenizer.template is not None:  # a reply ends with the template's end-of-turn token
        hf.generation_config.eos_token_id = list(tokenizer.stop_ids)
    elif tokenizer is not None and tokenizer.has_chat_tokens:  # a chat model's reply ends with <|end|>
        hf.generation_config.eos_token_id = [tokenizer.end_id, tokenizer.bos_id]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            from transformers import PreTrainedTokenizerFast

            from engine.tokenizer import BOS

            tokenizer.save(tmp / "tokenizer.json")
            special = dict(bos_token=BOS, eos_token=BOS) if BOS in tokenizer.special_ids else {}
            if tokenizer.template is not None:
                special = dict(tokenizer.special_tokens, chat_template=tokenizer.chat_template)
            PreTrainedTokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), **special).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Our kernels inside a Hugging Face model
# ---------------------------------------------------------------------------------------------
PATCH_ATTR = "_llm_engine_patch"  # on a patched model: what unpatch restores


def attention_plan(mask, sq: int, sk: int):
    """How our kernel runs HF's mask for causal self-attention: (causal, kv_start or
    None, keys to use), or None when the mask is none of: absent, causal, causal with left
    padding, all-visible.

    mask: None, a boolean [B|1, 1|H, Sq, >=Sk] (True = attend) or an additive float one (0 = attend);
    keys past Sk are cut off, as HF's own SDPA function does (transformers 4.x pads the mask).
    """
    if mask is None:  # HF's SDPA conventions for a missing mask
        if sq == 1:
            return False, None, sk  # one new query sees every cached key
        if sk > sq:
            return True, None, sq  # a static cache's prefill: keys past the queries are empty slots
        return True, None, sk
    mask = mask[..., :sk]
    if mask.shape[-2:] != (sq, sk):
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        blocked = mask <= torch.finfo(mask.dtype).min / 2  # -inf or dtype-min: HF's "masked"
        if not ((mask == 0) | blocked).all():
            return None  # a real additive bias (ALiBi-like): our kernels don't add one
        allowed = ~blocked
    if allowed.shape[1] != 1 and not (allowed == allowed[:, :1]).all():
        return None  # per-head masks
    allowed = allowed[:, 0]  # [B|1, Sq, Sk]
    if allowed.all():
        return False, None, sk
    # Left padding: the last query sees every real key, so its leading blocked keys are the padding.
    kv_start = (~allowed[:, -1]).long().cumprod(-1).sum(-1)  # [B|1]
    expected = reference.attention_mask(sq, sk, True, kv_start, device=mask.device)[:, 0]
    real_query = torch.arange(sk - sq, sk, device=mask.device)[None, :, None] >= kv_start[:, None, None]
    if not ((allowed == expected) | ~real_query).all():  # padding queries' rows are free
        return None
    return True, (kv_start if kv_start.any() else None), sk


def _make_attention(ops):
    """An AttentionInterface function running `ops.attention`, with HF's SDPA as the fallback."""
    from transformers import AttentionInterface

    sdpa = AttentionInterface._global_mapping["sdpa"]
    warned, last = set(), {}

    def fallback(reason, module, query, key, value, mask, **kwargs):
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"llm_engine patch: {reason}; this attention runs on transformers' SDPA instead of "
                          f"the {ops.name!r} backend", stacklevel=3)
        return sdpa(module, query, key, value, mask, **kwargs)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        kwargs = dict(kwargs, dropout=dropout, scaling=scaling)
        if dropout > 0:
            return fallback("attention dropout is on (training with attn_pdrop > 0)", module, query, key, value,
                            attention_mask, **kwargs)
        if kwargs.get("output_attentions"):
            return fallback("output_attentions needs the attention weights", module, query, key, value,
                            attention_mask, **kwargs)
        sq, sk = query.shape[-2], key.shape[-2]
        if last.get("mask", ()) is not attention_mask or last["shape"] != (sq, sk):
            # every layer gets the same mask object: read it (a device sync) once per forward
            last.update(mask=attention_mask, shape=(sq, sk), plan=attention_plan(attention_mask, sq, sk))
        if last["plan"] is None:
            return fallback("the attention mask is not causal with left padding", module, query, key, value,
                            attention_mask, **kwargs)
        causal, kv_start, keys = last["plan"]
        # scale is 1/sqrt(head_dim), our kernels' default: patch() accepts only models that use it
        out = ops.attention(query, key[:, :, :keys], value[:, :, :keys], causal=causal, kv_start=kv_start)
        return out.transpose(1, 2), None  # HF wants [B, S, H, D] and the (absent) weights

    return attention


def _layer_norm_forward(ops):
    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    return forward


def _rms_norm_forward(ops):  # HF's LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm: weight, variance_epsilon
    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.variance_epsilon)

    return forward


def _norms(hf_model) -> list:
    """(module, our forward for it) for every norm patch() swaps."""
    norms = []
    for m in hf_model.modules():
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            norms.append((m, _layer_norm_forward))
        elif type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            norms.append((m, _rms_norm_forward))
    return norms


def _set_attn_implementation(hf_model, name):
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation(name)
    else:
        hf_model.config._attn_implementation = name


def patch(hf_model, backend: str = "triton"):
    """Run a loaded Hugging Face GPT-2's LayerNorms, or a Llama's, Qwen2's or Qwen3's RMSNorms,
    and their attention (grouped-query included) on our backend ("triton", "torch",
    "reference"). Weights and state_dict are untouched; `unpatch` undoes it. Returns the model.
    See the module docstring for which attention masks fall back to SDPA."""
    import transformers

    model_type = getattr(hf_model.config, "model_type", None)
    if model_type == "gpt2":
        needs = dict(add_cross_attention=False, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
        for name, value in needs.items():
            if bool(getattr(hf_model.config, name, value)) != value:
                raise InputError(f"patch: GPT-2 with {name}={not value} is not supported (our attention needs {value})")
    elif model_type in LLAMA_TYPES:
        try:  # the same checks as loading one (its attention scale is 1/sqrt(head_dim), our default)
            llama_config_from_hf(hf_model.config.to_dict(), "model.config")
        except InputError as err:
            raise InputError(f"patch: expected a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 model: {err}") from None
    else:
        raise InputError(f"patch: expected a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 model, got model_type {model_type!r}")
    from transformers.models.gpt2 import modeling_gpt2

    if not hasattr(transformers, "AttentionInterface") or not hasattr(modeling_gpt2, "ALL_ATTENTION_FUNCTIONS"):
        raise RuntimeError(f"patch needs a transformers whose GPT-2 dispatches attention through "
                           f"transformers.AttentionInterface (4.51 or newer; tested with 4.53 and 5.x); installed: "
                           f"{transformers.__version__}")
    ops = get_backend(backend)  # raises, with the reason, when the backend can't run here
    if getattr(hf_model, PATCH_ATTR, None) is not None:
        unpatch(hf_model)
    name = f"llm_engine_{ops.name}"
    transformers.AttentionInterface.register(name, _make_attention(ops))
    try:  # transformers 5 builds the mask per implementation and gives unknown ones none: ask for SDPA's
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)
    except ImportError:
        pass  # older versions build the mask in the model and pass it to any implementation
    previous = hf_model.config._attn_implementation
    _set_attn_implementation(hf_model, name)
    norms = _norms(hf_model)
    for m, forward in norms:
        m.forward = types.MethodType(forward(ops), m)
    setattr(hf_model, PATCH_ATTR, dict(attn_implementation=previous, norms=[m for m, _ in norms]))
    return hf_model


def unpatch(hf_model):
    """Undo `patch`: HF's own attention implementation and norms' forward again."""
    state = getattr(hf_model, PATCH_ATTR, None)
    if state is None:
        raise ValueError("unpatch: this model is not patched (engine.hf.patch was not called on it)")
    _set_attn_implementation(hf_model, state["attn_implementation"])
    for m in state["norms"]:
        del m.forward
    delattr(hf_model, PATCH_ATTR)
    return hf_model
