from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.scheduler import Debouncer, DueHeap, PollGrid, next_tick


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


# ------------------------------------------------------------------ the poll grid


def test_runs_found_already_due_share_the_next_grid_point() -> None:
    # The field trial: 36 runs copied in bursts, each already past MIN_AGE, were polled
    # one by one as they arrived (51 requests). On the grid they wait for one point.
    grid: PollGrid[str] = PollGrid(60.0)
    for i, now in enumerate([1000.5, 1010.0, 1019.9, 1031.0]):
        grid.put(f"run-{i}", due=900.0 + i, now=now)
    assert {grid.due_of(f"run-{i}") for i in range(4)} == {1020.0, 1080.0}
    assert grid.take(1020.0) == ["run-0", "run-1", "run-2"]
    assert grid.take(1080.0) == ["run-3"]


def test_a_due_time_in_the_future_lands_on_its_own_grid_point() -> None:
    grid: PollGrid[str] = PollGrid(60.0)
    grid.put("a", due=1200.0, now=1000.0)  # on a point: that point
    grid.put("b", due=1200.5, now=1000.0)  # just after: the next one
    assert (grid.due_of("a"), grid.due_of("b")) == (1200.0, 1260.0)


def test_a_run_due_exactly_now_on_a_grid_point_waits_for_the_next_point() -> None:
    grid: PollGrid[str] = PollGrid(60.0)
    grid.put("a", due=1200.0, now=1200.0)  # the round of 1200 may be running already
    assert grid.due_of("a") == 1260.0


@given(st.floats(0, 10**6), st.floats(0, 10**6), st.sampled_from([1.0, 60.0, 600.0]))
def test_grid_points_are_never_in_the_past_nor_before_the_due_time(
    due: float, now: float, tick: float
) -> None:
    point = PollGrid[str](tick).point(due, now)
    assert point >= due
    assert point > now or (point == due and due > now)
    assert point - max(due, now) <= tick + 1e-6


def test_a_hold_keeps_a_run_off_the_grid_until_it_ends() -> None:
    grid: PollGrid[str] = PollGrid(60.0)
    grid.put("a", due=900.0, now=1000.0)
    grid.hold("a", until=1500.0, now=1000.0)
    assert grid.due_of("a") == 1500.0
    grid.put("a", due=900.0, now=1010.0)  # what the file says does not lift the hold
    assert grid.due_of("a") == 1500.0
    assert grid.take(1499.0) == []
    grid.release("a")
    grid.put("a", due=900.0, now=1010.0)
    assert grid.due_of("a") == 1020.0
    grid.drop("a")
    assert "a" not in grid and grid.held("a") is None


def test_a_late_round_takes_every_run_due_up_to_the_last_point() -> None:
    # The burst benchmark: a round that started late took only its own point's runs, and
    # runs of the points it slept through waited for rounds of their own.
    grid: PollGrid[str] = PollGrid(5.0)
    grid.put("a", due=100.0, now=99.0)
    grid.put("b", due=104.0, now=99.0)
    grid.put("c", due=109.0, now=99.0)
    point = grid.next_point()
    assert point == 100.0
    latest = grid.latest_point(113.7)
    assert latest == 110.0
    assert sorted(grid.take(max(point, latest))) == ["a", "b", "c"]
