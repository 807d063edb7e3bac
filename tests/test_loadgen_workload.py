"""Workloads: length distributions, shared prefixes, repetitive text, ShareGPT, request bodies."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from loadgen import RunConfig
from loadgen.client import Sender
from loadgen.config import LengthSpec
from loadgen.prompts import WORDS, estimate_tokens, random_words
from loadgen.workload import load_sharegpt, sample_lengths, specs


@pytest.mark.parametrize("dist,spread", [("fixed", 0.0), ("uniform", 0.5), ("normal", 0.2), ("lognormal", 0.5)])
def test_length_distributions_keep_their_mean(dist, spread):
    x = sample_lengths(LengthSpec(dist=dist, mean=200, spread=spread), np.random.default_rng(0), 50_000)
    assert x.min() >= 1 and x.dtype.kind == "i"
    assert x.mean() == pytest.approx(200, rel=0.01)  # flooring costs ≤ 0.5 token of 200
    if dist == "uniform":
        assert x.min() >= 100 and x.max() <= 300
    if dist == "fixed":
        assert set(x.tolist()) == {200}


def test_prompt_words_are_one_token_each_by_design():
    text = random_words(np.random.default_rng(0), 64)
    assert len(text.split()) == 64 and set(text.split()) <= set(WORDS.tolist())
    assert len(set(WORDS.tolist())) == len(WORDS)
    assert estimate_tokens("x" * 41) == 11


def _take(config: RunConfig, n: int, seed: int = 0):
    return list(itertools.islice(specs(config, np.random.default_rng(seed)), n))


def test_synthetic_prompts_are_unique_and_seeded():
    config = RunConfig(input=LengthSpec(mean=32), output=LengthSpec(mean=7))
    a, b = _take(config, 50), _take(config, 50)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert len({s.prompt.split()[:6].__str__() for s in a}) == 50  # no common prefix to cache
    assert all(len(s.prompt.split()) == 32 and s.output_len == 7 for s in a)


def test_shared_prefix_groups_share_their_system_prompt():
    config = RunConfig(dataset="shared-prefix", prefix_len=100, num_prefixes=3, input=LengthSpec(mean=10))
    items = _take(config, 60)
    systems = {s.system for s in items}
    assert len(systems) == 3 and all(len(p.split()) == 100 for p in systems)
    assert all(s.input_len == 110 for s in items)
    assert len({s.prompt for s in items}) == 60
    # the body puts the prefix first: a system message, or the head of the completion prompt
    chat = Sender(None, config.model_copy(update={"endpoint": "chat"})).body(items[0])
    assert chat["messages"][0] == {"role": "system", "content": items[0].system}
    comp = Sender(None, config).body(items[0])
    assert comp["prompt"].startswith(items[0].system)


def test_repetitive_prompts_repeat_one_line():
    items = _take(RunConfig(dataset="repetitive", input=LengthSpec(mean=200)), 3)
    for s in items:
        head, *lines = s.prompt.split("\n")
        assert len(set(lines)) == 1 and len(lines) >= 10
        tokens = len(s.prompt.split()) + 2 * len(lines) + 1  # words, '.' and newline per line, ':'
        assert abs(tokens - 200) <= 14
    assert len({s.prompt for s in items}) == 3


def test_sharegpt_loader_reads_json_and_jsonl(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]},
             {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q2"},
                                {"from": "gpt", "value": "a2"}]},
             {"conversations": [{"from": "human", "value": "unanswered"}]}]
    (tmp_path / "a.json").write_text(json.dumps(convs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(c) for c in convs))
    for name in ("a.json", "b.jsonl"):
        assert load_sharegpt(tmp_path / name) == [("q1", "a1"), ("q2", "a2")]
    (tmp_path / "c.jsonl").write_text(json.dumps(convs[2]))
    with pytest.raises(ValueError, match="no ShareGPT conversation"):
        load_sharegpt(tmp_path / "c.jsonl")


def test_request_body_carries_the_controls():
    config = RunConfig(model="m", extra_body={"top_p": 0.9}, output=LengthSpec(mean=5))
    spec = _take(config, 1)[0]
    body = Sender(None, config).body(spec)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5 and body["top_p"] == 0.9
    assert "ignore_eos" not in Sender(None, config.model_copy(update={"ignore_eos": False})).body(spec)


def test_config_rejects_incomplete_modes():
    with pytest.raises(ValueError, match="max_concurrency"):
        RunConfig(arrival="closed")
    with pytest.raises(ValueError, match="trace_path"):
        RunConfig(arrival="trace")
    with pytest.raises(ValueError, match="dataset_path"):
        RunConfig(dataset="sharegpt")
    with pytest.raises(ValueError, match="infinite request rate"):
        RunConfig(duration_s=3)
    assert RunConfig(duration_s=5, request_rate=2).total_requests() is None and RunConfig().total_requests() == 100
    assert RunConfig(num_prompts=3).total_requests(trace_len=10) == 3


# ------------------------------------------------------------------------- token-ID prompts (exact lengths)
@pytest.fixture(scope="module")
def stub():
    from loadgen.stub import StubConfig
    from loadgen.stub_server import StubThread

    with StubThread(StubConfig()) as s:
        yield s


def _pool():
    from loadgen.vocab import TokenPool

    return TokenPool(np.arange(100, 400, dtype=np.int64), "test")


@pytest.mark.parametrize("dataset", ["synthetic", "shared-prefix", "repetitive"])
def test_token_id_prompts_have_exactly_the_sampled_length(dataset):
    config = RunConfig(dataset=dataset, input=LengthSpec(dist="uniform", mean=50, spread=0.8), prefix_len=24,
                       num_prefixes=2)
    got = list(itertools.islice(specs(config, np.random.default_rng(3), pool=_pool()), 200))
    assert len({s.input_len for s in got}) > 20
    for s in got:
        assert len(s.prompt_token_ids) == s.input_len and set(s.prompt_token_ids) <= set(range(100, 400))
    if dataset == "shared-prefix":
        heads = {tuple(s.prompt_token_ids[:24]) for s in got}
        assert len(heads) == 2  # one common prefix per group, then the request's own tokens
        assert len({tuple(s.prompt_token_ids[24:30]) for s in got}) > 150
    if dataset == "repetitive":
        for s in got:
            ids = s.prompt_token_ids
            assert all(ids[i] == ids[i - 12] for i in range(12, len(ids)))
    else:
        assert len({tuple(s.prompt_token_ids[-8:]) for s in got}) == len(got)  # no two prompts alike


def test_token_ids_are_the_completions_prompt_and_chat_keeps_text():
    spec = next(specs(RunConfig(input=LengthSpec(mean=5)), np.random.default_rng(0), pool=_pool()))
    assert Sender(None, RunConfig()).body(spec)["prompt"] == spec.prompt_token_ids
    with pytest.raises(ValueError, match="completions endpoint"):
        RunConfig(endpoint="chat", prompt_format="token-ids")


async def test_prompt_source_says_what_was_sent(stub):
    from loadgen.runner import make_session
    from loadgen.vocab import TEXT_SOURCE, prompt_pool

    config = RunConfig(base_url=stub.url, model="stub")
    async with make_session(config) as session:
        pool, source = await prompt_pool(config, session)
        assert source == f"token IDs from {stub.url}/tokenize (stub)" and len(pool.ids) > 100
        assert (await prompt_pool(config.model_copy(update={"prompt_format": "text"}), session)) == (None, TEXT_SOURCE)
        nobody = config.model_copy(update={"base_url": "http://127.0.0.1:9"})
        pool, source = await prompt_pool(nobody, session)  # auto: text, and why
        assert pool is None and source.startswith(TEXT_SOURCE + "; no token IDs: cannot read http://127.0.0.1:9")
        with pytest.raises(ValueError, match="give a tokenizer"):
            await prompt_pool(nobody.model_copy(update={"prompt_format": "token-ids"}), session)


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    from loadgen.vocab import from_tokenizer

    with pytest.raises(ValueError, match="cannot load tokenizer"):
        from_tokenizer(str(tmp_path / "nothing-here"))


async def test_a_prompt_length_mismatch_turns_the_summary_red(stub):
    """The stub counts words: text of repeated lines is longer than asked, and the summary says so."""
    from rich.console import Console

    from loadgen.runner import run_benchmark
    from loadgen.summary import print_summary

    config = RunConfig(base_url=stub.url, model="stub", num_prompts=3, dataset="repetitive", prompt_format="text",
                       input=LengthSpec(mean=40), output=LengthSpec(mean=2), mfu=False, quiet=True)
    exact = await run_benchmark(config.model_copy(update={"prompt_format": "auto"}))
    assert exact.prompt_len_mismatches == 0
    r = await run_benchmark(config)
    assert r.prompt_len_mismatches == 3
    console = Console(record=True, width=200)
    print_summary(r, console)
    assert "3 of 3 prompts were not the requested length" in console.export_text()
