"""Per-device FLOPs under tensor, pipeline and expert parallelism (vLLM's sharding).

Whole-model FLOPs divided by `tp × pp` is right for MFU (peak × devices in the
denominator); this module gives what one device *executes*, which differs where vLLM
replicates work: K/V projections when `num_kv_heads < tp` (KV heads are copied), and the
MoE router and MLA down-projections (`ReplicatedLinear`), which every TP rank computes.
Pipeline stages are averaged (`/ pp`).  With expert parallelism the routed experts are
spread over `ep` ranks (balanced routing assumed).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving_mfu.model.spec import ModelSpec

REPLICATED = frozenset({"router", "q_a_proj", "kv_a_proj"})


@dataclass(frozen=True, slots=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def devices(self) -> int:
        """Devices one engine (one data-parallel rank) runs on."""
        return self.tp * self.pp


def kv_replication(spec: ModelSpec, tp: int) -> float:
    """Factor by which K/V projection work grows under TP: ceil(kv/tp)·tp / kv ≥ 1."""
    kv = next((layer.attention.num_kv_heads for layer in spec.layers if layer.attention.num_kv_heads), 1)
    per_rank = -(-kv // tp)
    return per_rank * tp / kv


def per_device_breakdown(breakdown: dict[str, int], spec: ModelSpec, par: Parallelism) -> dict[str, float]:
    """FLOPs one device executes, per component, from the whole-model breakdown."""
    out: dict[str, float] = {}
    for name, flops in breakdown.items():
        if name in REPLICATED:
            share = float(flops)
        elif name in ("k_proj", "v_proj"):
            share = flops * kv_replication(spec, par.tp) / par.tp
        elif name == "routed_experts" and par.ep > 1:
            share = flops / par.ep
        else:
            share = flops / par.tp
        out[name] = share / par.pp
    return out
