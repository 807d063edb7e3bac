"""Weight storage width and compute dtype from a HF `quantization_config` (DESIGN §4, §7).

The compute dtype follows the activations: fp8/int8 only where activations are quantized
too; weight-only formats (AWQ, GPTQ, bitsandbytes 4-bit, MXFP4) compute at the activation
dtype but read fewer weight bytes.
"""

from __future__ import annotations

from typing import Any, Mapping

from serving_mfu.model.dtypes import dtype_bytes, short_dtype


def _group_bits(bits: float, group_size: int | None, scale_bits: int = 16) -> float:
    """Storage bits per weight of a group-quantized format: the weight plus its share of one scale."""
    if group_size and group_size > 0:
        return bits + scale_bits / group_size
    return bits


def _compressed_tensors(qc: Mapping[str, Any], act_dtype: str) -> tuple[float, str]:
    weight_bits = None
    compute = act_dtype
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("num_bits"):
            weight_bits = _group_bits(float(weights["num_bits"]), weights.get("group_size"))
            if weights.get("num_bits") == 8:
                weight_bits = 8.0
        acts = group.get("input_activations") or {}
        if acts.get("num_bits") == 8:
            compute = "fp8" if acts.get("type", "float") == "float" else "int8"
        elif acts.get("num_bits") == 4 and acts.get("type", "float") == "float":
            compute = "fp4"
    return (weight_bits if weight_bits is not None else dtype_bytes(act_dtype) * 8), compute


def weight_bits_and_compute_dtype(
    quantization_config: Mapping[str, Any] | None, act_dtype: str
) -> tuple[float, str]:
    """Return (bits stored per linear weight, compute dtype) for a quantization config."""
    if not quantization_config:
        return dtype_bytes(act_dtype) * 8, short_dtype(act_dtype)
    qc = quantization_config
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        # Dynamic or static activation scales: both quantize activations to fp8.
        return 8.0, "fp8"
    if method in ("awq", "gptq", "gptq_marlin", "awq_marlin", "auto-round", "autoround"):
        bits = float(qc.get("bits", qc.get("w_bit", 4)))
        group = qc.get("group_size", qc.get("q_group_size", 128))
        return _group_bits(bits, group), short_dtype(act_dtype)
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return _group_bits(4.0, qc.get("bnb_4bit_blocksize", 64), 32), short_dtype(act_dtype)
        return 8.0, short_dtype(act_dtype)
    if method == "mxfp4":
        return _group_bits(4.0, 32, 8), short_dtype(act_dtype)
    if method == "compressed-tensors":
        bits, compute = _compressed_tensors(qc, act_dtype)
        return bits, short_dtype(compute)
    if method in ("modelopt", "modelopt_fp4"):
        algo = str(qc.get("quant_algo", qc.get("quantization", {}).get("quant_algo", ""))).upper()
        if "FP4" in algo:
            return _group_bits(4.0, 16, 8), "fp4"
        if "FP8" in algo:
            return 8.0, "fp8"
    # Unknown method: assume weights at the activation width (counted as approximate upstream).
    return dtype_bytes(act_dtype) * 8, short_dtype(act_dtype)
