"""The model `serving-mfu reference-run` measures: a Llama built from a config with random weights, run as a
static batch (one prefill, then decode steps on transformers' DynamicCache) and timed step by step.

Why: the project's GPU side (peaks, NVML/GPM sampling, the time split on a real device) needs a run that
works on any CUDA machine, and vLLM's GPU wheel cannot be carried to the machines we borrow.  torch and
transformers are there, so this module drives `LlamaForCausalLM` directly, the way an engine would run
one static batch: B prompts of one length P (no padding), `logits_to_keep=1` (one logit row per
request, as a server samples), SDPA attention, the cache transformers builds.

- `SHAPES`: tiny (a CPU runs it in milliseconds), the Llama-3.2-1B and Llama-3-8B shapes.
- `build_model`: built on the meta device, then `to_empty` on the target device and filled there with
  random values, so an 8B model costs no CPU initialisation; the rotary buffers are computed again in fp32.
- `run_batch`: one prefill and `decode_steps` decode steps; each step's start and end are marks on one
  timeline (CUDA events on a GPU, read after one synchronize; `time.perf_counter` on a CPU).
- `count_oracle`: FlopCounterMode over one prefill and one decode step with eager attention (it counts
  the full s×s score square), split by `serving_mfu.tools.compare._count`.

torch and transformers are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from serving_mfu.model.spec import load_config
from serving_mfu.tools.compare import _count, _Counted
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS

_LLAMA_COMMON: dict[str, Any] = {
    "model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "rms_norm_eps": 1e-5, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
}

#: The shapes `--shape` names: Llama architecture, random weights.
SHAPES: dict[str, dict[str, Any]] = {
    # a CPU runs a step in about a millisecond (the test suite's --quick run)
    "tiny": {**_LLAMA_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False,
             "rope_theta": 10000.0, "max_position_embeddings": 4096},
    # meta-llama/Llama-3.2-1B config.json (its llama3 rope scaling left out: it changes no FLOP and no byte)
    "1b": {**_LLAMA_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
           "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    # meta-llama/Meta-Llama-3-8B config.json (serving_mfu.tools.public_configs)
    "8b": {**_LLAMA_COMMON, **PUBLIC_CONFIGS["llama-3-8b"], "rope_theta": 500000.0,
           "max_position_embeddings": 8192},
}

#: Run dtype → the config's torch_dtype (which sets the spec's compute dtype, hence the peak's).
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: Config fields the shape summary reports.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings")


def model_config(shape: str | None, config_path: str | Path | None, dtype: str,
                 min_positions: int) -> tuple[str, dict[str, Any]]:
    """(name, HF config dict) of the model to run: a named shape or a Llama config.json, in `dtype`, with room
    for `min_positions` positions.  ValueError (ConfigError) for an unknown shape or a non-Llama config."""
    if config_path is not None:
        cfg = load_config(config_path)
        name = str(config_path)
        if cfg.get("model_type") != "llama":
            raise ValueError(f"{config_path}: reference-run builds Llama-architecture models, this config is "
                             f"model_type {cfg.get('model_type')!r}")
        if cfg.get("quantization_config"):
            raise ValueError(f"{config_path}: a quantized config; reference-run builds {dtype} weights")
        cfg = {**_LLAMA_COMMON, **cfg}
    elif shape in SHAPES:
        name, cfg = shape, dict(SHAPES[shape])
    else:
        raise ValueError(f"unknown shape {shape!r}: choose {', '.join(SHAPES)}, or --config")
    cfg = {k: v for k, v in cfg.items() if k not in ("dtype", "architectures", "auto_map")}
    cfg["torch_dtype"] = TORCH_DTYPES[dtype]
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings") or 0), min_positions)
    return name, cfg


def shape_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """The structural fields of a config, `head_dim` filled in where the config leaves it implicit."""
    out = {k: cfg[k] for k in SHAPE_FIELDS if cfg.get(k) is not None}
    out.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    out.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    return out


def build_model(cfg: dict[str, Any], device: str, seed: int = 0) -> Any:
    """`LlamaForCausalLM` for `cfg` on `device` in the config's dtype, SDPA attention, eval mode.

    Built on the meta device (no memory, no initialisation), moved with `to_empty`, then filled on the
    device: weight matrices N(0, initializer_range), norm weights 1; the rotary embedding (a buffer the
    meta build leaves empty) is built again, in fp32, on the CPU and moved.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    hf._attn_implementation = "sdpa"
    dtype = getattr(torch, cfg["torch_dtype"])
    with torch.device("meta"):
        model = LlamaForCausalLM(hf)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(cfg.get("initializer_range") or 0.02)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                parent, _, child = name.rpartition(".")
                with torch.device("cpu"):
                    fresh = type(module)(model.config)
                setattr(model.get_submodule(parent) if parent else model, child, fresh.to(device))
    return model.eval()


def set_attention(model: Any, implementation: str) -> None:
    """Switch the attention kernel of a built model (`sdpa` for the timed run, `eager` for the oracle)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:  # older transformers read the config's field at every forward
        model.config._attn_implementation = implementation


@dataclass(frozen=True)
class StepTime:
    """One forward pass on the run's timeline: its phase and its start and end, seconds."""

    phase: str  # "prefill" or "decode"
    t_start_s: float
    t_end_s: float


class _Timeline:
    """Marks on one clock: CUDA events on a GPU (read once the device is synchronized), perf_counter on a CPU."""

    def __init__(self, torch: Any, device: Any):
        self.torch = torch
        self.cuda = device.type == "cuda"
        self.base = self.mark()

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, mark: Any) -> float:
        """A mark's time on the timeline; on a GPU only after `sync()`."""
        return self.base.elapsed_time(mark) / 1e3 if self.cuda else mark

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def _prompts(torch: Any, model: Any, batch: int, prompt_len: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, int(model.config.vocab_size), (batch, prompt_len), generator=gen)
    return ids.to(next(model.parameters()).device)


def run_batch(model: Any, batch: int, prompt_len: int, decode_steps: int, *, seed: int = 0,
              on_phase: Callable[[str, str], None] = lambda phase, edge: None,
              on_step: Callable[[str], None] = lambda phase: None) -> tuple[list[StepTime], str]:
    """One prefill of `batch` prompts of `prompt_len` tokens, then `decode_steps` decode steps on the cache the
    prefill built (each feeds the previous step's greedy token); returns the steps' times and the cache class.

    `on_phase(phase, "start" | "end")` runs with the device synchronized at each phase's edges (where the
    caller reads GPU counters); `on_step(phase)` after each step is launched (progress)."""
    import torch

    ids = _prompts(torch, model, batch, prompt_len, seed)
    timeline = _Timeline(torch, ids.device)
    marks: list[tuple[str, Any, Any]] = []
    with torch.no_grad():
        timeline.sync()
        on_phase("prefill", "start")
        start = timeline.mark()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        marks.append(("prefill", start, timeline.mark()))
        on_step("prefill")
        timeline.sync()
        on_phase("prefill", "end")
        cache = out.past_key_values
        on_phase("decode", "start")
        for _ in range(decode_steps):
            token = out.logits[:, -1:].argmax(-1)
            start = timeline.mark()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            marks.append(("decode", start, timeline.mark()))
            on_step("decode")
        timeline.sync()
        on_phase("decode", "end")
    steps = [StepTime(phase, timeline.seconds(a), timeline.seconds(b)) for phase, a, b in marks]
    return steps, type(cache).__name__


def warm_up(model: Any, batch: int, prompt_len: int) -> None:
    """A short untimed prefill and two decode steps: kernel selection, allocator and library start-up."""
    run_batch(model, batch, max(2, min(prompt_len, 64)), 2, seed=1)


def count_oracle(model: Any, batch: int, prompt_len: int, seed: int = 0) -> tuple[_Counted, _Counted]:
    """FlopCounterMode's counts of one prefill (`logits_to_keep=1`) and one decode step on its cache (context
    `prompt_len + 1`), with eager attention; the model is switched back to SDPA afterwards."""
    import torch

    ids = _prompts(torch, model, batch, prompt_len, seed)
    set_attention(model, "eager")
    try:
        prefill, out = _count(model, input_ids=ids, logits_to_keep=1, use_cache=True)
        decode, _ = _count(model, input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                           use_cache=True, logits_to_keep=1)
    finally:
        set_attention(model, "sdpa")
    return prefill, decode


def release(device: str) -> None:
    """Give cached device memory back between batches (their KV caches are gone)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
