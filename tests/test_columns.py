"""serving_mfu.cost.columns: a list is converted once while it is among the newest memoized, and the oldest
go first (the steps a settle has yet to read are the newest)."""

from __future__ import annotations

import numpy as np
import pytest

from serving_mfu.cost import columns
from serving_mfu.cost.columns import int_array, remember


def test_a_list_is_converted_once_and_read_only() -> None:
    values = [3, 1, 4]
    first = int_array(values)
    assert first.tolist() == values and first.dtype == np.int64
    assert int_array(values) is first  # the same array: not converted again
    with pytest.raises(ValueError):
        first[0] = 9  # read-only: every reader shares it
    assert int_array([3, 1, 4]) is not first  # an equal list is another list


def test_the_oldest_lists_go_first() -> None:
    lists = [[i, i + 1] for i in range(columns._MEMO_SIZE + 1)]
    arrays = [int_array(x) for x in lists]
    newest_half = -(columns._MEMO_SIZE // 2)
    assert int_array(lists[-1]) is arrays[-1] and int_array(lists[newest_half]) is arrays[newest_half]  # kept
    assert int_array(lists[0]) is not arrays[0]  # the oldest was evicted: converted again, same values
    assert int_array(lists[0]).tolist() == [0, 1]


def test_remember_hands_back_the_array_computed_first() -> None:
    arr = np.arange(5, dtype=np.int64)
    values = remember(arr.tolist(), arr)
    assert int_array(values) is arr and not arr.flags.writeable
