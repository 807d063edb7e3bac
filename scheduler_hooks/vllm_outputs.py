"""Pure readers of what vLLM hands the hook: the step's sampled lengths, what reached each user, the KV a
connector moved, the MoE routing it captured, whether a step dispatches as a uniform decode.

Each reads vLLM's objects (SchedulerOutput, ModelRunnerOutput, the EngineCoreOutputs update_from_output()
returns) and returns plain values or records; none keeps state.  The vLLM attributes they read are listed,
with their source lines in vLLM 0.32 and 0.33, in tests/test_vllm_surface.py.
"""

from __future__ import annotations

import functools
from itertools import islice
from operator import attrgetter, le
from typing import Any

import numpy as np

from serving_mfu.cost.graph_padding import GraphConfig
from serving_mfu.cost.records import KVTransferRecord, PrefillBatch, Slice

_NEW_TOKEN_IDS = attrgetter("new_token_ids")
_FINISH_REASON = attrgetter("finish_reason")
_ROWS = attrgetter("rows")
_TOKEN_START = attrgetter("token_start")


def uniform_decode(out: Any, graph: GraphConfig, prefill: PrefillBatch | None, slices: list[Slice]) -> bool:
    """Whether vLLM dispatches the step as a uniform decode (serving_mfu.cost.graph_padding, rule 4): every
    scheduled request runs exactly q = 1 + num_speculative_tokens tokens (V1's whole test,
    gpu_model_runner.py:3654-3671); Model Runner V2 also needs that none computes prompt (or recomputed)
    positions, unless it runs one new token over positions computed before, as a decode
    (v1/worker/gpu/model_runner.py:1322-1335).  `prefill` and `slices` are the step's record's."""
    q = graph.uniform_decode_query_len
    nst = out.num_scheduled_tokens
    if not nst or out.total_num_scheduled_tokens != q * len(nst) or (q > 1 and max(nst.values()) != q):
        return False
    if not graph.model_runner_v2:
        return True
    if prefill is not None and (q > 1 or not all(prefill.computed_before)):  # no drafts: new tokens = q
        return False
    return all(s.computed_before >= max(s.prompt_len, s.hwm) or (s.new_tokens - s.draft_tokens == 1 and
                                                                  s.computed_before > 0) for s in slices)


FROM_STATS: list = []  # `lengths` marker (compared by identity): read the sampled lengths on the accounting thread


def sampled_lengths(out: Any, runner_out: Any, result: Any) -> np.ndarray:
    """Tokens each request sampled in a draft-verifying step (1 + accepted drafts), by runner row, read after
    update_from_output(): exact for every request that did not stop; a request that stopped had its
    list trimmed to what it delivered, and the accepted drafts the trim hid — vLLM's own
    SpecDecodingStats.num_accepted_tokens less what the lists show — go back to the stopped requests
    with drafts, each up to its drafts, in output order (only the rejected/discarded split among
    requests that stopped in the same step depends on that order; their delivered tokens do not)."""
    sampled = runner_out.sampled_token_ids
    lengths = np.array(list(map(len, sampled)), np.int64) if sampled else np.zeros(0, np.int64)
    stats = _spec_stats(result)
    if stats is None or not len(lengths):
        return lengths
    spec = out.scheduled_spec_decode_tokens
    index = runner_out.req_id_to_index
    # vLLM: accepted = max(len(sampled) − 1, 0), counted only for requests that sampled something
    if len(spec) == len(lengths) and list(spec) == getattr(runner_out, "req_ids", None):
        seen = int(np.maximum(lengths - 1, 0).sum())  # every row verified drafts
    else:
        rows = [i for i in map(index.get, spec) if i is not None]  # not in the lists: the runner did not run it
        seen = int(np.maximum(lengths[rows] - 1, 0).sum()) if rows else 0
    hidden = stats.num_accepted_tokens - seen
    if hidden <= 0:
        return lengths
    stopped = (o.request_id for outputs in result.values() for o in filter(_FINISH_REASON, outputs.outputs))
    while hidden > 0:  # in output order, a chunk at a time, until none is hidden
        chunk = list(islice(stopped, _STOP_CHUNK))
        if not chunk:
            break
        chunk = [r for r in chunk if r in spec and r in index]
        if not chunk:
            continue
        rows = np.fromiter(map(index.__getitem__, chunk), np.intp, len(chunk))
        have = lengths[rows]
        drafts = np.fromiter(map(len, map(spec.__getitem__, chunk)), np.int64, len(chunk))
        room = np.where(have > 0, np.maximum(drafts + 1 - have, 0), 0)
        give = np.clip(hidden - (np.cumsum(room) - room), 0, room)
        lengths[rows] += give
        hidden -= int(give.sum())
    return lengths


_STOP_CHUNK = 128  # stopped outputs read at a time by sampled_lengths (it stops once nothing is hidden)


def _spec_stats(result: Any) -> Any:
    """The step's SpecDecodingStats (vLLM attaches its SchedulerStats to one of the outputs), or None."""
    for outputs in (result or {}).values():
        stats = getattr(outputs, "scheduler_stats", None)
        if stats is not None:
            return stats.spec_decoding_stats
    return None


def delivered_tokens(result: Any) -> int:
    """Tokens delivered to all users in this step (Σ len(new_token_ids) over the EngineCoreOutputs)."""
    return sum(sum(map(len, map(_NEW_TOKEN_IDS, outputs.outputs))) for outputs in (result or {}).values())


def delivered_by_request(result: Any) -> dict[str, int]:
    """Tokens each request received in this step, from update_from_output()'s EngineCoreOutputs."""
    out: dict[str, int] = {}
    for outputs in (result or {}).values():
        for o in outputs.outputs:
            out[o.request_id] = len(o.new_token_ids)
    return out


@functools.lru_cache(maxsize=8)
def _layer_offsets(layers: int, top_k: int, experts: int, size: int) -> np.ndarray:
    """layer × experts for each routed id of a [size, layers, top_k] array (`size` a power of two, so
    that a few arrays serve every step); read-only, shared."""
    row = np.repeat(np.arange(layers, dtype=np.intp) * experts, top_k)  # intp: bincount takes it as it is
    out = np.tile(row, size)
    out.flags.writeable = False
    return out


def kv_transfer(out: Any, result: Any) -> KVTransferRecord | None:
    """KV that crossed the connector in this step: for each request whose prompt gave its first token,
    vLLM's PrefillStats (local prefix-cache hits, tokens loaded through the connector; set at its first
    admission, handed over with its first output); and the positions the connector stores for others,
    where its metadata lists them (ExampleConnector's `requests` with `is_store`, each `slot_mapping` one
    slot per stored position).  None when nothing crossed."""
    ids: list[str] = []
    local: list[int] = []
    got: list[int] = []
    for outputs in (result or {}).values():
        for o in outputs.outputs:
            st = getattr(o, "prefill_stats", None)
            if st is not None and (st.num_local_cached_tokens or st.num_external_cached_tokens):
                ids.append(o.request_id)
                local.append(int(st.num_local_cached_tokens))
                got.append(int(st.num_external_cached_tokens))
    sent = 0
    for meta in getattr(getattr(out, "kv_connector_metadata", None), "requests", None) or ():
        if getattr(meta, "is_store", False):
            sent += len(meta.slot_mapping)
    if not ids and not sent:
        return None
    return KVTransferRecord(req_ids=ids, local_cached=local, received=got, sent_tokens=sent)


def _joined(chunks: list, tokens: int | None) -> np.ndarray:
    """The routed-expert rows of a step as one [tokens, layers, top_k] array.  Rows of one dtype and shape
    (vLLM's capture: contiguous int32) are joined as bytes — a quarter of what `np.concatenate` costs per
    array; their total size must come out as `tokens` (when known) × the first row's layers × top_k."""
    first = np.asarray(chunks[0])
    if tokens is not None and first.ndim == 3:
        try:
            flat = np.frombuffer(b"".join(chunks), first.dtype)
        except (TypeError, BufferError, ValueError):  # not all contiguous buffers of whole items
            flat = None
        if flat is not None and flat.size == tokens * first.shape[1] * first.shape[2]:
            return flat.reshape(tokens, first.shape[1], first.shape[2])
    try:
        return np.asarray(np.concatenate(chunks, axis=0))  # [tokens, layers, top_k]
    except ValueError:  # rows of differing layer counts: the layers all of them cover
        layers = min(c.shape[1] for c in chunks)
        return np.asarray(np.concatenate([c[:, :layers, :] for c in chunks], axis=0))


def moe_routing(runner_out: Any, ids: list[str], qs: list[int], n0s: list[int], experts: int) -> list[list[int]] | None:
    """Tokens routed to each expert per MoE layer in this step, from vLLM's routed-experts capture.

    Needs `enable_return_routed_experts`; the rows cover a request's tokens from `token_start`,
    shaped [tokens, layers, top_k]; `ids`, `qs`, `n0s` are the step's requests, their q and n0;
    `experts` the routed experts per MoE layer.  When every
    request's rows start at its n0 and span at most its q positions (the usual case) they are all
    this step's, concatenated as they are; otherwise each is cut to [n0, n0 + q).  The pairs
    (layer, expert) are then counted with one `bincount`.  Returns None when the engine did not
    capture routing.
    """
    aux = getattr(runner_out, "aux_output_connector_output", None)
    if not aux:
        return None
    rids = list(aux)
    items = list(aux.values())
    rows = list(map(_ROWS, items))  # numpy arrays, as vLLM hands them over
    lens = list(map(len, rows))
    if rids == ids:  # in the step's order: no lookups by id
        q_of, n0_of = qs, n0s
    else:
        q_by_id, n0_by_id = dict(zip(ids, qs)), dict(zip(ids, n0s))
        q_of, n0_of = list(map(q_by_id.get, rids)), list(map(n0_by_id.get, rids))
    if list(map(_TOKEN_START, items)) == n0_of and (lens == q_of or (None not in q_of and all(map(le, lens, q_of)))):
        chunks = rows
    else:
        q_by_id, n0_by_id = dict(zip(ids, qs)), dict(zip(ids, n0s))
        chunks = []
        for rid, item, r in zip(rids, items, rows):
            n0 = n0_by_id.get(rid)
            if n0 is None:
                continue
            lo, hi = max(n0 - item.token_start, 0), max(n0 + q_by_id[rid] - item.token_start, 0)
            chunks.append(r[lo:hi])
    whole = chunks is rows  # every row as it came: `lens` counts their tokens
    chunks = [c for c in chunks if c.size] if chunks is not rows or 0 in lens else chunks
    if not chunks:
        return None
    ids = _joined(chunks, sum(lens) if whole else None)
    tokens, layers, top_k = ids.shape
    if ids.size and (ids.min() < 0 or ids.max() >= experts):  # padding or foreign ids: count only real experts
        ids = ids.astype(np.int64)
        offsets = (np.arange(layers, dtype=np.int64) * experts)[None, :, None]
        flat = (offsets + ids)[(ids >= 0) & (ids < experts)]
    else:  # one contiguous add of each position's layer offset (a broadcast over [layers, top_k] is slower)
        flat = _layer_offsets(layers, top_k, experts, 1 << max(tokens - 1, 0).bit_length())[:ids.size] + ids.reshape(-1)
    return np.bincount(flat, minlength=layers * experts).reshape(layers, experts).tolist()
