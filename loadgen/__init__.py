"""mfu-loadgen: a load generator for OpenAI-compatible LLM servers that reports each run's MFU.

    from loadgen import RunConfig, run_benchmark
    result = await run_benchmark(RunConfig(base_url="http://127.0.0.1:8000", model="m", request_rate=4))
"""

from loadgen.config import LengthSpec, RunConfig, SLOs
from loadgen.records import RequestRecord
from loadgen.results import LatencyStats, MFUSection, RunResult
from loadgen.runner import run_benchmark, run_benchmark_sync
from loadgen.sweep import SweepSummary, run_sweep

__all__ = ["LatencyStats", "LengthSpec", "MFUSection", "RequestRecord", "RunConfig", "RunResult", "SLOs",
           "SweepSummary", "run_benchmark", "run_benchmark_sync", "run_sweep"]
