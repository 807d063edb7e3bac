"""Other FLOP estimators, kept to show how far they land from the exact count (DESIGN §3).

All take a Hugging Face config dict and one slice -- `new_tokens` (q) new positions, KV
context `context_len` (c >= q) after the step, `logits_tokens` positions producing logits --
and return the FLOPs of one forward pass over that slice, whole model (not per GPU).

- `six_nd_flops`: the "2N per token" rule (inference analogue of training's 6ND).
- `s2_attention_flops`: 2N per token plus the textbook attention term 4 * L * d_model * q * c.
- `vllm_perf_flops`: vLLM's own estimator (`vllm/v1/metrics/perf.py`, vllm 0.32), called, not copied.

The parameter counter here is deliberately independent of `flops.py` / `components.py`.

What vLLM's estimator does differently from DESIGN §3 (line numbers: vllm 0.32 perf.py):

- Attention scores charge every new token the whole context: `attn_qk = attn_av =
  2 * heads * sum(q * c) * head_dim` per layer (603-604, MLA: 874-875) -- no causal
  discount, so a full prefill costs c^2 where the causal count is c(c+1)/2 (~2x).
  Sliding-window layers clamp c to the window per request, still q * min(c, w) (154-157, 606-609).
- FFN is always SwiGLU, 3 matrices (1226, 1230, 1234), even for a 2-matrix GELU MLP;
  `intermediate_size` defaults to 4 * hidden when absent (1022).
- No router FLOPs (hidden x num_experts) at all (1224-1236).
- Shared experts are `n_shared_experts`/`num_shared_experts` x `moe_intermediate_size`
  (1030-1032, 1234): Qwen2-MoE's `shared_expert_intermediate_size` is not read, so its
  shared expert (and its sigmoid gate) is dropped entirely.
- Every layer is MoE unless `interleave_moe_layer_step` or both `moe_layer_freq` and
  `first_k_dense_replace` are set (1036, 1072-1106): Qwen-MoE `mlp_only_layers` /
  `decoder_sparse_step` are ignored (dense layers billed as routed experts).
- LM head: one logit position per prefill request, every decode token (185); a request is
  prefill when it is new or schedules > 1 token (1554, 1569), so a speculative verify step
  (q = k+1 > 1) is billed 1 logit position, not k+1.  The `logits_tokens` argument cannot be
  passed to it; see `vllm_perf_flops`.
- MLA: the non-absorbed form -- `kv_b_proj` on the q new tokens only (871), scores over
  qk_nope+qk_rope and v_head_dim (874-875).
- A component whose parser raises `InvalidComponent` (e.g. a quantization method missing
  from its table, 470-473, 1127-1130) is silently dropped from the total (1483-1488).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

__all__ = [
    "ParamCounts",
    "count_params",
    "six_nd_flops",
    "s2_attention_flops",
    "vllm_perf_flops",
]


# --------------------------------------------------------------------------------------
# Parameter counter (independent of serving_mfu.cost.flops / components / model_spec)
# --------------------------------------------------------------------------------------

_QKV_BIAS_ONLY = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}  # q/k/v bias, o without
_QK_NORM = {"qwen3", "qwen3_moe", "gemma3_text", "olmo2"}
_FOUR_NORMS = {"gemma2", "gemma3_text"}  # pre/post norms around attention and MLP


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts from a config.

    `body_*` is everything but the token embedding and the LM head (attention, MLP/MoE,
    router, norms, biases); `body_active` counts only `top_k` routed experts per MoE layer.
    `lm_head` is counted even when tied to the embedding: it is still a matmul.
    """

    embedding: int
    lm_head: int
    body_total: int
    body_active: int

    @property
    def per_token(self) -> int:
        """N in the 2N-per-token rule: active non-embedding params + LM head (Kaplan et al.)."""
        return self.body_active + self.lm_head


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's config (multimodal wrappers keep it in `text_config`)."""
    cfg = dict(config)
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and (text.get("hidden_size") or "hidden_size" not in cfg):
        inner = dict(text)
        inner.setdefault("model_type", f"{cfg.get('model_type', '')}_text")
        return _text_config(inner)
    return cfg


def _first(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _num_experts(cfg: Mapping[str, Any]) -> int:
    return int(_first(cfg, "num_experts", "num_local_experts", "n_routed_experts", default=0) or 0)


def _is_moe_layer(cfg: Mapping[str, Any], i: int) -> bool:
    """Where the config places MoE blocks (DeepSeek, Qwen-MoE, Llama-4 conventions)."""
    if _num_experts(cfg) == 0:
        return False
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        return i >= int(cfg.get("first_k_dense_replace") or 0) and i % int(cfg.get("moe_layer_freq") or 1) == 0
    if i in (cfg.get("mlp_only_layers") or []):
        return False
    step = int(_first(cfg, "decoder_sparse_step", "interleave_moe_layer_step", default=1) or 1)
    return (i + 1) % step == 0


def _attention_params(cfg: Mapping[str, Any], model_type: str) -> int:
    d = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    bias = bool(cfg.get("attention_bias", False))
    if cfg.get("kv_lora_rank"):  # MLA (DeepSeek-V2/V3)
        nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        v, kv_rank, q_rank = int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank")
        if q_rank:
            q = d * q_rank + q_rank + q_rank * heads * (nope + rope) + (q_rank if bias else 0)
        else:
            q = d * heads * (nope + rope)
        kv = d * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v) + ((kv_rank + rope) if bias else 0)
        return q + kv + heads * v * d + (d if bias else 0)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or d // heads)
    qkv_out = (heads + 2 * kv_heads) * hd
    n = d * qkv_out + heads * hd * d
    if model_type in _QKV_BIAS_ONLY:
        n += qkv_out
    elif bias:
        n += qkv_out + d
    if model_type in _QK_NORM:
        n += 2 * hd
    if model_type == "gpt_oss":
        n += heads  # attention sinks
    return n


def _mlp_params(d: int, inter: int, gated: bool, bias: bool) -> int:
    mats = 3 if gated else 2
    return mats * d * inter + ((mats - 1) * inter + d if bias else 0)


def count_params(config: Mapping[str, Any]) -> ParamCounts:
    """Count parameters from a HF config: dense Llama-style (GQA, head_dim override), MoE, MLA.

    Counted: every matrix, bias and norm weight a transformers model has.  Not counted:
    DeepSeek-V3's `e_score_correction_bias` (a buffer in transformers, no matmul).
    """
    cfg = _text_config(config)
    model_type = str(cfg.get("model_type", ""))
    d = int(cfg["hidden_size"])
    vocab = int(cfg["vocab_size"])
    layers = int(cfg["num_hidden_layers"])
    gated = bool(cfg.get("gated_mlp", True))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    n_exp = _num_experts(cfg)
    top_k = int(_first(cfg, "num_experts_per_tok", "experts_per_token", "moe_top_k", "top_k", default=0) or 0)
    if n_exp and not top_k:
        raise ValueError(f"MoE config ({model_type!r}) without num_experts_per_tok")
    moe_inter = int(_first(cfg, "moe_intermediate_size", "intermediate_size", default=4 * d))

    attn = _attention_params(cfg, model_type)
    norms = (4 if model_type in _FOUR_NORMS else 2) * d
    total = active = d  # final norm
    for i in range(layers):
        total += attn + norms
        active += attn + norms
        if not _is_moe_layer(cfg, i):
            dense = _mlp_params(d, int(cfg.get("intermediate_size") or 4 * d), gated, mlp_bias)
            total += dense
            active += dense
            continue
        expert = _mlp_params(d, moe_inter, gated, model_type == "gpt_oss")
        router = d * n_exp + (n_exp if model_type == "gpt_oss" else 0)
        shared = 0
        if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: own size + sigmoid gate
            shared = _mlp_params(d, int(cfg["shared_expert_intermediate_size"]), gated, False) + d
        elif _first(cfg, "n_shared_experts", "num_shared_experts", default=0):
            n_sh = int(_first(cfg, "n_shared_experts", "num_shared_experts"))
            shared = _mlp_params(d, n_sh * moe_inter, gated, False)
        total += router + shared + n_exp * expert
        active += router + shared + top_k * expert
    return ParamCounts(embedding=vocab * d, lm_head=vocab * d, body_total=total, body_active=active)


# --------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------


def six_nd_flops(config: Mapping[str, Any], new_tokens: int, context_len: int, logits_tokens: int = 1) -> int:
    """The "2N per token" rule (inference half of 6ND): 2 * N * q.

    N = non-embedding parameters + LM head (Kaplan et al. 2020), and for MoE the ACTIVE count
    (attention + router + top_k routed experts + shared experts + norms).  Context length
    and logits positions play no part in this rule (`context_len`, `logits_tokens` unused:
    the LM head is charged to every new token).
    """
    del context_len, logits_tokens
    return 2 * count_params(config).per_token * int(new_tokens)


def s2_attention_flops(config: Mapping[str, Any], new_tokens: int, context_len: int, logits_tokens: int = 1) -> int:
    """The textbook formula: 2N * q + 4 * L * d_model * q * c.

    Weights as in `six_nd_flops`; attention (QK^T + scores.V, 2 * d_model * c each per new
    token per layer) with every new token seeing the whole context c and no causal discount,
    so a full prefill (q = c) costs 4 * L * d_model * s^2.  d_model is `hidden_size`, not
    heads * head_dim (that is what the articles write); no sliding-window clamp.
    """
    cfg = _text_config(config)
    q, c = int(new_tokens), int(context_len)
    attention = 4 * int(cfg["num_hidden_layers"]) * int(cfg["hidden_size"]) * q * c
    return six_nd_flops(config, q, c, logits_tokens) + attention


@functools.lru_cache(maxsize=32)
def _vllm_model_metrics(config_json: str) -> Any:
    """vLLM's `ModelMetrics` for a config, or the error that prevented it (both cached)."""
    try:
        return _build_vllm_model_metrics(config_json)
    except Exception as exc:
        return exc


@contextlib.contextmanager
def _transformers_registry_kept(model_type: str) -> Iterator[None]:
    """Undo what loading a config of `model_type` through vLLM does to transformers in this process:
    vLLM registers its own config class for some model types and renames that class
    (`_register_config_class` sets e.g. `DeepseekV3Config.model_type = "deepseek_v32"`,
    vllm/transformers_utils/config.py, 0.32), after which every DeepSeek-V3 config in the process says
    it is a V3.2.  That class's `model_type` and AutoConfig's registrations are put back as they were."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        from vllm.transformers_utils.config import _CONFIG_REGISTRY
    except ImportError:  # another vLLM layout: AutoConfig's registrations are still put back
        _CONFIG_REGISTRY = {}
    cls = _CONFIG_REGISTRY[model_type] if model_type in _CONFIG_REGISTRY else None
    own = cls.__dict__.get("model_type") if cls is not None else None
    extra = dict(CONFIG_MAPPING._extra_content)
    try:
        yield
    finally:
        if cls is not None and cls.__dict__.get("model_type") != own:
            cls.model_type = own
        CONFIG_MAPPING._extra_content.clear()
        CONFIG_MAPPING._extra_content.update(extra)


def _build_vllm_model_metrics(config_json: str) -> Any:
    """Build vLLM's `ModelMetrics` from a real `VllmConfig` (ModelConfig over a temp config.json)."""
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.metrics.perf import ModelMetrics

    model_type = str(json.loads(config_json).get("model_type", ""))
    with tempfile.TemporaryDirectory(prefix="serving_mfu_vllm_cfg_") as folder, _transformers_registry_kept(model_type):
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(config_json)
        model_config = ModelConfig(model=folder, skip_tokenizer_init=True)
        metrics = ModelMetrics(VllmConfig(model_config=model_config))
    if not metrics.is_enabled():
        raise RuntimeError("vLLM instantiated no ComponentMetrics for this config")
    return metrics


def _config_for_vllm(config: Mapping[str, Any]) -> dict[str, Any]:
    """The dict vLLM's ModelConfig can load here: with `architectures`, without quantization."""
    cfg = dict(config)
    if not cfg.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(cfg.get("model_type")))
        if arch is None:
            raise ValueError(f"no 'architectures' and no causal-LM class for model_type {cfg.get('model_type')!r}")
        cfg["architectures"] = [arch]
    # FLOPs do not depend on weight bytes, and building a quant config needs weights/kernels.
    cfg.pop("quantization_config", None)
    return cfg


def vllm_perf_flops(
    config: Mapping[str, Any],
    new_tokens: int,
    context_len: int,
    logits_tokens: int = 1,
    *,
    is_prefill: bool | None = None,
) -> int | None:
    """vLLM's own MFU estimator (`vllm.v1.metrics.perf.ModelMetrics`), whole model.

    Builds a real `VllmConfig` from the config (written to a temp folder as config.json;
    cached per config), feeds an `ExecutionContext` with one request (q, c) and returns
    `get_num_flops(ctx, per_gpu=False)`, summed over its components.  `is_prefill` defaults
    to vLLM's own rule (perf.py 1554, 1569): new request (c == q) or q > 1.  `logits_tokens`
    is not used: vLLM derives logit positions itself (1 per prefill, q per decode, line 185).
    Returns None (logged) when vLLM is not importable or cannot build its config.
    """
    del logits_tokens
    try:
        from vllm.v1.metrics.perf import ExecutionContext
    except Exception as exc:  # ImportError, or a vLLM build that fails at import
        log.warning("vllm_perf_flops: vLLM not importable (%s)", exc)
        return None
    q, c = int(new_tokens), int(context_len)
    if is_prefill is None:
        is_prefill = q > 1 or c == q
    try:
        metrics = _vllm_model_metrics(json.dumps(_config_for_vllm(config), sort_keys=True))
    except Exception as exc:
        metrics = exc
    if isinstance(metrics, Exception):
        log.warning("vllm_perf_flops: vLLM could not build its config (%s: %s)", type(metrics).__name__, metrics)
        return None
    ctx = ExecutionContext.from_single_request(q, c, is_prefill)
    return int(metrics.get_num_flops(ctx, per_gpu=False))
