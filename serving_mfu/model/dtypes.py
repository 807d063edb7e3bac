"""The one dtype table: every spelling of a dtype name → its short name and its width in bytes.

Configs say `bfloat16` or `torch.float16`, engines `fp8_e4m3`, peak tables `bf16`: all go
through `short_dtype` (lenient) or `normalize_dtype` (strict, for compute dtypes the user gives),
and `dtype_bytes` for storage widths.
"""

from __future__ import annotations

import re

from serving_mfu.model.errors import ConfigError

# short name → (bytes per element, spellings)
_DTYPES: dict[str, tuple[float, tuple[str, ...]]] = {
    "fp32": (4, ("fp32", "float32", "float")),
    "tf32": (4, ("tf32", "tensorfloat32")),
    "bf16": (2, ("bf16", "bfloat16")),
    "fp16": (2, ("fp16", "float16", "half")),
    "fp8": (1, ("fp8", "float8", "fp8_e4m3", "fp8_e5m2", "float8_e4m3fn", "float8_e5m2", "e4m3", "e5m2")),
    "int8": (1, ("int8", "i8")),
    "fp4": (0.5, ("fp4", "nvfp4", "mxfp4", "float4")),
    "int4": (0.5, ("int4",)),
}
ALIASES: dict[str, str] = {alias: short for short, (_, names) in _DTYPES.items() for alias in names}
COMPUTE_DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp8", "int8", "fp4")


def _key(name: str) -> str:
    return str(name).strip().lower().removeprefix("torch.")


def short_dtype(name: str) -> str:
    """Short name (bf16, fp16, fp32, tf32, fp8, int8, fp4, int4) of a spelling; unknown names pass through."""
    return ALIASES.get(_key(name), str(name))


def normalize_dtype(name: str) -> str:
    """Short compute-dtype name for common spellings; ValueError naming the choices otherwise."""
    short = ALIASES.get(_key(name))
    if short is None or short not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; expected one of {', '.join(COMPUTE_DTYPES)}")
    return short


def dtype_bytes(name: str) -> float:
    """Bytes per element for a dtype name such as 'bfloat16' or 'torch.float16'."""
    short = ALIASES.get(_key(name))
    if short is None:
        raise ConfigError(f"unknown dtype {name!r}; known: {', '.join(sorted(ALIASES))}")
    return _DTYPES[short][0]


# a storage width → the short name of that width (for a guess to stand in for an unknown dtype)
_BY_WIDTH = {4.0: "fp32", 2.0: "bf16", 1.0: "fp8", 0.5: "fp4"}


def guess_storage_dtype(name: str) -> tuple[str, str | None]:
    """A known short dtype for a storage dtype name, and None; for an unknown name (e.g. a KV-cache
    dtype newer than this table) the nearest known width at or above the bit count the name gives
    (`…3bit…` → fp4, 0.5 bytes), else 1 byte (fp8, today's usual quantized KV cache), and a sentence
    saying so."""
    key = _key(name)
    short = ALIASES.get(key) or ALIASES.get(key.split("_")[0])  # fp8_inc, fp8_ds_mla: fp8 variants
    if short is not None:
        return short, None
    m = re.search(r"(\d+)\s*(?:bit|b\b|_|$)", key)
    bits = int(m.group(1)) if m else None
    if bits is not None and 1 <= bits <= 32:
        width = next(w for w in sorted(_BY_WIDTH) if w * 8 >= bits)
        why = f"{bits} bits in its name → {width:g} bytes"
    else:
        width, why = 1.0, "no width in its name → 1 byte, as fp8"
    return _BY_WIDTH[width], f"unknown dtype {name!r}: assumed {why}"
