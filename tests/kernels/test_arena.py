"""RowPool and SlotPool: blocks never overlap, the scratch slot/row 0 is never handed out,
freed blocks merge, and the pools grow when full."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cellserve.kernels.arena import RowPool, SlotPool


def test_row_pool_never_hands_out_row_zero_and_packs_blocks_first_fit():
    pool = RowPool(16)
    assert pool.take(3) == 1
    assert pool.take(4) == 4
    pool.give(1, 3)
    assert pool.take(2) == 1  # first fit: the freed hole at the front
    assert pool.take(2) == 8  # the hole's remaining row is too small


def test_row_pool_merges_freed_neighbours_into_one_block():
    pool = RowPool(16)
    blocks = [pool.take(5) for _ in range(3)]  # rows 1-5, 6-10, 11-15
    assert blocks == [1, 6, 11]
    for start in (1, 11, 6):  # the middle one last: it must merge with both sides
        pool.give(start, 5)
    assert pool.take(15) == 1  # all of [1, 16) is one block again, no growth
    assert pool.capacity == 16


def test_row_pool_grows_when_no_free_block_is_large_enough():
    pool = RowPool(8)
    assert pool.take(5) == 1
    start = pool.take(6)  # only rows 6-7 are free
    assert start == 6  # the tail block grew in place
    assert pool.capacity >= 12
    big = pool.take(100)
    assert big >= 12 and pool.capacity >= big + 100


def test_row_pool_treats_an_empty_block_as_one_row():
    pool = RowPool(8)
    a, b = pool.take(0), pool.take(0)
    assert a != b and 0 not in (a, b)
    pool.give(a, 0), pool.give(b, 0)
    assert pool.take(7) == 1


def test_slot_pool_never_hands_out_slot_zero_and_doubles_when_full():
    pool = SlotPool(4)
    taken = [pool.take() for _ in range(3)]
    assert sorted(taken) == [1, 2, 3] and pool.in_use == 3
    assert pool.take() == 4 and pool.capacity == 8
    pool.give(2)
    assert pool.in_use == 3
    assert pool.take() == 2  # reuses the freed slot before growing


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(2, 40),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.integers(0, 10**6)), max_size=60))
def test_row_pool_blocks_never_overlap_and_all_merge_back(capacity, ops):
    pool = RowPool(capacity)
    held: dict[int, int] = {}  # start -> rows
    for take, n, pick in ops:
        if take or not held:
            start = pool.take(n)
            rows = max(n, 1)
            assert start >= 1, "row 0 is scratch"
            assert start + rows <= pool.capacity
            for s, m in held.items():
                assert start + rows <= s or s + m <= start, f"[{start}, +{rows}) overlaps [{s}, +{m})"
            held[start] = rows
        else:
            start = sorted(held)[pick % len(held)]
            pool.give(start, held.pop(start))
        assert pool.capacity >= capacity
    for start, rows in list(held.items()):
        pool.give(start, rows)
    capacity = pool.capacity
    assert pool.take(capacity - 1) == 1, "freed blocks did not merge back into one"
    assert pool.capacity == capacity


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(2, 16), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), max_size=80))
def test_slot_pool_never_hands_out_a_slot_twice(capacity, ops):
    pool = SlotPool(capacity)
    held: set[int] = set()
    for take, pick in ops:
        if take or not held:
            slot = pool.take()
            assert 1 <= slot < pool.capacity
            assert slot not in held
            held.add(slot)
        else:
            slot = sorted(held)[pick % len(held)]
            held.remove(slot)
            pool.give(slot)
        assert pool.in_use == len(held)
    assert pool.capacity >= capacity


def test_a_new_lane_whose_block_fails_is_released_and_its_pools_put_back_and_growth_that_held_stays():
    from cellserve.kernels.arena import new_lane

    rows, slots = RowPool(16), SlotPool(4)
    held = [slots.take() for _ in range(3)]  # the pool is full: the lane's slot grows it

    def release(lane):  # what a kernel's release gives back
        slots.give(lane.slot)
        rows.give(lane.base, lane.length)

    try:
        with new_lane(slots, rows, 40, release) as lane:
            assert rows.capacity > 16 and slots.capacity > 4 and lane.length == 40
            raise MemoryError  # its kernel's arrays cannot grow
    except MemoryError:
        pass
    assert (rows.capacity, slots.capacity) == (16, 4)
    assert rows.take(15) == 1 and slots.in_use == len(held)
    rows.give(1, 15)
    with new_lane(slots, rows, 40, release):
        pass  # the block holds: the pools keep what they grew to
    assert rows.capacity > 16
