"""The model layer: a model's shape from its config (spec, one parser per family, components, dtypes,
quantization, parallelism).  Pure: no threads, environment, torch or vLLM."""

from serving_mfu.model import architectures as _architectures  # noqa: F401 - registers the parsers
from serving_mfu.model import families as _families  # noqa: F401 - and those of the newer families
from serving_mfu.model.errors import ConfigError
from serving_mfu.model.spec import ModelSpec

__all__ = ["ConfigError", "ModelSpec"]
