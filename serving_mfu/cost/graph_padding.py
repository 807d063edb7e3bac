"""CUDA-graph padding: how many tokens a step's forward really runs, as vLLM 0.32 decides it on a GPU.

A step that replays a CUDA graph runs the graph's captured token count, not its own: vLLM pads the batch up
to a captured size, and the padded positions go through every linear layer.  Their FLOPs are executed but
do no useful work (`graph_padding`).  This module works out that count from the engine's configuration,
with the same rules as vLLM's dispatchers.  It imports nothing from vLLM and reads nothing from the
environment.  Sources are vLLM 0.32.0 as installed; paths are under `vllm/`.

Where the rules live.  vLLM 0.32 has two GPU model runners, and they pad differently:

* **V2** (`v1/worker/gpu/`) is the default whenever Triton is present and the features are supported
  (`VllmConfig.use_v2_model_runner`, config/vllm.py:703-739; env `VLLM_USE_V2_MODEL_RUNNER`).
  Its `CudaGraphManager` builds graph descriptors (`_init_candidates`, v1/worker/gpu/cudagraph_utils.py:251-389)
  and its `dispatch` (cudagraph_utils.py:518-548) picks, for `n` tokens, the smallest FULL descriptor with
  at least `n` tokens, then the smallest PIECEWISE one, and keeps the first compatible one
  (`_is_compatible`, cudagraph_utils.py:106-133).  If neither fits, the step runs eagerly on `n` tokens.
  The run pads to `max(n, desc.num_tokens)` (v1/worker/gpu/model_runner.py:1362).
* **V1** (`v1/worker/gpu_model_runner.py`) calls `CudagraphDispatcher.dispatch` (v1/cudagraph_dispatcher.py:233-322)
  from `_determine_batch_execution_and_padding` (gpu_model_runner.py:3718-3821).  It pads `n` with
  `_bs_to_padded_graph_size` (cudagraph_dispatcher.py:71-90: the smallest capture size >= n) and keeps that
  size only if a key was captured for it: FULL first, then the relaxed PIECEWISE key (:305-316).
  Otherwise it runs NONE on `n` (:318-322).  The forward runs `batch_desc.num_tokens` tokens
  (gpu_model_runner.py:4052).

The rules this module encodes:

1. No padding when the mode is NONE or there are no capture sizes, or when `n` exceeds
   `max_cudagraph_capture_size` (V1: cudagraph_dispatcher.py:272-279; V2: no candidate above the largest
   size, cudagraph_utils.py:384-389 and :530).
2. Modes (config/compilation.py:53-110).  `FULL_DECODE_ONLY = (FULL, NONE)` and
   `FULL_AND_PIECEWISE = (FULL, PIECEWISE)` split decode from mixed batches (`separate_routine`, :96-97).
   `decode_mode`/`mixed_mode` (:65-69) give the mode for uniform-decode and mixed batches.
   PIECEWISE and FULL use one routine for every batch.
3. Graph sizes per batch kind.
   * Mixed batches (anything but a uniform decode) go to the mixed mode's graphs, at every capture size
     (V1: cudagraph_dispatcher.py:187-201; V2: cudagraph_utils.py:346-369).  Piecewise graphs pad exactly
     like full ones: every capture size has a PIECEWISE key, so a PIECEWISE step runs the smallest size
     >= n.  `FULL_DECODE_ONLY` has no mixed graphs, so a mixed batch runs eagerly, unpadded.
   * Uniform decode batches get separate FULL graphs only in the two split modes.  V1 captures them at the
     capture sizes `x` with `q <= x <= q * max_num_seqs` (cudagraph_dispatcher.py:205-229, `q` being the
     uniform decode query length) and needs the exact padded size among them (:130-152, :305-309).  V2
     rounds every capture size up to a multiple of `q` and keeps it if it is `<= q * max_num_seqs` and
     `<= max_cudagraph_capture_size` (cudagraph_utils.py:314-338).  A uniform decode that no FULL graph
     covers falls back to the mixed mode: PIECEWISE in FULL_AND_PIECEWISE, eager in FULL_DECODE_ONLY.
     In PIECEWISE and FULL modes a uniform decode is dispatched like any other batch (V1: :300; V2: the
     mixed descriptors carry no `uniform_token_count`, cudagraph_utils.py:359-365).
4. Uniform decode means every request runs exactly `q = 1 + num_speculative_tokens` tokens
   (cudagraph_dispatcher.py:36; config/vllm.py:667-685).  The V1 test is
   `max_num_scheduled_tokens == q and num_tokens == q * num_reqs` (gpu_model_runner.py:3654-3671).  V2
   also requires that no request is still prefilling, unless it runs as a decode
   (v1/worker/gpu/model_runner.py:1322-1335, v1/worker/utils.py:958-975, `uniform_decode=... ==
   self.decode_query_len` at model_runner.py:1797).  The caller decides; this module takes a flag.
5. Speculative decoding (q > 1), V1 only: when the decode mode is FULL, every capture size is rounded up
   to a multiple of q (sizes that would pass the max are dropped) before the keys are built.  This applies
   to mixed batches too (`adjust_cudagraph_sizes_for_spec_decode`, config/compilation.py:1497-1501 and
   :1530-1557).  It happens in the worker, so a scheduler-side config may still show the raw sizes.  The
   rounding is idempotent, and this module applies it itself.  V2 leaves the sizes alone and rounds only
   its decode graphs (rule 3).
6. LoRA.  V1 with LoRA enabled and `cudagraph_specialize_lora=False` captures graphs only with LoRA
   active (cudagraph_dispatcher.py:110-128).  A step without an active adapter
   (`has_lora = num_active_loras > 0`, gpu_model_runner.py:3755-3760) finds no key and runs eagerly,
   unpadded.  Otherwise, in V1 (:281-298) and in V2 (v1/worker/gpu/lora_utils.py:20-35 with
   cudagraph_utils.py:198-222), the LoRA count only selects among graphs of the same sizes and never
   changes the padded count.
7. Data parallel (dp_size > 1).  The ranks agree on one graph mode, the minimum over the ranks
   (NONE < PIECEWISE < FULL).
   * V1: if that mode is not NONE, every rank pads to the largest padded count over the ranks
     (v1/worker/dp_utils.py:99-111, :114-119, :181-185; gpu_model_runner.py:3780-3803).  If it is NONE,
     each rank keeps the count its own dispatch padded to (dp_utils.py:71, :111) and runs it eagerly
     (gpu_model_runner.py:3793-3800, re-dispatched with only NONE allowed: cudagraph_dispatcher.py:272-279).
   * V2: if any rank dispatched NONE, every rank runs its own unpadded count (v1/worker/gpu/dp_utils.py:155-172).
     Otherwise every rank dispatches the largest unpadded count over the ranks, as a uniform decode only
     if every rank is one (:86-91, :178-198).
   Microbatching (DBO) is not modelled.  An idle DP rank runs a dummy uniform decode of `q` tokens
   (v1/worker/gpu_worker.py:1431-1437).
8. Exact counts.  With `--cudagraph-metrics` (`ObservabilityConfig.cudagraph_metrics`,
   config/observability.py:82-84) each step's `ModelRunnerOutput.cudagraph_stats` (v1/outputs.py:305-306)
   is a `CUDAGraphStat` (compilation/cuda_graph.py:32-37) with fields `num_unpadded_tokens`,
   `num_padded_tokens`, `num_paddings` (= padded - unpadded) and `runtime_mode` ("NONE", "PIECEWISE" or
   "FULL").  V1 fills it after DP padding (gpu_model_runner.py:3805-3812); V2 fills it for real
   (non-dummy) steps (v1/worker/gpu/model_runner.py:1805-1810, cudagraph_utils.py:83-91).  Otherwise it is
   None.  The scheduler forwards it as `SchedulerStats.cudagraph_stats` (v1/core/sched/scheduler.py:2042,
   v1/metrics/stats.py:253).  `padding_from_stats` reads it, and the exact counts take precedence over
   this model.

Padding is 0 on CPU.  The CPU platform has no static graphs: `support_static_graph_mode` is False in
`Platform` (platforms/interface.py:1347-1349) and platforms/cpu.py does not override it (only CUDA does,
platforms/cuda.py:685-686).  So `VllmConfig` forces `cudagraph_mode = NONE` (config/vllm.py:1874, 1939-1940),
and platforms/cpu.py:353 empties `cudagraph_capture_sizes`.  `GraphConfig()` (mode NONE) is that
configuration.

Default capture sizes.  Without an explicit list, `VllmConfig._set_cudagraph_sizes` (config/vllm.py:2292-2550)
builds `[1, 2, 4] + range(8, 256, 8) + range(256, max + 1, 16)` up to
`max = min(2 * max_num_seqs * q, 512)` (1024 on data-center Blackwell), capped by `max_num_batched_tokens`.
It adds `max_num_batched_tokens` itself when that fits, and `max_num_seqs` (q = 1) or the uniform decode
sizes `n * q` (q > 1) below the ceiling.  `default_capture_sizes` mirrors it.

Not modelled: dynamic speculative decoding (several decode query lengths, cudagraph_utils.py:268-295),
V2's varlen decode graphs under adaptive verification (:297-313), microbatching (DBO), prefill context
parallelism's token count (v1/worker/gpu/model_runner.py:1763-1767), encoder-decoder steps with encoder
inputs (V1 forbids FULL for them, gpu_model_runner.py:3750-3773; V2 runs them eagerly,
v1/worker/gpu/model_runner.py:1777-1791), and the attention-backend downgrades of the mode
(`resolve_cudagraph_mode_and_sizes`, config/compilation.py:1369-1528), which happen in the worker.  Give
`mode` as resolved there when it is known.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# CUDAGraphMode's names (config/compilation.py:59-63); str(CUDAGraphMode.X) is "X" (:106-107).
MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
# mode -> (decode_mode, mixed_mode), config/compilation.py:65-69
_ROUTINES = {"NONE": ("NONE", "NONE"), "PIECEWISE": ("PIECEWISE", "PIECEWISE"), "FULL": ("FULL", "FULL"),
             "FULL_DECODE_ONLY": ("FULL", "NONE"), "FULL_AND_PIECEWISE": ("FULL", "PIECEWISE")}
# runtime modes are compared by value across DP ranks (v1/worker/dp_utils.py:114-119; gpu/dp_utils.py:155)
_RANK = {"NONE": 0, "PIECEWISE": 1, "FULL": 2}


@dataclass(frozen=True)
class GraphConfig:
    """vLLM's CUDA-graph settings for one engine.  Every field is plain data the hook copies from the config.

    mode: `str(compilation_config.cudagraph_mode)`, one of MODES ("NONE" on CPU and under --enforce-eager).
    capture_sizes: `compilation_config.cudagraph_capture_sizes` (kept sorted and without duplicates).
    max_capture_size: `compilation_config.max_cudagraph_capture_size`; None means the largest capture size.
    uniform_decode_query_len: `vllm_config.uniform_decode_query_len`, i.e. `1 + num_speculative_tokens`
        (V2's `decode_query_len` is the same unless a model samples several tokens per step,
        v1/worker/gpu/model_runner.py:435-438).
    max_num_seqs: `scheduler_config.max_num_seqs`, which bounds the uniform decode graphs; None means no bound.
    lora_enabled: `vllm_config.lora_config is not None`.
    specialize_lora: `compilation_config.cudagraph_specialize_lora` (vLLM's default is True).  Whether a step
        has an active LoRA matters only when `lora_active_matters` is True (V1, LoRA on, not specialized).
    dp_size: `parallel_config.data_parallel_size`.
    model_runner_v2: `vllm_config.use_v2_model_runner` (True is vLLM 0.32's default on GPUs).
    """

    mode: str = "NONE"
    capture_sizes: tuple[int, ...] = ()
    max_capture_size: int | None = None
    uniform_decode_query_len: int = 1
    max_num_seqs: int | None = None
    lora_enabled: bool = False
    specialize_lora: bool = True
    dp_size: int = 1
    model_runner_v2: bool = True

    def __post_init__(self) -> None:
        mode = str(self.mode).upper()
        if mode not in MODES:
            raise ValueError(f"unknown cudagraph mode {self.mode!r}; expected one of {MODES}")
        sizes = tuple(sorted({int(s) for s in self.capture_sizes}))
        if any(s < 1 for s in sizes):
            raise ValueError(f"capture sizes must be positive: {sizes}")
        top = self.max_capture_size
        if top is None:
            top = sizes[-1] if sizes else 0
        elif sizes and int(top) != sizes[-1]:  # vLLM asserts the same (config/compilation.py:1152-1153)
            raise ValueError(f"max_capture_size {top} is not the largest capture size {sizes[-1]}")
        if self.uniform_decode_query_len < 1:
            raise ValueError("uniform_decode_query_len must be at least 1")
        if self.dp_size < 1:
            raise ValueError("dp_size must be at least 1")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "capture_sizes", sizes)
        object.__setattr__(self, "max_capture_size", int(top))

    @property
    def enabled(self) -> bool:
        """Whether any step can replay a graph at all."""
        return self.mode != "NONE" and bool(self.capture_sizes) and bool(self.max_capture_size)

    @property
    def lora_active_matters(self) -> bool:
        """V1 with LoRA on and `cudagraph_specialize_lora=False` captures only LoRA-active graphs
        (cudagraph_dispatcher.py:126-128), so a step without an active adapter runs eagerly."""
        return not self.model_runner_v2 and self.lora_enabled and not self.specialize_lora


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _smallest_at_least(sizes: Sequence[int], n: int) -> int | None:
    i = bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def default_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, uniform_decode_query_len: int = 1, *,
                          max_capture_size: int | None = None, platform_max: int = 512,
                          interactivity: bool = False) -> tuple[int, ...]:
    """vLLM's default `cudagraph_capture_sizes` when none are given (config/vllm.py:2341-2542).

    max_capture_size: a user-set `max_cudagraph_capture_size` (None: the default ceiling).
    platform_max: 512, or 1024 on data-center Blackwell (config/vllm.py:2357-2359).
    interactivity: `performance_mode == "interactivity"` (every size from 1 to 32, config/vllm.py:2467-2471).
    Dynamic speculative decoding's extra decode tiers (config/vllm.py:2390-2433) are not modelled.
    The largest size returned is the resulting `max_cudagraph_capture_size` (config/vllm.py:2503-2525)."""
    q = uniform_decode_query_len
    uniform_sizes: list[int] = []
    top = max_capture_size
    if top is None:
        top = min(max_num_seqs * q * 2, platform_max)  # config/vllm.py:2357-2364
        if q > 1:  # request-count grid scaled by q (config/vllm.py:2365-2442)
            reqs = min(max_num_seqs, platform_max)
            counts = [n for n in (1, 2, 4) if n <= reqs] + list(range(8, min(reqs + 1, 256), 8))
            counts = sorted(set(counts + list(range(256, reqs + 1, 16)) + [reqs]))
            uniform_sizes = sorted({n * q for n in counts if n * q <= top})
        elif max_num_seqs <= top:  # config/vllm.py:2443-2444
            uniform_sizes = [max_num_seqs]
    top = min(max_num_batched_tokens, top)  # config/vllm.py:2445-2446
    if top < 1:
        raise ValueError("the largest capture size must be at least 1")
    if interactivity:  # config/vllm.py:2467-2475
        sizes = list(range(1, min(top, 32) + 1))
    else:
        sizes = [i for i in (1, 2, 4) if i <= top]
    if top >= 8:  # config/vllm.py:2476-2480
        sizes += list(range(8, min(top + 1, 256), 8))
    if top >= 256:  # config/vllm.py:2481-2485
        sizes += list(range(256, top + 1, 16))
    if max_num_batched_tokens <= top:  # config/vllm.py:2486-2491
        sizes.append(max_num_batched_tokens)
    sizes += [s for s in uniform_sizes if s <= max_num_batched_tokens]  # config/vllm.py:2492-2499
    return tuple(sorted(set(sizes)))


def _v1_sizes(config: GraphConfig) -> tuple[int, ...]:
    """Capture sizes as V1's worker leaves them (config/compilation.py:1497-1501, :1530-1557)."""
    q, sizes, top = config.uniform_decode_query_len, config.capture_sizes, config.max_capture_size
    if q <= 1 or _ROUTINES[config.mode][0] != "FULL" or not sizes:
        return sizes
    rounded = sorted({_round_up(s, q) for s in sizes if _round_up(s, q) <= top})
    if not rounded and q <= top:
        rounded = [q]
    if not rounded:  # vLLM refuses to start (config/compilation.py:1548-1555)
        raise ValueError(f"no capture size left after rounding to a multiple of {q}")
    return tuple(rounded)


def _dispatch_v1(n: int, uniform: bool, config: GraphConfig, has_lora: bool) -> tuple[str, int]:
    sizes = _v1_sizes(config)
    if n > sizes[-1]:  # cudagraph_dispatcher.py:272-279 (max size == sizes[-1] after rounding)
        return "NONE", n
    if config.lora_active_matters and not has_lora:  # no key with has_lora=False (:126-128)
        return "NONE", n
    padded = _smallest_at_least(sizes, n)  # _bs_to_padded_graph_size (:71-90)
    assert padded is not None
    mixed_mode = _ROUTINES[config.mode][1]
    q = config.uniform_decode_query_len
    if uniform and config.mode in ("FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"):  # normalized_uniform (:300)
        top = q * config.max_num_seqs if config.max_num_seqs is not None else sizes[-1]
        if q <= padded <= top:  # a uniform FULL key exists for it (:205-229)
            return "FULL", padded
    elif mixed_mode == "FULL":  # mode FULL: keys for every capture size (:187-201)
        return "FULL", padded
    if mixed_mode == "PIECEWISE":  # relaxed PIECEWISE key, every capture size (:199-201, :311-316)
        return "PIECEWISE", padded
    return "NONE", n


def _v2_decode_sizes(config: GraphConfig) -> tuple[int, ...]:
    """Token counts of V2's uniform-decode FULL graphs (cudagraph_utils.py:314-338)."""
    q, top = config.uniform_decode_query_len, config.max_capture_size
    cap = q * config.max_num_seqs if config.max_num_seqs is not None else top
    return tuple(sorted({r for r in (_round_up(s, q) for s in config.capture_sizes) if r <= cap and r <= top}))


def _dispatch_v2(n: int, uniform: bool, config: GraphConfig) -> tuple[str, int]:
    if n <= 0:  # dispatch needs a positive count (cudagraph_utils.py:530)
        return "NONE", n
    mixed_mode = _ROUTINES[config.mode][1]
    # in the split modes the FULL candidates are the decode graphs only, and their uniform_token_count admits
    # a uniform decode alone (cudagraph_utils.py:120-124)
    if uniform and config.mode in ("FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"):
        size = _smallest_at_least(_v2_decode_sizes(config), n)
        if size is not None:
            return "FULL", size
    # mixed descriptors at every capture size, no uniform_token_count (cudagraph_utils.py:346-369)
    if mixed_mode != "NONE":
        size = _smallest_at_least(config.capture_sizes, n)
        if size is not None:
            return mixed_mode, size
    return "NONE", n


def graph_dispatch(num_tokens: int, uniform_decode: bool, config: GraphConfig, *,
                   has_lora: bool = False) -> tuple[str, int]:
    """(runtime mode, tokens run) for one rank on its own: "NONE", "PIECEWISE" or "FULL", as the
    `runtime_mode` of a CUDAGraphStat, and the token count the forward runs (>= num_tokens)."""
    if num_tokens < 0:
        raise ValueError("num_tokens must not be negative")
    if not config.enabled or num_tokens == 0:
        return "NONE", num_tokens
    if config.model_runner_v2:
        return _dispatch_v2(num_tokens, uniform_decode, config)
    return _dispatch_v1(num_tokens, uniform_decode, config, has_lora)


def dp_padded_tokens(ranks: Sequence[tuple[int, bool]], config: GraphConfig, *,
                     has_lora: Sequence[bool] | bool = False) -> list[int]:
    """Tokens each data-parallel rank runs, given every rank's (num_tokens, uniform_decode) this step
    (rule 7 of the module docstring).  `has_lora` is one flag for all ranks or one per rank."""
    flags = [has_lora] * len(ranks) if isinstance(has_lora, bool) else list(has_lora)
    if len(flags) != len(ranks):
        raise ValueError("has_lora needs one flag per rank")
    local = [graph_dispatch(n, u, config, has_lora=f) for (n, u), f in zip(ranks, flags)]
    if len(ranks) <= 1:
        return [p for _, p in local]
    synced = min(_RANK[m] for m, _ in local)
    if config.model_runner_v2:
        if synced == 0:  # any rank eager: all eager, unpadded (gpu/dp_utils.py:155-172)
            return [n for n, _ in ranks]
        all_uniform = all(u for _, u in ranks)  # agreed uniform_token_count (:86-91)
        top = max(n for n, _ in ranks)  # :178
        return [graph_dispatch(top, all_uniform, config, has_lora=f)[1] for f in flags]  # :189-198
    if synced == 0:  # V1: no DP padding, each rank keeps its own count (dp_utils.py:99-111)
        return [p for _, p in local]
    top = max(p for _, p in local)  # the max padded count (dp_utils.py:104-110)
    return [top] * len(ranks)


def padded_tokens(num_tokens: int, uniform_decode: bool, config: GraphConfig, dp_max_tokens: int | None = None,
                  *, has_lora: bool = False) -> int:
    """How many tokens the step's forward runs on this rank, >= num_tokens.

    dp_max_tokens: with `config.dp_size > 1`, the largest scheduled (unpadded) token count over the DP ranks
    this step, this rank's included.  The other ranks are taken to be batches of the same kind
    (uniform decode or not) as this one; use `dp_padded_tokens` when every rank's batch is known.  Ignored
    when dp_size is 1 or it is None.
    has_lora: whether an adapter is active this step (it matters only when `config.lora_active_matters`).
    """
    if config.dp_size > 1 and dp_max_tokens is not None:
        if dp_max_tokens < num_tokens:
            raise ValueError(f"dp_max_tokens {dp_max_tokens} is below this rank's {num_tokens}")
        ranks = [(num_tokens, uniform_decode), (dp_max_tokens, uniform_decode)]
        return dp_padded_tokens(ranks, config, has_lora=has_lora)[0]
    return graph_dispatch(num_tokens, uniform_decode, config, has_lora=has_lora)[1]


def padding_from_stats(stats: Any) -> tuple[int, int] | None:
    """(unpadded, padded) tokens of a step from vLLM's CUDAGraphStat, or None without one.

    Takes a `CUDAGraphStat`-shaped object (`num_unpadded_tokens`, `num_padded_tokens`) or anything that
    carries one as `.cudagraph_stats` (ModelRunnerOutput, SchedulerStats).  None when vLLM runs without
    `--cudagraph-metrics` or on a dummy step, or when the fields are missing or not counts."""
    if stats is None:
        return None
    if not hasattr(stats, "num_padded_tokens") and hasattr(stats, "cudagraph_stats"):
        stats = stats.cudagraph_stats
        if stats is None:
            return None
    unpadded = getattr(stats, "num_unpadded_tokens", None)
    padded = getattr(stats, "num_padded_tokens", None)
    if isinstance(unpadded, bool) or isinstance(padded, bool):
        return None
    try:
        unpadded, padded = int(unpadded), int(padded)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if unpadded < 0 or padded < 0:
        return None
    return unpadded, padded
