"""RequestLedger: the named operations keep each request's high-water mark as DESIGN §4 defines it, slots
are reused and grown without mixing requests, and the slot cache never hands back stale slots."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving_mfu.runtime.ledger import RequestLedger


def test_marks_follow_prompt_chunks_decodes_and_drafts():
    led = RequestLedger(capacity=2)
    led.admit(["a", "b"], [10, 4])
    led.hold(["a"], [6])  # a: the first 6 of 10 prompt positions
    assert led.high_water_mark("a") == 6 and "a" in led.prefilling
    assert led.high_water_mark("b") == 4  # b's prompt is complete: its mark is its prompt
    led.prompts_done(["a"])
    assert led.high_water_mark("a") == 10
    led.advance(["a", "b"], [10, 4])  # plain decodes from n0: n0 + 1 kept
    assert (led.high_water_mark("a"), led.high_water_mark("b")) == (11, 5)
    led.accept(["a", "b"], [14, 5])  # a verified draft step: kept ends
    assert (led.high_water_mark("a"), led.high_water_mark("b")) == (14, 5)
    led.set_mark("b", 5, 2, 4)  # b recomputed 2 of its 5 kept positions: still below its mark and its prompt
    assert "b" in led.recomputing and "b" in led.prefilling and led.high_water_mark("b") == 5
    assert led.high_water_mark("never-seen") == 0


def test_finished_slots_are_reused_and_reset():
    led = RequestLedger(capacity=2)
    led.admit(["a", "b"], [3, 5])
    led.accept(["a", "b"], [9, 9])
    led.set_adapter("a", 7)
    assert led.adapters_in_flight == 1
    slots_before = led.slots(["a", "b"]).copy()
    led.finish({"a"})
    assert "a" not in led and led.adapters_in_flight == 0
    led.admit(["c"], [2])  # takes a's slot, with none of a's state
    assert led.slot_of["c"] == slots_before[0]
    assert led.high_water_mark("c") == 2 and led.adapters(["c", "b"]).tolist() == [-1, -1]
    # the slot cache was for [a, b]: asking for [c, b] must not hand it back
    assert led.slots(["c", "b"]).tolist() == [led.slot_of["c"], led.slot_of["b"]]


def test_a_kept_slot_is_not_reused_until_released():
    """finish(keep=True) (the accounts' way: a finished request closes at the next settle) drops the id at once
    but keeps the slot and its columns until release; then the slot is reused."""
    led = RequestLedger(capacity=2)
    led.admit(["a", "b"], [3, 5])
    led.costs[0, led.slot_of["a"]] = 42.0
    ids, slots = led.finish(["a", "never-seen"], keep=True)
    assert ids == ["a"] and "a" not in led and len(led) == 1
    kept = int(slots[0])
    led.admit(["c"], [2])  # a fresh slot (the ledger grows), not a's
    assert led.slot_of["c"] != kept and led.costs[0, kept] == 42.0
    led.release(slots)
    led.admit(["d"], [4])
    assert led.slot_of["d"] == kept and led.costs[0, kept] == 0.0 and led.prompt_of("d") == 4


def test_growing_keeps_every_request_in_its_slot():
    led = RequestLedger(capacity=4)
    ids = [f"r{i}" for i in range(4)]
    led.admit(ids, [1, 2, 3, 4])
    led.accept(ids, [10, 20, 30, 40])
    more = [f"s{i}" for i in range(9)]
    led.admit(more, list(range(100, 109)))
    assert len(led) == 13 and len(set(led.slot_of.values())) == 13
    assert [led.high_water_mark(r) for r in ids] == [10, 20, 30, 40]
    assert [led.prompt_of(r) for r in more] == list(range(100, 109))


def test_a_decode_of_a_request_never_admitted_is_admitted():
    led = RequestLedger()
    led.advance(["x"], [7])  # the hook started after x was scheduled
    assert led.high_water_mark("x") == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "finish", "accept", "advance"]),
                          st.lists(st.integers(0, 11), min_size=1, max_size=5, unique=True),
                          st.integers(0, 50)), max_size=40))
def test_the_ledger_agrees_with_dicts(ops):
    """Any sequence of operations: the columns give what per-request dicts would."""
    led = RequestLedger(capacity=2)
    prompt: dict[str, int] = {}
    mark: dict[str, int] = {}
    last: dict[str, int] = {}
    for op, nums, value in ops:
        ids = [f"r{n}" for n in nums]
        if op == "admit":
            ids = [r for r in ids if r not in prompt]
            led.admit(ids, [value] * len(ids))
            prompt.update(dict.fromkeys(ids, value))
            for r in ids:
                mark[r], last[r] = 0, -1
        elif op == "finish":
            led.finish(set(ids))
            for r in ids:
                prompt.pop(r, None), mark.pop(r, None), last.pop(r, None)
        else:
            ids = [r for r in ids if r in prompt]
            if op == "accept":
                led.accept(ids, [value + i for i in range(len(ids))])
                mark.update({r: value + i for i, r in enumerate(ids)})
            else:
                led.advance(ids, [value] * len(ids))
                last.update(dict.fromkeys(ids, value))
        for r in prompt:
            assert led.high_water_mark(r) == max(mark[r], last[r] + 1, prompt[r])
        assert len(led) == len(prompt)
    assert np.unique(list(led.slot_of.values())).size == len(led)
