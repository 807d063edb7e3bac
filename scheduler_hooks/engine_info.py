"""What the accounting needs from a vLLM engine's configuration: model spec, devices, dtype, peak.

Devices per engine are TP × PP (one engine per data-parallel rank); the compute dtype follows
the model's dtype and quantization (serving_mfu.model.quantization); the KV-cache dtype comes from
`--kv-cache-dtype`; the peak from serving_mfu.peaks.resolve.resolve_peak (override, calibration
file, table row of the detected device, else the CPU default); the CUDA-graph settings that decide a
step's padding from `graph_config` (serving_mfu.cost.graph_padding).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from serving_mfu.cost.drafter import FREE_METHODS
from serving_mfu.cost.graph_padding import GraphConfig
from serving_mfu.derived import load_spec
from serving_mfu.model.dtypes import guess_storage_dtype
from serving_mfu.model.quantization import weight_bits_and_compute_dtype
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.resolve import resolve_peak
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class EngineInfo:
    spec: ModelSpec
    devices: int
    dp_rank: int
    kv_cache_dtype: str | None
    peak: PeakSpec | None
    peak_error: str | None
    spec_method: str | None
    num_spec_tokens: int
    draft_spec: ModelSpec | None
    kv_role: str = "none"  # producer | consumer | both | none (vLLM's kv_transfer_config.kv_role)
    kv_connector: str | None = None
    kv_cache_dtype_note: str | None = None  # set when the KV-cache dtype was unknown and its width guessed
    max_lora_rank: int | None = None  # --max-lora-rank with --enable-lora (None: LoRA off)
    # the drafter's batch as vLLM runs it: padded (every scheduled position, rejected drafts and unfinished
    # chunks included) under Model Runner V2 always, under V1 unless disable_padded_drafter_batch
    drafter_padded: bool = True
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # requests in flight at most (scheduler_config.max_num_seqs): the ledger's size
    graph: GraphConfig = field(default_factory=GraphConfig)  # CUDA-graph padding rules (pads nothing on CPU)


KV_ROLES = {"kv_producer": "producer", "kv_consumer": "consumer", "kv_both": "both"}


def kv_role(vllm_config: Any) -> tuple[str, str | None]:
    """The engine's KV-connector role (producer, consumer, both; none without a connector) and connector."""
    kt = getattr(vllm_config, "kv_transfer_config", None)
    connector = getattr(kt, "kv_connector", None) if kt is not None else None
    if not connector:
        return "none", None
    return KV_ROLES.get(str(getattr(kt, "kv_role", None)), "both"), str(connector)


def _config_dict(hf_config: Any) -> dict[str, Any]:
    data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    return data


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _max_lora_rank(vllm_config: Any) -> int | None:
    lc = getattr(vllm_config, "lora_config", None)
    return int(lc.max_lora_rank) if lc is not None else None


def _int_or(value: Any, default: Any) -> Any:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else default
    except (TypeError, ValueError):
        return default


def _model_runner_v2(vllm_config: Any) -> bool:
    """Whether the workers run Model Runner V2: vLLM's own `VllmConfig.use_v2_model_runner`
    (config/vllm.py:703-739: HiSparse or watermarking force it, else `VLLM_USE_V2_MODEL_RUNNER`, else V2
    when Triton is present and no feature it lacks is on), read on the engine's config as its workers
    read it.  Where that property is missing (another vLLM, a fake config) or fails, V2 unless
    `VLLM_USE_V2_MODEL_RUNNER` is explicitly off: the Triton and feature checks are not repeated here."""
    try:
        v2 = getattr(vllm_config, "use_v2_model_runner", None)
    except Exception:  # noqa: BLE001 - vLLM refuses a combination; the engine reports it, not us
        v2 = None
    if isinstance(v2, bool):
        return v2
    env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip()  # vLLM reads it as bool(int(value))
    return _int_or(env, 1) != 0 if env else True


def _drafter_padded(vllm_config: Any) -> bool:
    """Whether the drafter runs the padded batch (vLLM 0.32): always under Model Runner V2, whose drafters
    never read `disable_padded_drafter_batch`; under V1 unless it is set (and draft_model is padded-only)."""
    sc = getattr(vllm_config, "speculative_config", None)
    return not bool(getattr(sc, "disable_padded_drafter_batch", False)) or _model_runner_v2(vllm_config)


def graph_config(vllm_config: Any) -> GraphConfig:
    """The engine's CUDA-graph settings (serving_mfu.cost.graph_padding.GraphConfig), every read defensive.

    On the CPU platform (and under --enforce-eager) vLLM sets `cudagraph_mode` to NONE and no capture
    sizes, so the result pads nothing; a CPU device, or a config that cannot be read (logged), gives
    `GraphConfig()` too.  The capture sizes are the scheduler-side ones: V1's rounding for speculative
    decoding, done in the worker, is applied by GraphConfig itself."""
    try:
        return _graph_config(vllm_config)
    except Exception as exc:  # noqa: BLE001 - an unreadable setting costs the padding, never the engine
        log.warning("serving-mfu: cannot read the CUDA-graph settings (%s); graph padding is not counted", exc)
        return GraphConfig()


def _graph_config(vllm_config: Any) -> GraphConfig:
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    cc = getattr(vllm_config, "compilation_config", None)
    mode = getattr(cc, "cudagraph_mode", None)
    mode = str(getattr(mode, "name", mode) or "NONE").upper()  # CUDAGraphMode.X.name is "X"
    sizes = getattr(cc, "cudagraph_capture_sizes", None) or ()
    if device == "cpu" or mode == "NONE" or not sizes:
        return GraphConfig()
    sc = getattr(vllm_config, "speculative_config", None)
    k = _int_or(getattr(sc, "num_speculative_tokens", None), 0) if sc is not None else 0
    q = _int_or(getattr(vllm_config, "uniform_decode_query_len", None), 1 + k)  # 1 + k (config/vllm.py:667)
    pc = getattr(vllm_config, "parallel_config", None)
    return GraphConfig(
        mode=mode, capture_sizes=tuple(int(s) for s in sizes),
        max_capture_size=_int_or(getattr(cc, "max_cudagraph_capture_size", None), None),
        uniform_decode_query_len=max(q, 1),
        max_num_seqs=_int_or(getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None), None),
        lora_enabled=getattr(vllm_config, "lora_config", None) is not None,
        specialize_lora=bool(getattr(cc, "cudagraph_specialize_lora", True)),
        dp_size=max(_int_or(getattr(pc, "data_parallel_size", 1), 1), 1),
        model_runner_v2=_model_runner_v2(vllm_config))


def engine_info(vllm_config: Any, settings: Settings) -> EngineInfo:
    """Read the engine's configuration once, at scheduler construction; the peak from `settings`."""
    mc = vllm_config.model_config
    cfg = _config_dict(mc.hf_config)
    act = _torch_dtype_name(mc.dtype)
    cfg["torch_dtype"] = act
    cfg.setdefault("_name_or_path", str(mc.model))
    spec = load_spec(cfg, hf_object=mc.hf_config)
    qcfg = cfg.get("quantization_config")
    if mc.quantization and not qcfg:
        qcfg = {"quant_method": mc.quantization}
    bits, compute = weight_bits_and_compute_dtype(qcfg, act)
    spec = replace(spec, act_dtype=act, weight_bits=bits, compute_dtype=compute, name=str(mc.model))
    pc = vllm_config.parallel_config
    devices = int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size)
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    kv, kv_note = None, None
    if cache_dtype not in ("auto", "None"):  # an unknown one (newer than our table) is guessed, and said so
        kv, kv_note = guess_storage_dtype(cache_dtype)
    peak, err = None, None
    try:
        peak = resolve_peak(compute, **settings.peak_inputs())
    except Exception as exc:  # an unusable peak leaves MFU null, it never stops the engine
        err = str(exc)
        log.warning("serving-mfu: no peak (%s); MFU will be reported as null", exc)
    sc = vllm_config.speculative_config
    method, k, draft = None, 0, None
    if sc is not None:
        method = str(sc.method)
        k = int(sc.num_speculative_tokens or 0)
        dmc = getattr(sc, "draft_model_config", None)
        if dmc is not None and method not in FREE_METHODS:
            try:
                dcfg = _config_dict(dmc.hf_config)
                dcfg["torch_dtype"] = act
                draft = load_spec(dcfg, hf_object=dmc.hf_config)
            except Exception as exc:
                log.warning("serving-mfu: cannot read the draft model config (%s); drafter FLOPs are 0", exc)
    role, connector = kv_role(vllm_config)
    return EngineInfo(spec=spec, devices=devices, dp_rank=int(getattr(pc, "data_parallel_rank", 0) or 0),
                      kv_cache_dtype=kv, peak=peak, peak_error=err, spec_method=method, num_spec_tokens=k,
                      draft_spec=draft, kv_role=role, kv_connector=connector,
                      kv_cache_dtype_note=kv_note, max_lora_rank=_max_lora_rank(vllm_config),
                      graph=graph_config(vllm_config), drafter_padded=_drafter_padded(vllm_config),
                      max_model_len=_int_or(getattr(getattr(vllm_config, "model_config", None), "max_model_len",
                                                    None), None),
                      max_num_seqs=_int_or(getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs",
                                                   None), None))
