"""What the accounting needs from a vLLM engine's configuration: model spec, devices, dtype, peak.

Devices per engine are TP × PP (one engine per data-parallel rank); the compute dtype follows
the model's dtype and quantization (serving_mfu.model.quantization); the KV-cache dtype comes from
`--kv-cache-dtype`; the peak from serving_mfu.peaks.resolve.resolve_peak (override, calibration
file, table row of the detected device, else the CPU default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from serving_mfu.cost.drafter import FREE_METHODS
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
                      kv_cache_dtype_note=kv_note, max_lora_rank=_max_lora_rank(vllm_config))
