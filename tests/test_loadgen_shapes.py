"""`--input-len N` gives N-token prompts on any tokenizer: checked by each server's own
`usage.prompt_tokens` on every request, against two real servers whose tokenizers differ."""

from __future__ import annotations

import pytest

from loadgen import LengthSpec, RunConfig, run_benchmark_sync

pytestmark = pytest.mark.engine


def _run(server: dict, **kw) -> object:
    config = dict(base_url=server["base"], model=server["model"], num_prompts=5, request_rate=float("inf"),
                  input=LengthSpec(dist="uniform", mean=40, spread=0.5), output=LengthSpec(mean=2), mfu=False,
                  quiet=True, seed=11)
    return run_benchmark_sync(RunConfig(**{**config, **kw}))


@pytest.mark.parametrize("which", ["plugin_server", "bpe512_server"])
@pytest.mark.parametrize("dataset", ["synthetic", "shared-prefix", "repetitive"])
def test_prompts_have_exactly_the_requested_tokens(request, which, dataset) -> None:
    server = request.getfixturevalue(which)
    r = _run(server, dataset=dataset, prefix_len=16)
    assert r.failed == 0, r.errors
    assert r.prompt_source.startswith("token IDs from " + server["base"] + "/tokenize"), r.prompt_source
    lens = [x.input_len for x in r.records]
    assert len(set(lens)) > 1  # the lengths really vary (uniform ±50 %)
    for rec in r.records:
        assert rec.usage_from_server and rec.prompt_tokens == rec.input_len, (rec.prompt_tokens, rec.input_len)
    assert r.prompt_len_mismatches == 0
    assert r.warmup_requests == 1  # a warm-up request before timing, by default


def test_a_local_tokenizer_gives_the_same_exact_shapes(bpe512_server) -> None:
    r = _run(bpe512_server, tokenizer=bpe512_server["model_path"])
    assert r.prompt_source == f"token IDs from tokenizer {bpe512_server['model_path']}"
    assert r.failed == 0 and r.prompt_len_mismatches == 0
    assert all(x.prompt_tokens == x.input_len for x in r.records)


def test_text_prompts_depend_on_the_tokenizer_and_the_results_say_so(plugin_server, bpe512_server) -> None:
    """What token IDs fix: the same word text is N tokens on one server and ≈ 3N on the other."""
    tiny = _run(plugin_server, prompt_format="text")
    other = _run(bpe512_server, prompt_format="text")
    assert tiny.prompt_source == other.prompt_source == "text (≈ 1 token per word; the server's usage is the truth)"
    # the word list suits the project's own tokenizer (≈ 1 token per word, the first word may split)...
    requested = sum(x.input_len for x in tiny.records) / len(tiny.records)
    assert tiny.mean_input_tokens == pytest.approx(requested, rel=0.05)
    # ...not the other: every prompt is longer than asked, about 3×
    assert other.prompt_len_mismatches == len(other.records)
    assert other.mean_input_tokens > 2 * requested
