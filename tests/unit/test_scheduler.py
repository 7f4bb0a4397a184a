from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.scheduler import Debouncer, DueHeap, next_tick


@given(
    st.lists(st.tuples(st.integers(0, 20), st.one_of(st.none(), st.floats(0, 100))), max_size=60)
)
@settings(max_examples=200)
def test_due_heap_matches_a_dict_model(ops: list[tuple[int, float | None]]) -> None:
    heap: DueHeap[int] = DueHeap()
    model: dict[int, float] = {}
    for key, due in ops:
        heap.set(key, due)
        if due is None:
            model.pop(key, None)
        else:
            model[key] = due
    assert len(heap) == len(model)
    assert heap.next_due() == (min(model.values()) if model else None)
    popped = heap.pop_due(50.0)
    assert sorted(popped) == sorted(k for k, d in model.items() if d <= 50.0)
    assert [model[k] for k in popped] == sorted(model[k] for k in popped)  # earliest first
    assert all(k not in heap for k in popped)
    assert len(heap) == len([d for d in model.values() if d > 50.0])


def test_rescheduling_replaces_the_old_due_time() -> None:
    heap: DueHeap[str] = DueHeap()
    heap.set("a", 10.0)
    heap.set("a", 30.0)
    assert heap.pop_due(20.0) == []
    assert heap.due_of("a") == 30.0
    assert heap.pop_due(30.0) == ["a"]
    assert heap.next_due() is None


def test_debounce_leading_edge_then_one_trailing_look() -> None:
    d: Debouncer[str] = Debouncer(settle=1.0)
    assert d.touch("p", 0.0) is True  # handled at once
    assert d.touch("p", 0.3) is False  # folded
    assert d.touch("p", 0.6) is False
    assert d.next_deadline() == 1.6
    assert d.due(1.0) == []
    assert d.due(1.6) == ["p"]
    assert d.due(5.0) == []
    assert d.touch("p", 10.0) is True  # quiet long enough: a new leading edge


def test_debounce_defer_asks_for_a_later_look_without_an_event() -> None:
    d: Debouncer[str] = Debouncer(settle=2.0)
    d.defer("half-written", 1.0)
    assert d.due(2.9) == []
    assert d.due(3.0) == ["half-written"]


@given(st.floats(0, 1e9), st.sampled_from([0.5, 1.0, 5.0, 60.0]))
def test_next_tick_is_the_first_boundary_not_before(t: float, tick: float) -> None:
    n = next_tick(t, tick)
    assert n >= t
    assert n - tick < t  # the boundary before it is already past
    assert (n / tick) == round(n / tick)
