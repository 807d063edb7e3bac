"""One parser per HF `model_type`, turning a config dict into a `ModelSpec`.

Each parser reads the fields its architecture's transformers config class defines, with
the same defaults.  `spec_from_config` picks the parser from the registry, unwraps
multimodal configs (`text_config`), and falls back to a generic dense/MoE spec flagged
`approximate` for an unknown type whose standard fields are present.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from serving_mfu.model.quantization import weight_bits_and_compute_dtype
from serving_mfu.model.spec import (
    AttentionSpec,
    ConfigError,
    LayerSpec,
    MLPSpec,
    ModelSpec,
    MoESpec,
    set_spec_builder,
)

log = logging.getLogger(__name__)

_MISSING = object()

Parser = Callable[["Cfg"], tuple[LayerSpec, ...]]
PARSERS: dict[str, Parser] = {}


def _where(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def register(*model_types: str) -> Callable[[Parser], Parser]:
    """Register a layer parser for one or more `model_type` names.  A name already registered (or
    given twice) raises ValueError naming it and both parsers, and registers none of the names: a
    model type that reads as another belongs in `ALIASES`, not in a second registration."""

    def deco(fn: Parser) -> Parser:
        new: dict[str, Parser] = {}
        for name in model_types:
            prior = PARSERS[name] if name in PARSERS else new.get(name)
            if prior is not None:
                raise ValueError(f"duplicate parser registration for model_type {name!r}: already registered to "
                                 f"{_where(prior)}, refusing {_where(fn)}")
            new[name] = fn
        PARSERS.update(new)
        return fn

    return deco


class Cfg:
    """Read-only view of a config dict whose `need` names the model type in its errors."""

    def __init__(self, data: Mapping[str, Any]):
        self.data = data
        self.model_type = str(data.get("model_type", "<none>"))

    def need(self, key: str) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING or value is None:
            raise ConfigError(f"config of model_type {self.model_type!r} is missing required field {key!r}")
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key, _MISSING)
        return default if value is _MISSING or value is None else value

    def first(self, *keys: str, default: Any = _MISSING) -> Any:
        """The first of several alias fields that is present (e.g. num_experts / num_local_experts)."""
        for key in keys:
            if self.data.get(key) is not None:
                return self.data[key]
        if default is _MISSING:
            raise ConfigError(
                f"config of model_type {self.model_type!r} is missing required field "
                + " / ".join(repr(k) for k in keys)
            )
        return default

    # Common derived fields -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.need("num_hidden_layers"))

    @property
    def hidden(self) -> int:
        return int(self.need("hidden_size"))

    def heads(self) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) with the config's own head_dim when present."""
        heads = int(self.need("num_attention_heads"))
        kv = int(self.get("num_key_value_heads", heads))
        head_dim = self.get("head_dim")
        if head_dim is None:
            head_dim = self.hidden // heads
        return heads, kv, int(head_dim)

    def layer_windows(self) -> list[int | None]:
        """Per-layer sliding window (keys seen) from `layer_types`, else a uniform window."""
        window = self.get("sliding_window")
        types = self.get("layer_types")
        if types:
            if len(types) < self.num_layers:
                raise ConfigError(
                    f"config of model_type {self.model_type!r}: layer_types has {len(types)} entries "
                    f"for {self.num_layers} layers"
                )
            return [int(window) if t == "sliding_attention" and window else None for t in types[: self.num_layers]]
        return [int(window) if window else None] * self.num_layers

    def mha(self, window: int | None) -> AttentionSpec:
        heads, kv, head_dim = self.heads()
        return AttentionSpec(heads, kv, head_dim, head_dim, sliding_window=window)

    def gated(self) -> bool:
        """Gated (3-matrix) MLP unless the config says `gated_mlp: false` (2-matrix GELU MLP)."""
        return bool(self.get("gated_mlp", True))


def _dense(cfg: Cfg, windows: list[int | None]) -> tuple[LayerSpec, ...]:
    mlp = MLPSpec(int(cfg.need("intermediate_size")), gated=cfg.gated())
    return tuple(LayerSpec(cfg.mha(w), mlp=mlp) for w in windows)


@register("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
          "ministral", "olmo2", "internlm2", "yi", "phi3", "starcoder2_gated")
def dense_decoder(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Llama-family dense decoders: GQA attention (own head_dim), SwiGLU/GeGLU MLP."""
    windows = cfg.layer_windows()
    if cfg.model_type in ("qwen2", "qwen3") and not cfg.get("layer_types"):
        # Qwen2 applies its window only with use_sliding_window, from max_window_layers on.
        use = cfg.get("use_sliding_window", False)
        start = int(cfg.get("max_window_layers", cfg.num_layers))
        w = cfg.get("sliding_window")
        windows = [int(w) if use and w and i >= start else None for i in range(cfg.num_layers)]
    if cfg.model_type == "gemma2" and not cfg.get("layer_types"):
        w = int(cfg.get("sliding_window", 4096))
        windows = [w if (i + 1) % 2 else None for i in range(cfg.num_layers)]
    if cfg.model_type == "gemma3_text" and not cfg.get("layer_types"):
        w = int(cfg.get("sliding_window", 4096))
        pattern = int(cfg.get("sliding_window_pattern", 6))
        windows = [w if (i + 1) % pattern else None for i in range(cfg.num_layers)]
    return _dense(cfg, windows)


@register("gpt2", "gpt_bigcode")
def gpt2(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """GPT-2 and GPT-BigCode (StarCoder 1, SantaCoder): one fused `c_attn` matmul for q, k, v, then
    `c_proj`; a plain 2-matrix GELU MLP of `n_inner` (default 4·`n_embd`); GPT-BigCode's
    `multi_query` keeps one KV head.  Learned position embeddings are a lookup, no matmul; biases
    are no matmul FLOPs.  Attention grows as q·c.  Sources: transformers `modeling_gpt2.py`,
    `modeling_gpt_bigcode.py`; vLLM `gpt2.py`, `gpt_bigcode.py`."""
    hidden, heads = cfg.hidden, int(cfg.need("num_attention_heads"))
    kv = 1 if cfg.model_type == "gpt_bigcode" and cfg.get("multi_query", True) else heads
    attn = AttentionSpec(heads, kv, hidden // heads, hidden // heads)
    mlp = MLPSpec(int(cfg.get("intermediate_size", 4 * hidden)), gated=False)
    return tuple(LayerSpec(attn, mlp=mlp) for _ in range(cfg.num_layers))


@register("starcoder2")
def starcoder2(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """StarCoder2: GQA attention, a plain 2-matrix GELU MLP (`c_fc`, `c_proj`), biases everywhere.

    Executed form (vLLM `starcoder2.py`, transformers `modeling_starcoder2.py`): qkv, o, c_fc and
    c_proj matmuls; a bias add is no matmul FLOP (torch's counter counts `addmm` as its `mm`).
    Attention grows as q·c, or q·min(c, window) with `sliding_window`.
    """
    mlp = MLPSpec(int(cfg.need("intermediate_size")), gated=False)
    return tuple(LayerSpec(cfg.mha(w), mlp=mlp) for w in cfg.layer_windows())


def _moe_layers(
    cfg: Cfg,
    is_moe: Callable[[int], bool],
    moe: MoESpec,
    windows: list[int | None] | None = None,
) -> tuple[LayerSpec, ...]:
    windows = windows or [None] * cfg.num_layers
    dense_mlp: MLPSpec | None = None
    layers = []
    for i in range(cfg.num_layers):
        attn = cfg.mha(windows[i])
        if is_moe(i):
            layers.append(LayerSpec(attn, moe=moe))
        else:
            dense_mlp = dense_mlp or MLPSpec(int(cfg.need("intermediate_size")), gated=True)
            layers.append(LayerSpec(attn, mlp=dense_mlp))
    return tuple(layers)


@register("mixtral", "phimoe", "minimax_m2")
def mixtral(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Mixtral, Phi-3.5-MoE (`phimoe`), MiniMax-M2: every layer MoE, top-k of `num_local_experts`
    gated experts of `intermediate_size`, no shared expert; GQA attention (MiniMax-M2's own
    `head_dim`), q·c or windowed.  Routing details (Phi-MoE's sparsemixer, MiniMax's score bias)
    change which experts run, not how many.  Sources: transformers `modeling_{mixtral,phimoe,
    minimax_m2}.py`; vLLM `mixtral.py`, `phimoe.py`, `minimax_m2.py`."""
    moe = MoESpec(
        num_experts=int(cfg.need("num_local_experts")),
        top_k=int(cfg.need("num_experts_per_tok")),
        expert_intermediate_size=int(cfg.need("intermediate_size")),
    )
    return _moe_layers(cfg, lambda i: True, moe, cfg.layer_windows())


def _qwen_sparse(cfg: Cfg, i: int) -> bool:
    """Qwen2/3-MoE layer selection: not in mlp_only_layers and (i+1) % decoder_sparse_step == 0."""
    step = int(cfg.get("decoder_sparse_step", 1))
    only = set(cfg.get("mlp_only_layers", []) or [])
    return i not in only and int(cfg.first("num_experts", "num_local_experts")) > 0 and (i + 1) % step == 0


@register("qwen2_moe")
def qwen2_moe(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Qwen2-MoE: routed experts + one shared expert of its own size behind a sigmoid gate."""
    shared = int(cfg.need("shared_expert_intermediate_size"))
    moe = MoESpec(
        num_experts=int(cfg.first("num_experts", "num_local_experts")),
        top_k=int(cfg.need("num_experts_per_tok")),
        expert_intermediate_size=int(cfg.need("moe_intermediate_size")),
        shared_intermediate_size=shared,
        shared_expert_gate=shared > 0,
    )
    # vLLM's qwen2_moe builds every layer with full attention, whatever the window fields say.
    return _moe_layers(cfg, lambda i: _qwen_sparse(cfg, i), moe, None)


@register("qwen3_moe")
def qwen3_moe(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Qwen3-MoE: routed experts only; dense layers from mlp_only_layers / decoder_sparse_step."""
    moe = MoESpec(
        num_experts=int(cfg.first("num_experts", "num_local_experts")),
        top_k=int(cfg.need("num_experts_per_tok")),
        expert_intermediate_size=int(cfg.need("moe_intermediate_size")),
    )
    windows = cfg.layer_windows() if cfg.get("use_sliding_window") else None
    return _moe_layers(cfg, lambda i: _qwen_sparse(cfg, i), moe, windows)


@register("gpt_oss")
def gpt_oss(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """GPT-OSS: every layer MoE (gated experts of intermediate_size), alternating sliding windows."""
    moe = MoESpec(
        num_experts=int(cfg.first("num_local_experts", "num_experts")),
        top_k=int(cfg.first("num_experts_per_tok", "experts_per_token")),
        expert_intermediate_size=int(cfg.need("intermediate_size")),
    )
    windows = cfg.layer_windows()
    if not cfg.get("layer_types"):
        w = int(cfg.get("sliding_window", 128))
        windows = [w if (i + 1) % 2 else None for i in range(cfg.num_layers)]
    return _moe_layers(cfg, lambda i: True, moe, windows)


@register("glm4_moe")
def glm4_moe(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """GLM-4.5/4.6 MoE: GQA attention (own `head_dim`; partial RoPE costs no matmul); the first
    `first_k_dense_replace` layers dense (`intermediate_size`), the rest `num_experts_per_tok` of
    `n_routed_experts` experts of `moe_intermediate_size` plus `n_shared_experts` shared ones of
    the same size.  Sources: transformers `modeling_glm4_moe.py` (Glm4MoeDecoderLayer), vLLM `glm4_moe.py`."""
    expert = int(cfg.need("moe_intermediate_size"))
    moe = MoESpec(
        num_experts=int(cfg.first("n_routed_experts", "num_local_experts")),
        top_k=int(cfg.need("num_experts_per_tok")),
        expert_intermediate_size=expert,
        shared_intermediate_size=int(cfg.get("n_shared_experts", 1)) * expert,
    )
    first_dense = int(cfg.get("first_k_dense_replace", 1))
    return _moe_layers(cfg, lambda i: i >= first_dense, moe, cfg.layer_windows())


@register("deepseek_v2", "deepseek_v3", "kimi_k2")
def deepseek(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """DeepSeek-V2/V3: MLA attention; MoE from first_k_dense_replace every moe_layer_freq layers."""
    heads = int(cfg.need("num_attention_heads"))
    nope = int(cfg.need("qk_nope_head_dim"))
    rope = int(cfg.need("qk_rope_head_dim"))
    attn = AttentionSpec(
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope + rope,
        v_head_dim=int(cfg.need("v_head_dim")),
        mla=True,
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=int(cfg.need("kv_lora_rank")),
        qk_rope_head_dim=rope,
        qk_nope_head_dim=nope,
    )
    n_routed = int(cfg.get("n_routed_experts", 0))
    expert = int(cfg.get("moe_intermediate_size", 0))
    moe = MoESpec(
        num_experts=n_routed,
        top_k=int(cfg.get("num_experts_per_tok", 0)),
        expert_intermediate_size=expert,
        shared_intermediate_size=int(cfg.get("n_shared_experts", 0)) * expert,
    )
    first_dense = int(cfg.get("first_k_dense_replace", 0))
    freq = int(cfg.get("moe_layer_freq", 1))
    dense = MLPSpec(int(cfg.need("intermediate_size")))
    layers = []
    for i in range(cfg.num_layers):
        if n_routed and i >= first_dense and i % freq == 0:
            if not moe.top_k or not expert:
                raise ConfigError(
                    f"config of model_type {cfg.model_type!r} is missing required field "
                    "'num_experts_per_tok' or 'moe_intermediate_size'"
                )
            layers.append(LayerSpec(attn, moe=moe))
        else:
            layers.append(LayerSpec(attn, mlp=dense))
    return tuple(layers)


def _generic(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Unknown model_type: a dense or MoE decoder from the standard field names."""
    n_experts = cfg.first("num_experts", "num_local_experts", "n_routed_experts", default=0) or 0
    if int(n_experts) > 0:
        moe = MoESpec(
            num_experts=int(n_experts),
            top_k=int(cfg.first("num_experts_per_tok", "top_k", "moe_top_k")),
            expert_intermediate_size=int(cfg.first("moe_intermediate_size", "intermediate_size")),
            shared_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0)),
        )
        return _moe_layers(cfg, lambda i: True, moe, cfg.layer_windows())
    return _dense(cfg, cfg.layer_windows())


# Wrappers whose language model lives in `text_config`.
def _unwrap(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and (text.get("hidden_size") or "hidden_size" not in cfg):
        inner = dict(text)
        for key in ("quantization_config", "torch_dtype", "dtype", "tie_word_embeddings"):
            if key in cfg and inner.get(key) is None:
                inner[key] = cfg[key]
        inner.setdefault("model_type", f"{cfg.get('model_type', '')}_text")
        return _unwrap(inner)
    if cfg.get("model_type") in ("qwen2_vl", "qwen2_5_vl") and "hidden_size" in cfg:
        return {**cfg, "model_type": "qwen2"}
    return cfg


# Types that use a different name for an architecture registered above.
ALIASES = {"gemma3": "gemma3_text", "llava_text": "llama", "mistral3_text": "mistral",
           "qwen3_text": "qwen3", "qwen2_text": "qwen2", "llama_text": "llama",
           "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3",
           "qwen3_vl_moe_text": "qwen3_moe"}

# Defaults transformers' config classes use for shape fields a config.json may leave out
# (filled only where the key is absent: an explicit null, e.g. Mistral's window, stays null).
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"head_dim": 256},
    "gemma2": {"head_dim": 256, "sliding_window": 4096},
    "gemma3_text": {"head_dim": 256, "sliding_window": 4096},
    "qwen3": {"head_dim": 128},
    "gpt_oss": {"head_dim": 64, "sliding_window": 128, "num_experts_per_tok": 4},
    "mistral": {"sliding_window": 4096},
    "starcoder2": {"tie_word_embeddings": True},
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "tie_word_embeddings": True},
    "gpt_bigcode": {"n_embd": 768, "n_layer": 12, "n_head": 12, "multi_query": True, "vocab_size": 50257,
                    "tie_word_embeddings": True},
    "minimax_m2": {"head_dim": 128},
    "deepseek_v3": {"first_k_dense_replace": 3, "n_shared_experts": 1, "n_routed_experts": 256,
                    "num_experts_per_tok": 8, "moe_intermediate_size": 2048},
    "deepseek_v2": {"n_shared_experts": 2},
}


# GPT-2-style field names (transformers' `attribute_map`), read as the standard ones.
_GPT2_NAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_inner": "intermediate_size"}
FIELD_NAMES: dict[str, dict[str, str]] = {"gpt2": _GPT2_NAMES, "gpt_bigcode": _GPT2_NAMES}


def spec_from_config(raw: Mapping[str, Any], warn: bool = True) -> ModelSpec:
    """Pick the architecture's parser and build the whole spec (dtypes, quantization, flags);
    `warn=False` leaves logging the generic reading's warning to the caller (`load_spec`, which
    may replace it by the derived path)."""
    data = _unwrap(dict(raw))
    model_type = ALIASES.get(str(data.get("model_type", "<none>")), str(data.get("model_type", "<none>")))
    data = {**DEFAULTS.get(model_type, {}), **data}
    for old, new in FIELD_NAMES.get(model_type, {}).items():
        if old in data and data.get(new) is None:
            data[new] = data[old]
    cfg = Cfg(data)
    parser = PARSERS.get(model_type)
    warnings: list[str] = []
    approximate = False
    if parser is None:
        parser = _generic
        approximate = True
        msg = (f"unknown model_type {cfg.model_type!r}: using a generic "
               f"{'MoE' if cfg.first('num_experts', 'num_local_experts', 'n_routed_experts', default=0) else 'dense'}"
               " decoder spec from the standard fields (approximate)")
        warnings.append(msg)
        if warn:
            log.warning(msg)
    layers = parser(cfg)
    act_dtype = str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))).removeprefix("torch.")
    if act_dtype in ("auto", "None"):
        act_dtype = "bfloat16"
    weight_bits, compute = weight_bits_and_compute_dtype(cfg.get("quantization_config"), act_dtype)
    default_tie = model_type.startswith("gemma")
    spec = ModelSpec(
        model_type=cfg.model_type,
        hidden_size=cfg.hidden,
        vocab_size=int(cfg.need("vocab_size")),
        layers=layers,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default_tie)),
        act_dtype=act_dtype,
        weight_bits=weight_bits,
        compute_dtype=compute,
        approximate=approximate,
        warnings=tuple(warnings),
        name=str(raw.get("_name_or_path", "")),
    )
    return spec


set_spec_builder(spec_from_config)
