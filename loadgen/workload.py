"""What each request asks: prompt (token IDs of the served model, or text) and lengths, from
synthetic distributions, a ShareGPT file, shared-prefix groups, repetitive text, or a replay trace."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen.arrivals import TraceEntry
from loadgen.config import LengthSpec, RunConfig
from loadgen.prompts import estimate_tokens, random_words, repetitive, shared_prefix
from loadgen.vocab import TokenPool, draw, repetitive_ids


@dataclass(slots=True)
class RequestSpec:
    """One request to send: `system` (shared prefix) goes before `prompt`; lengths in tokens.
    `prompt_token_ids` (shared prefix included), when set, is the prompt: exactly `input_len` tokens."""

    prompt: str
    input_len: int
    output_len: int
    system: str | None = None
    prompt_token_ids: list[int] | None = None
    tenant: str | None = None  # its own vllm_xargs.tenant (a trace entry's), else the run's


def sample_lengths(spec: LengthSpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` lengths ≥ 1 from the distribution; lognormal keeps `mean` as the mean."""
    m, s = spec.mean, spec.spread
    if spec.dist == "fixed" or s == 0:
        x = np.full(size, float(m))
    elif spec.dist == "uniform":
        x = rng.uniform(m * (1 - s), m * (1 + s) + 1, size)
    elif spec.dist == "normal":
        x = rng.normal(m, s * m, size)
    else:
        x = m * np.exp(rng.normal(-s * s / 2, s, size))
    return np.maximum(np.floor(x), 1).astype(int)


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first user turn, the reply to it) of every conversation in a ShareGPT JSON or JSONL file."""
    text = Path(path).read_text()
    try:
        items = json.loads(text)
        items = items if isinstance(items, list) else [items]
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    pairs = []
    for item in items:
        turns = item.get("conversations") or item.get("conversation") or []
        for a, b in itertools.pairwise(turns):
            if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "assistant", "chatgpt"):
                if a.get("value") and b.get("value"):
                    pairs.append((a["value"], b["value"]))
                break
    if not pairs:
        raise ValueError(f"{path}: no ShareGPT conversation with a user turn and a reply")
    return pairs


def _shapes(config: RunConfig, rng: np.random.Generator) -> Iterator[tuple[int, int, int | None]]:
    """(input tokens, output tokens, shared-prefix group or None) of each synthetic request."""
    while True:
        ins = sample_lengths(config.input, rng, 1024)
        outs = sample_lengths(config.output, rng, 1024)
        for i, o in zip(ins.tolist(), outs.tolist()):
            yield i, o, int(rng.integers(config.num_prefixes)) if config.dataset == "shared-prefix" else None


def _synthetic_ids(config: RunConfig, rng: np.random.Generator, pool: TokenPool) -> Iterator[RequestSpec]:
    """Token-ID prompts: exactly the sampled length (plus the shared prefix) on the served model."""
    prefixes: dict[int, list[int]] = {}
    for i, o, group in _shapes(config, rng):
        if group is not None:
            if group not in prefixes:
                prefixes[group] = draw(pool, np.random.default_rng([config.seed, group, 7919]), config.prefix_len)
            yield RequestSpec("", i + config.prefix_len, o, prompt_token_ids=prefixes[group] + draw(pool, rng, i))
        elif config.dataset == "repetitive":
            yield RequestSpec("", i, o, prompt_token_ids=repetitive_ids(pool, rng, i))
        else:
            yield RequestSpec("", i, o, prompt_token_ids=draw(pool, rng, i))


def _synthetic(config: RunConfig, rng: np.random.Generator) -> Iterator[RequestSpec]:
    """Word-text prompts: about one token per word (exact only on a tokenizer the word list suits)."""
    for i, o, group in _shapes(config, rng):
        if group is not None:
            system = shared_prefix(config.seed, group, config.prefix_len)
            yield RequestSpec(random_words(rng, i), i + config.prefix_len, o, system=system)
        elif config.dataset == "repetitive":
            yield RequestSpec(repetitive(rng, i), i, o)
        else:
            yield RequestSpec(random_words(rng, i), i, o)


def _sharegpt(config: RunConfig, rng: np.random.Generator) -> Iterator[RequestSpec]:
    pairs = load_sharegpt(config.dataset_path)
    while True:
        for k in rng.permutation(len(pairs)).tolist():
            prompt, reply = pairs[k]
            out = estimate_tokens(reply) if config.sharegpt_output == "dataset" else \
                int(sample_lengths(config.output, rng, 1)[0])
            yield RequestSpec(prompt, estimate_tokens(prompt), out)


def _trace(config: RunConfig, rng: np.random.Generator, entries: list[TraceEntry],
           pool: TokenPool | None) -> Iterator[RequestSpec]:
    for e in entries:
        out = e.output_len or int(sample_lengths(config.output, rng, 1)[0])
        if e.prompt is not None:
            yield RequestSpec(e.prompt, e.input_len or estimate_tokens(e.prompt), out, tenant=e.tenant)
        else:
            n = e.input_len or int(sample_lengths(config.input, rng, 1)[0])
            if pool is not None:
                yield RequestSpec("", n, out, prompt_token_ids=draw(pool, rng, n), tenant=e.tenant)
            else:
                yield RequestSpec(random_words(rng, n), n, out, tenant=e.tenant)


def specs(config: RunConfig, rng: np.random.Generator, trace: list[TraceEntry] | None = None,
          pool: TokenPool | None = None) -> Iterator[RequestSpec]:
    """Endless (finite for a trace) stream of requests for this run's workload; synthetic prompts are
    token IDs from `pool` when given (exact lengths), else word text (≈ one token per word)."""
    if trace is not None:
        return _trace(config, rng, trace, pool)
    if config.dataset == "sharegpt":
        return _sharegpt(config, rng)
    if pool is not None:
        return _synthetic_ids(config, rng, pool)
    return _synthetic(config, rng)
