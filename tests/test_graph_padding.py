"""CUDA-graph padding (serving_mfu.cost.graph_padding) on GPU-shaped configurations.  The first tests pin the
rules with hand-worked numbers.  The later ones run vLLM's own dispatch code on the same inputs: the V1
`CudagraphDispatcher` and `_determine_batch_execution_and_padding`, the V2 `CudaGraphManager` and
`dispatch_cg_and_sync_dp`, and `VllmConfig._set_cudagraph_sizes`.  They need no GPU, only fake configs,
and skip with the reason when the installed vLLM does not import."""

from __future__ import annotations

import importlib
import itertools
from types import SimpleNamespace as NS

import pytest

from serving_mfu.cost.graph_padding import (
    MODES,
    GraphConfig,
    default_capture_sizes,
    dp_padded_tokens,
    graph_dispatch,
    padded_tokens,
    padding_from_stats,
)

# vLLM's documented default grid at the 512 ceiling (config/vllm.py:2297-2305, config/compilation.py:703-704)
DOC_DEFAULT = (1, 2, 4, *range(8, 256, 8), *range(256, 513, 16))
# the sizes vLLM derives for max_num_seqs=256, max_num_batched_tokens=8192 (cross-checked below)
SIZES = default_capture_sizes(max_num_seqs=256, max_num_batched_tokens=8192)
RUNNERS = pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
GRAPH_MODES = [m for m in MODES if m != "NONE"]


def cfg(mode: str = "FULL_AND_PIECEWISE", v2: bool = True, sizes=SIZES, max_num_seqs: int = 256, **kw) -> GraphConfig:
    return GraphConfig(mode=mode, capture_sizes=sizes, max_num_seqs=max_num_seqs, model_runner_v2=v2, **kw)


# ---- the rules, by hand ---------------------------------------------------------------------------------------

def test_default_capture_sizes_are_vllms_documented_grid():
    assert SIZES == DOC_DEFAULT and len(SIZES) == 51 and SIZES[:8] == (1, 2, 4, 8, 16, 24, 32, 40)
    # the ceiling is 2 * max_num_seqs * q, then max_num_batched_tokens; max_num_seqs itself is added
    assert default_capture_sizes(8, 2048) == (1, 2, 4, 8, 16)
    assert default_capture_sizes(6, 2048) == (1, 2, 4, 6, 8)
    assert default_capture_sizes(256, 100) == (*DOC_DEFAULT[:DOC_DEFAULT.index(96) + 1], 100)
    # q = 3 adds the uniform decode sizes n * 3 below the ceiling
    assert {3, 6, 12, 48, 96, 384}.issubset(default_capture_sizes(128, 16384, 3))
    assert default_capture_sizes(1024, 8192, platform_max=1024)[-1] == 1024  # data-center Blackwell
    assert default_capture_sizes(64, 8192, interactivity=True)[:33] == (*range(1, 33), 40)


def test_cpu_and_eager_configs_never_pad():
    for n, uniform in itertools.product((0, 1, 3, 7, 513, 4096), (True, False)):
        assert padded_tokens(n, uniform, GraphConfig()) == n  # the CPU platform: mode NONE, no sizes
        assert padded_tokens(n, uniform, cfg("NONE")) == n
        assert padded_tokens(n, uniform, GraphConfig(mode="FULL_AND_PIECEWISE")) == n  # no capture sizes


@RUNNERS
def test_a_uniform_decode_of_3_pads_to_4(v2):
    for mode in ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "FULL"):
        assert graph_dispatch(3, True, cfg(mode, v2)) == ("FULL", 4)
    assert graph_dispatch(3, True, cfg("PIECEWISE", v2)) == ("PIECEWISE", 4)


@RUNNERS
def test_piecewise_graphs_pad_mixed_batches_to_the_next_capture_size(v2):
    for mode in ("FULL_AND_PIECEWISE", "PIECEWISE"):
        c = cfg(mode, v2)
        assert [padded_tokens(n, False, c) for n in (1, 3, 9, 250, 257, 500, 512)] == [1, 4, 16, 256, 272, 512, 512]
        assert graph_dispatch(9, False, c)[0] == "PIECEWISE"
    assert graph_dispatch(9, False, cfg("FULL", v2)) == ("FULL", 16)  # FULL: one graph set for every batch


@RUNNERS
@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_a_batch_above_the_largest_capture_size_runs_unpadded(v2, mode):
    c = cfg(mode, v2)
    for n, uniform in itertools.product((513, 520, 1000, 8192), (True, False)):
        assert graph_dispatch(n, uniform, c) == ("NONE", n)
    assert padded_tokens(512, True, c) == 512


@RUNNERS
def test_full_decode_only_runs_mixed_batches_eagerly(v2):
    c = cfg("FULL_DECODE_ONLY", v2)
    assert graph_dispatch(3, False, c) == ("NONE", 3)
    assert graph_dispatch(300, False, c) == ("NONE", 300)
    assert graph_dispatch(3, True, c) == ("FULL", 4)


@RUNNERS
def test_a_uniform_decode_no_decode_graph_covers_falls_back_to_the_mixed_mode(v2):
    # decode graphs stop at q * max_num_seqs = 6; a uniform decode of 5 would pad to 8
    sizes = (1, 2, 4, 8)
    assert graph_dispatch(5, True, cfg("FULL_AND_PIECEWISE", v2, sizes, max_num_seqs=6)) == ("PIECEWISE", 8)
    assert graph_dispatch(5, True, cfg("FULL_DECODE_ONLY", v2, sizes, max_num_seqs=6)) == ("NONE", 5)
    assert graph_dispatch(4, True, cfg("FULL_DECODE_ONLY", v2, sizes, max_num_seqs=6)) == ("FULL", 4)


@RUNNERS
def test_spec_decode_k3_pads_uniform_decodes_of_4_tokens_per_request(v2):
    sizes = default_capture_sizes(256, 8192, 4)
    c = cfg("FULL_AND_PIECEWISE", v2, sizes, uniform_decode_query_len=4)
    # requests -> tokens run (4 per request)
    assert {r: padded_tokens(4 * r, True, c) for r in (1, 2, 3, 5, 64, 128, 129)} == \
        {1: 4, 2: 8, 3: 16, 5: 24, 64: 256, 128: 512, 129: 516}
    assert graph_dispatch(12, True, c) == ("FULL", 16)
    assert graph_dispatch(13, False, c) == ("PIECEWISE", 16)


def test_v1_rounds_every_capture_size_to_the_decode_length_and_v2_does_not():
    sizes = default_capture_sizes(128, 16384, 3)  # ..., 4, 6, 8, 12, 16, ...
    v1, v2 = (cfg("FULL_AND_PIECEWISE", r, sizes, max_num_seqs=128, uniform_decode_query_len=3) for r in (False, True))
    assert padded_tokens(7, False, v2) == 8  # V2 keeps the raw sizes for mixed batches
    assert padded_tokens(7, False, v1) == 9  # V1 rounded 8 up to 9 (config/compilation.py:1530-1557)
    assert padded_tokens(9, True, v1) == padded_tokens(9, True, v2) == 9
    # rounding is idempotent: already-rounded sizes give the same answers
    rounded = tuple(sorted({-(-s // 3) * 3 for s in sizes if -(-s // 3) * 3 <= sizes[-1]}))
    v1r = cfg("FULL_AND_PIECEWISE", False, rounded, max_num_seqs=128, uniform_decode_query_len=3)
    assert all(padded_tokens(n, u, v1) == padded_tokens(n, u, v1r) for n in range(1, 520) for u in (False, n % 3 == 0))


@RUNNERS
def test_data_parallel_ranks_pad_to_the_largest_rank(v2):
    c = cfg(v2=v2, dp_size=2)
    assert padded_tokens(3, True, c, dp_max_tokens=13) == 16
    assert dp_padded_tokens([(3, True), (13, False)], c) == [16, 16]
    assert padded_tokens(3, True, c, dp_max_tokens=3) == 4
    assert padded_tokens(3, True, cfg(v2=v2), dp_max_tokens=13) == 4  # dp_size 1: no other rank
    with pytest.raises(ValueError):
        padded_tokens(13, True, c, dp_max_tokens=3)


def test_an_eager_rank_turns_data_parallel_padding_off():
    # one rank above the largest graph: V2 runs every rank unpadded; V1 keeps each rank's own graph padding
    assert dp_padded_tokens([(3, True), (600, False)], cfg(v2=True, dp_size=2)) == [3, 600]
    assert dp_padded_tokens([(3, True), (600, False)], cfg(v2=False, dp_size=2)) == [4, 600]
    assert padded_tokens(3, True, cfg(v2=True, dp_size=2), dp_max_tokens=600) == 3
    assert padded_tokens(3, True, cfg(v2=False, dp_size=2), dp_max_tokens=600) == 4
    # FULL_DECODE_ONLY: a mixed rank is eager, so is everyone
    assert dp_padded_tokens([(3, True), (5, False)], cfg("FULL_DECODE_ONLY", True, dp_size=2)) == [3, 5]
    assert dp_padded_tokens([(3, True), (5, False)], cfg("FULL_DECODE_ONLY", False, dp_size=2)) == [4, 5]


def test_v1_lora_graphs_without_specialization_need_an_active_adapter():
    v1 = cfg(v2=False, lora_enabled=True, specialize_lora=False)
    assert v1.lora_active_matters
    assert graph_dispatch(3, False, v1, has_lora=False) == ("NONE", 3)
    assert graph_dispatch(3, False, v1, has_lora=True) == ("PIECEWISE", 4)
    for c in (cfg(v2=True, lora_enabled=True, specialize_lora=False), cfg(v2=False, lora_enabled=True)):
        assert not c.lora_active_matters
        assert padded_tokens(3, False, c, has_lora=False) == padded_tokens(3, False, c, has_lora=True) == 4


def test_padding_from_stats_reads_a_cudagraph_stat():
    stat = NS(num_unpadded_tokens=3, num_padded_tokens=4, num_paddings=1, runtime_mode="FULL")
    assert padding_from_stats(stat) == (3, 4)
    assert padding_from_stats(NS(cudagraph_stats=stat)) == (3, 4)  # a ModelRunnerOutput or SchedulerStats
    assert padding_from_stats(NS(cudagraph_stats=None)) is None  # --cudagraph-metrics off
    assert padding_from_stats(None) is None
    assert padding_from_stats(NS()) is None
    assert padding_from_stats(NS(num_unpadded_tokens=3)) is None
    assert padding_from_stats(NS(num_unpadded_tokens="x", num_padded_tokens=4)) is None


def test_graph_config_checks_and_normalizes():
    c = GraphConfig(mode="full_and_piecewise", capture_sizes=[8, 1, 4, 2, 8])
    assert c.mode == "FULL_AND_PIECEWISE" and c.capture_sizes == (1, 2, 4, 8) and c.max_capture_size == 8
    assert not GraphConfig(mode="PIECEWISE").enabled  # no capture sizes
    assert not GraphConfig().enabled and GraphConfig().mode == "NONE"  # the CPU platform
    for bad in ({"mode": "SOMETIMES"}, {"capture_sizes": (1, 2), "max_capture_size": 4},
                {"capture_sizes": (0, 2)}, {"uniform_decode_query_len": 0}, {"dp_size": 0}):
        with pytest.raises(ValueError):
            GraphConfig(**bad)


@RUNNERS
@pytest.mark.parametrize("mode", MODES)
def test_padding_only_ever_reaches_a_capture_size(v2, mode):
    c = cfg(mode, v2)
    for n, uniform in itertools.product(range(530), (True, False)):
        run = padded_tokens(n, uniform, c)
        assert run == n or (run > n and run in SIZES)


# ---- against vLLM's own code ------------------------------------------------------------------------------------

def _vllm(name: str):
    """A vLLM module, or skip: the checks below run vLLM's dispatch code, GPU source included, on the CPU."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means vLLM's code cannot be run here
        pytest.skip(f"{name} cannot be imported on this machine ({type(e).__name__}: {e})")


def _vllm_default_sizes(max_num_seqs: int, max_num_batched_tokens: int, q: int = 1) -> tuple[int, ...]:
    """vLLM's `_set_cudagraph_sizes` (config/vllm.py:2292) run on a config with no sizes set (on the CPU the
    platform ceiling is 512)."""
    vllm_config = _vllm("vllm.config.vllm")
    compilation = _vllm("vllm.config.compilation")
    cc = compilation.CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE")
    fake = NS(model_config=NS(enforce_eager=False), compilation_config=cc, uniform_decode_query_len=q,
              scheduler_config=NS(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
              speculative_config=None, performance_mode="balanced", num_speculative_tokens=q - 1)
    vllm_config.VllmConfig._set_cudagraph_sizes(fake)
    assert cc.max_cudagraph_capture_size == cc.cudagraph_capture_sizes[-1]
    return tuple(cc.cudagraph_capture_sizes)


@pytest.mark.parametrize("seqs,tokens,q", [(256, 8192, 1), (8, 2048, 1), (6, 2048, 1), (256, 100, 1),
                                           (1024, 16384, 1), (256, 8192, 4), (128, 16384, 3), (64, 512, 17)])
def test_default_capture_sizes_match_vllm(seqs, tokens, q):
    assert default_capture_sizes(seqs, tokens, q) == _vllm_default_sizes(seqs, tokens, q)


def _v1_dispatcher(c: GraphConfig, max_loras: int = 2, specialize_active_lora: bool = False):
    """vLLM's V1 CudagraphDispatcher on a fake config, its keys built as the V1 runner does (with the capture
    sizes rounded for spec decode as `resolve_cudagraph_mode_and_sizes` does, config/compilation.py:1496-1501)."""
    compilation = _vllm("vllm.config.compilation")
    dispatcher = _vllm("vllm.v1.cudagraph_dispatcher")
    mode = compilation.CUDAGraphMode[c.mode]
    q = c.uniform_decode_query_len
    cc = NS(cudagraph_mode=compilation.CUDAGraphMode.NONE, is_attention_compiled_piecewise=lambda: True,
            max_cudagraph_capture_size=c.max_capture_size, cudagraph_capture_sizes=list(c.capture_sizes),
            compile_sizes=[], cudagraph_specialize_lora=c.specialize_lora)
    if mode.decode_mode() == compilation.CUDAGraphMode.FULL and q > 1:
        compilation.CompilationConfig.adjust_cudagraph_sizes_for_spec_decode(cc, q)
    lora = NS(max_loras=max_loras, specialize_active_lora=specialize_active_lora) if c.lora_enabled else None
    vc = NS(compilation_config=cc, num_speculative_tokens=q - 1, lora_config=lora,
            scheduler_config=NS(max_num_seqs=c.max_num_seqs))
    d = dispatcher.CudagraphDispatcher(vc)
    d.initialize_cudagraph_keys(mode, q)
    return d


def _v2_manager(c: GraphConfig, monkeypatch, max_loras: int = 2):
    """vLLM's V2 CudaGraphManager on a fake config, marked captured (no graph is ever replayed here)."""
    torch = _vllm("torch")
    compilation = _vllm("vllm.config.compilation")
    cu = _vllm("vllm.v1.worker.gpu.cudagraph_utils")
    lora_utils = _vllm("vllm.v1.worker.gpu.lora_utils")
    monkeypatch.setattr(cu, "get_pp_group", lambda: NS(is_first_rank=True, is_last_rank=True))
    monkeypatch.setattr(cu, "current_platform", NS(get_global_graph_pool=lambda: None))
    cc = NS(max_cudagraph_capture_size=c.max_capture_size, cudagraph_capture_sizes=list(c.capture_sizes),
            cudagraph_specialize_lora=c.specialize_lora)
    lora = NS(max_loras=max_loras, specialize_active_lora=False) if c.lora_enabled else None
    vc = NS(compilation_config=cc, scheduler_config=NS(max_num_seqs=c.max_num_seqs), speculative_config=None,
            cache_config=NS(use_kda_recoverssm=False), num_speculative_tokens=c.uniform_decode_query_len - 1,
            parallel_config=NS(tensor_parallel_size=1, data_parallel_size=c.dp_size))
    m = cu.CudaGraphManager(vc, torch.device("cpu"), compilation.CUDAGraphMode[c.mode],
                            decode_query_len=c.uniform_decode_query_len,
                            lora_capture_cases=lora_utils.get_lora_capture_cases(lora, cc))
    m._graphs_captured = True
    return m


def _cases(c: GraphConfig):
    """(num_tokens, uniform_decode) over every size up to past the largest; uniform ones as whole requests."""
    q = c.uniform_decode_query_len
    for n in range(1, c.max_capture_size + 2 * q + 2):
        yield n, False
        if n % q == 0 and n // q <= c.max_num_seqs:
            yield n, True


SWEEP = [  # (capture sizes, q, max_num_seqs)
    (SIZES, 1, 256),
    ((1, 2, 4, 8), 1, 6),
    (default_capture_sizes(256, 8192, 4), 4, 256),
    (default_capture_sizes(128, 16384, 3), 3, 128),
    (default_capture_sizes(16, 8192, 2), 2, 16),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes,q,seqs", SWEEP, ids=[f"q{q}-seqs{s}" for _, q, s in SWEEP])
def test_v1_matches_vllms_cudagraph_dispatcher(mode, sizes, q, seqs):
    c = cfg(mode, False, sizes, max_num_seqs=seqs, uniform_decode_query_len=q)
    d = _v1_dispatcher(c)
    for n, uniform in _cases(c):
        runtime, desc = d.dispatch(n, uniform_decode=uniform)
        assert graph_dispatch(n, uniform, c) == (str(runtime), desc.num_tokens), (n, uniform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes,q,seqs", SWEEP, ids=[f"q{q}-seqs{s}" for _, q, s in SWEEP])
def test_v2_matches_vllms_cudagraph_manager(mode, sizes, q, seqs, monkeypatch):
    c = cfg(mode, True, sizes, max_num_seqs=seqs, uniform_decode_query_len=q)
    m = _v2_manager(c, monkeypatch)
    for n, uniform in _cases(c):
        # the runner passes the uniform query length of a uniform batch (model_runner.py:1797), else None
        desc = m.dispatch(n // q if uniform else 1, n, q if uniform else None, num_active_loras=0)
        assert graph_dispatch(n, uniform, c) == (str(desc.cg_mode), desc.num_tokens), (n, uniform)


@pytest.mark.parametrize("specialize", [True, False])
@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE", "FULL_DECODE_ONLY"])
def test_lora_matches_vllm(mode, specialize, monkeypatch):
    v1 = cfg(mode, False, lora_enabled=True, specialize_lora=specialize)
    v2 = cfg(mode, True, lora_enabled=True, specialize_lora=specialize)
    d, m = _v1_dispatcher(v1), _v2_manager(v2, monkeypatch)
    for (n, uniform), active in itertools.product(_cases(v1), (0, 1, 2)):
        runtime, desc = d.dispatch(n, uniform_decode=uniform, has_lora=active > 0, num_active_loras=active)
        assert graph_dispatch(n, uniform, v1, has_lora=active > 0) == (str(runtime), desc.num_tokens)
        d2 = m.dispatch(n if uniform else 1, n, 1 if uniform else None, num_active_loras=active)
        assert graph_dispatch(n, uniform, v2, has_lora=active > 0) == (str(d2.cg_mode), d2.num_tokens)


DP_RANKS = [(3, True), (13, False), (16, True), (100, True), (300, False), (513, False), (600, True)]


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_v1_data_parallel_matches_vllm(mode, monkeypatch):
    """`_determine_batch_execution_and_padding` (gpu_model_runner.py:3718) on a fake runner, the DP all-reduce
    replaced by the table every rank's own dispatch would contribute (v1/worker/dp_utils.py:56-75)."""
    torch, np = _vllm("torch"), _vllm("numpy")
    runner = _vllm("vllm.v1.worker.gpu_model_runner")
    dp_utils = _vllm("vllm.v1.worker.dp_utils")
    c = cfg(mode, False, dp_size=2)
    d = _v1_dispatcher(c)
    for ranks in itertools.product(DP_RANKS, repeat=2):
        local = [d.dispatch(n, uniform_decode=u) for n, u in ranks]
        table = torch.tensor([[n for n, _ in ranks], [desc.num_tokens for _, desc in local], [0, 0],
                              [mode_.value for mode_, _ in local]], dtype=torch.int32)
        monkeypatch.setattr(dp_utils, "_run_ar", lambda *a, table=table, **k: table.clone())
        expected = dp_padded_tokens(list(ranks), c)
        for rank, (n, u) in enumerate(ranks):
            fake = NS(_is_uniform_decode=runner.GPUModelRunner._is_uniform_decode, uniform_decode_query_len=1,
                      model_config=NS(is_encoder_decoder=False), input_batch=NS(lora_id_to_lora_request={}),
                      cudagraph_dispatcher=d,
                      vllm_config=NS(parallel_config=NS(data_parallel_size=2),
                                     observability_config=NS(cudagraph_metrics=True)),
                      parallel_config=NS(data_parallel_size=2, data_parallel_rank=rank, num_ubatches=2,
                                         disable_nccl_for_dp_synchronization=True))
            per_req = np.ones(n, dtype=np.int32) if u else np.array([n], dtype=np.int32)
            *_, stats = runner.GPUModelRunner._determine_batch_execution_and_padding(
                fake, num_tokens=n, num_reqs=len(per_req), num_scheduled_tokens_np=per_req,
                max_num_scheduled_tokens=int(per_req.max()), allow_microbatching=False)
            assert padding_from_stats(stats) == (n, expected[rank]), (ranks, rank)


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_v2_data_parallel_matches_vllm(mode, monkeypatch):
    """`dispatch_cg_and_sync_dp` (v1/worker/gpu/dp_utils.py:213), its all-reduce replaced by the summed table
    of every rank's row (:67-77)."""
    torch = _vllm("torch")
    cu = _vllm("vllm.v1.worker.gpu.cudagraph_utils")
    dp = _vllm("vllm.v1.worker.gpu.dp_utils")
    c = cfg(mode, True, dp_size=2)
    m = _v2_manager(c, monkeypatch)
    monkeypatch.setattr(dp, "get_dp_group", lambda: NS(cpu_group=None))
    for ranks in itertools.product(DP_RANKS, repeat=2):
        rows = []
        for n, u in ranks:
            local = m.dispatch(n if u else 1, n, 1 if u else None, num_active_loras=0, max_query_len=1 if u else None)
            rows.append([n, local.cg_mode.value, 1 if u else 0, 1 if u else -1, 0, n if u else 1])
        table = torch.tensor(rows, dtype=torch.int32).T.contiguous()
        monkeypatch.setattr(dp, "dist", NS(all_reduce=lambda t, group=None, table=table: t.copy_(table)))
        expected = dp_padded_tokens(list(ranks), c)
        for rank, (n, u) in enumerate(ranks):
            desc, _ = dp.dispatch_cg_and_sync_dp(m, n if u else 1, n, 1 if u else None, 2, rank,
                                                 max_query_len=1 if u else None, uniform_decode=u)
            assert max(n, desc.num_tokens) == expected[rank], (ranks, rank)  # model_runner.py:1362
            assert padding_from_stats(cu.make_cudagraph_stats(desc, n)) == (n, expected[rank])


def test_padding_from_stats_reads_vllms_cudagraph_stat_and_model_runner_output():
    cuda_graph = _vllm("vllm.compilation.cuda_graph")
    outputs = _vllm("vllm.v1.outputs")
    stat = cuda_graph.CUDAGraphStat(num_unpadded_tokens=13, num_padded_tokens=16, num_paddings=3, runtime_mode="FULL")
    assert padding_from_stats(stat) == (13, 16)
    output = outputs.ModelRunnerOutput(req_ids=[], req_id_to_index={}, cudagraph_stats=stat)
    assert padding_from_stats(output) == (13, 16)
    assert padding_from_stats(outputs.ModelRunnerOutput(req_ids=[], req_id_to_index={})) is None


def test_the_cpu_platform_has_no_static_graphs():
    cpu = _vllm("vllm.platforms.cpu")
    assert not cpu.CpuPlatform.support_static_graph_mode()  # so VllmConfig sets cudagraph_mode NONE
