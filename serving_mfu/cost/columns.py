"""A record's integer columns as numpy arrays, made once per list however many costings read them.

A step's lists (a batch's `new_tokens`, `computed_before`, ...) are read by the accounting, by the
per-request attribution and by the hook's ledger; `int_array` converts each list once (the conversion, not
the arithmetic, is what costs at large batches) and hands the same read-only array to every later caller.
It is a memo, not state: the answer is a function of the list, held (with the list, so its id stays valid)
for the newest lists only: the older half goes when `_MEMO_SIZE` are held, so the steps a settle has yet to
read stay.  A list must not change once converted (its array would be stale).
"""

from __future__ import annotations

from itertools import islice
from typing import Sequence

import numpy as np

_MEMO: dict[int, tuple[Sequence[int], np.ndarray]] = {}  # oldest first (dicts keep insertion order)
_MEMO_SIZE = 2048  # a few hundred steps' columns: the per-request accounts settle up to 256 steps at once


def int_array(values: Sequence[int]) -> np.ndarray:
    """`values` as a read-only int64 array (the same array for the same list object while it is memoized)."""
    hit = _MEMO.get(id(values))
    if hit is not None and hit[0] is values:
        return hit[1]
    return _keep(values, np.fromiter(values, np.int64, len(values)))


def remember(values: list[int], arr: np.ndarray) -> list[int]:
    """Note that `arr` is `values` as an array (computed as an array first, `values` is its `tolist()`): later
    `int_array(values)` calls return it without converting.  Returns `values`."""
    _keep(values, arr.astype(np.int64, copy=False))
    return values


def _keep(values: Sequence[int], arr: np.ndarray) -> np.ndarray:
    """Memoize `arr` (made read-only) as `values`' array."""
    arr.flags.writeable = False
    if len(_MEMO) >= _MEMO_SIZE:  # the older half goes (in one go: cheaper per list than one at a time)
        for key in list(islice(_MEMO, _MEMO_SIZE // 2)):
            del _MEMO[key]
    _MEMO[id(values)] = (values, arr)
    return arr
