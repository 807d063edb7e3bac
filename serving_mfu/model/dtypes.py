"""The one dtype table: every spelling of a dtype name → its short name and its width in bytes.

Configs say `bfloat16` or `torch.float16`, engines `fp8_e4m3`, peak tables `bf16`: all go
through `short_dtype` (lenient) or `normalize_dtype` (strict, for compute dtypes the user gives),
and `dtype_bytes` for storage widths.
"""

from __future__ import annotations

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
