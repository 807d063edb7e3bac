"""A tiny, runnable copy of any decoder architecture transformers defines, for the derived-path tests.

`tiny_config(model_type)` starts from the architecture's own default config (its config class,
no download) and makes it small without changing how it is wired: widths shrink, head counts
drop to a few (GQA kept), experts to 4 with top-k 2, the vocabulary to 512 with the special
token ids inside it; the number of layers and every per-layer list stay as they are (hybrid
patterns, layer types, per-layer sizes), and so do head dims and state sizes that other
fields are derived from.  Nothing here reads serving_mfu.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

LINEAR_OPS = ("aten.mm", "aten.addmm", "aten.convolution")
VOCAB = 512
WIDTH = 128
LAYERS = 6
#: Integer fields set to WIDTH (or a multiple) where the config has them: widths nothing else is derived from.
_INTERMEDIATE = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_dim",
                 "ffn_hidden_size", "d_ff", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "expert_intermediate_size",
                 "intermediate_size_mlp", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
                 "dense_intermediate_size", "moe_ffn_hidden_size", "mlp_dim", "ffn_size", "inner_dim")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
            "n_experts", "num_moe_experts", "ffn_num_experts")
_TOP_K = ("num_experts_per_tok", "top_k", "moe_top_k", "num_selected_experts", "experts_per_token", "moe_k",
          "router_top_k", "num_experts_per_token", "moe_topk")
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "image_token_id", "video_token_id", "unk_token_id")


def default_text_config(model_type: str) -> Any:
    """The architecture's default config (its text part for a multimodal wrapper)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def tiny_config(model_type: str) -> Any:
    """A small config of `model_type` with the same wiring (see the module docstring)."""
    base = default_text_config(model_type)
    names = dict(getattr(base, "attribute_map", {}) or {})  # e.g. GPT-2: hidden_size -> n_embd
    d = base.to_dict()
    for std, real in names.items():
        if real in d and std not in d:
            d[std] = d.pop(real)
    small: dict[str, Any] = {}
    heads = d.get("num_attention_heads")
    if isinstance(heads, int) and heads > 0:
        kv = d.get("num_key_value_heads") or heads
        group = max(1, heads // kv) if isinstance(kv, int) and kv else 1
        kv_small = 1 if group >= 4 else 2
        heads_small = kv_small * min(group, 4)
        hidden = d.get("hidden_size")
        head_dim = d.get("head_dim")
        small["num_attention_heads"] = heads_small
        if "num_key_value_heads" in d:
            small["num_key_value_heads"] = kv_small
        if isinstance(hidden, int) and hidden % heads == 0 and not head_dim:
            small["hidden_size"] = heads_small * (hidden // heads)  # keep head_dim = hidden / heads
        elif isinstance(hidden, int):
            small["hidden_size"] = WIDTH * 2
    for key in _INTERMEDIATE:
        if isinstance(d.get(key), int) and d[key] > 0:
            small[key] = WIDTH
    for key in _EXPERTS:
        if isinstance(d.get(key), int) and d[key] > 4:
            small[key] = 4
    for key in _TOP_K:
        if isinstance(d.get(key), int) and d[key] > 2:
            small[key] = 2
    for key in ("n_group", "topk_group"):
        if isinstance(d.get(key), int):
            small[key] = 1
    if isinstance(d.get("vocab_size"), int):
        small["vocab_size"] = VOCAB
    for i, key in enumerate(_SPECIAL_IDS):
        v = d.get(key)
        if isinstance(v, int) and v >= VOCAB:
            small[key] = i
        elif isinstance(v, list):
            small[key] = [x if x < VOCAB else i for x in v]
    heads_field = isinstance(heads, int) and heads > 0
    if not heads_field and isinstance(d.get("hidden_size"), int) and d["hidden_size"] > 2 * WIDTH:
        small["hidden_size"] = 2 * WIDTH  # attention-free (Mamba, RWKV, xLSTM): nothing ties it to heads
        for key in ("attention_hidden_size", "embedding_dim"):
            if isinstance(d.get(key), int):
                small[key] = 2 * WIDTH
        if isinstance(d.get("num_heads"), int) and isinstance(d.get("head_dim"), int):
            small["num_heads"] = max(1, (d.get("expand") or 2) * 2 * WIDTH // d["head_dim"])
            if isinstance(d.get("n_groups"), int) and small["num_heads"] % d["n_groups"]:
                small["n_groups"] = 1
    for key, v in d.items():  # other head counts (indexers, linear attention, per-layer inputs): a few
        if isinstance(v, int) and not isinstance(v, bool) and key not in small and key.endswith("_heads") \
                and key not in ("num_attention_heads", "num_key_value_heads", "num_heads") and v > 4:
            small[key] = 4 if "value" in key or "v_heads" in key else 2
    if isinstance(d.get("vocab_size_per_layer_input"), int):
        small["vocab_size_per_layer_input"] = VOCAB
    if isinstance(d.get("index_head_dim"), int) and d["index_head_dim"] > 64:
        small["index_head_dim"] = 64
    d.update(small)
    layers = d.get("num_hidden_layers")
    if isinstance(layers, int) and layers > LAYERS:
        # fewer layers, each per-layer list and pattern cut to match (the first LAYERS keep their kinds)
        d["num_hidden_layers"] = LAYERS
        for key, v in list(d.items()):
            if isinstance(v, (list, str)) and len(v) == layers and key not in _SPECIAL_IDS:
                d[key] = v[:LAYERS]
            elif isinstance(v, dict) and v and all(str(k).isdigit() for k in v):
                d[key] = {k: x for k, x in v.items() if int(k) < LAYERS}
            elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v) \
                    and key.endswith(("_layers", "_layer_ids", "_layer_idx", "_indices")):
                d[key] = [x for x in v if x < LAYERS]
        if isinstance(d.get("num_kv_shared_layers"), int) and d["num_kv_shared_layers"]:  # Gemma-3n: the last
            d["num_kv_shared_layers"] = 1  # the last layer reuses an earlier layer's KV (the first 5 hold both kinds)
    hidden = d.get("hidden_size")
    if isinstance(hidden, int) and "hidden_size" in small:
        # Mamba-2 mixers: heads × head width must equal expand × hidden
        if isinstance(d.get("mamba_n_heads"), int) and isinstance(d.get("mamba_d_head"), int):
            expand = d.get("mamba_expand") or 2
            d["mamba_n_heads"] = max(1, int(expand * hidden) // d["mamba_d_head"])
            if isinstance(d.get("mamba_n_groups"), int) and d["mamba_n_heads"] % d["mamba_n_groups"]:
                d["mamba_n_groups"] = 1
        if isinstance(d.get("mamba_num_heads"), int) and isinstance(d.get("mamba_head_dim"), int):  # Nemotron-H
            d["mamba_num_heads"] = max(1, int((d.get("expand") or 2) * hidden) // d["mamba_head_dim"])
            if isinstance(d.get("n_groups"), int) and d["mamba_num_heads"] % d["n_groups"]:
                d["n_groups"] = 1
    for std, real in names.items():  # back to the config class's own names
        if std in d:
            d[real] = d.pop(std)
    d["dtype"] = "float32"
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version", "architectures")}
    return type(base).from_dict(d)


def build(config: Any, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM for `config` on the CPU: eager attention, eager experts."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": torch.float32}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            try:
                model = AutoModelForCausalLM.from_config(config, experts_implementation="eager", **kwargs)
            except (TypeError, ValueError) as exc:
                if "experts" not in str(exc):
                    raise
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        finally:
            logging.disable(logging.NOTSET)
    return model.eval()


class _ConvPadding(TorchDispatchMode):
    """Convolution FLOPs beyond the first `tokens` outputs of each 1-D convolution call: transformers
    runs a causal short convolution with `padding = kernel − 1` (or pads its input) and keeps the first
    L of its L + kernel − 1 outputs; a serving kernel computes only those L."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens, self.padded_flops = tokens, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and out.dim() == 3 and out.shape[-1] > self.tokens:
            batch, extra = out.shape[0], out.shape[-1] - self.tokens
            self.padded_flops += 2 * batch * args[1].numel() * extra
        return out


def oracle_linear_flops(model: torch.nn.Module, tokens: int = 8, seed: int = 0, dense_experts: float = 0.0) -> int:
    """Weight FLOPs (`mm`/`addmm` and the mixers' causal short convolutions over the positions they
    keep, `_ConvPadding`; the LM head left out) of a forward over `tokens` random tokens, counted by
    FlopCounterMode.  `dense_experts` = top_k / E for a model whose reference code runs every expert
    on every token with `bmm` (Llama 4): that share of the experts' `bmm` is what a server runs."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, min(vocab, VOCAB), (1, tokens), generator=torch.Generator().manual_seed(seed))
    counter = FlopCounterMode(display=False)
    padding = _ConvPadding(tokens)
    with torch.no_grad(), counter, padding, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids, use_cache=False)
    counts = counter.get_flop_counts()
    lm = model.get_output_embeddings()
    lm_name = next((n for n, m in model.named_modules() if m is lm), None)
    root = type(model).__name__
    lm_flops = 0
    if lm_name is not None:
        lm_flops = sum(int(v) for op, v in counts.get(f"{root}.{lm_name}", {}).items() if str(op) in LINEAR_OPS)
    experts = sum(int(ops.get(torch.ops.aten.bmm, 0)) for name, ops in counts.items() if name.endswith(".experts"))
    total = sum(int(v) for op, v in counts["Global"].items() if str(op) in LINEAR_OPS) - lm_flops - padding.padded_flops
    return total + round(dense_experts * experts)


def oracle_decode_counts(model: torch.nn.Module, context: int, seed: int = 0) -> dict[str, dict[str, int]]:
    """FlopCounterMode's counts (module path → op → FLOPs; "Global" for all) of one decode step at
    `context` positions already cached: a prefill of `context` random tokens with the cache on, then
    one token through transformers' recurrent / cached path."""
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, VOCAB), (1, context + 1), generator=gen)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = model(input_ids=ids[:, :context], use_cache=True).past_key_values
        with counter:
            model(input_ids=ids[:, context:], past_key_values=cache, use_cache=True)
    root = type(model).__name__
    return {("Global" if k == "Global" else k.removeprefix(root + ".")): {str(op): int(v) for op, v in ops.items()}
            for k, ops in counter.get_flop_counts().items()}
