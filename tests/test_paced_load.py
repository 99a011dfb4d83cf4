"""``ranking.servable.paced_load``: the loading thread runs at most ``duty`` of the time; state is restored.

The pacing is checked on a fake clock (the wall-clock ratio on a real machine is measured in
``benchmarks/bench_paced_load.py``, not asserted): the loader's work advances the fake time, the pacer's sleeps are
recorded, so the duty cycle is exact arithmetic, independent of the machine's load."""

from __future__ import annotations

import gc
import sys

import pytest

from features.spec import ConfigError
from ranking.servable import paced_load

SLICE_S = 1e-3  # the pacer's slice
STEP_S = SLICE_S / 1000  # fake seconds of work per loader call
CHECK_EVERY = 64  # profile events between the pacer's clock reads: a call and its return are 2 events


class FakeTime:
    """A clock that only the loader's work and the pacer's sleeps advance."""

    def __init__(self) -> None:
        self.now = self.work = 0.0
        self.sleeps: list[tuple[float, float]] = []  # (work done before the sleep, seconds slept)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append((self.work, seconds))
        self.now += seconds


def step(t: FakeTime, seconds: float) -> None:
    """One call of the loader doing ``seconds`` of work."""
    t.now += seconds
    t.work += seconds


def paced_run(duty: float, steps: int, seconds: float = STEP_S) -> FakeTime:
    t = FakeTime()
    with paced_load(duty, SLICE_S, clock=t.clock, sleep=t.sleep):
        for _ in range(steps):
            step(t, seconds)
    return t


@pytest.mark.parametrize("duty", [0.25, 0.5, 0.8])
def test_the_pacer_sleeps_so_the_loader_works_its_duty_of_the_time(duty):
    t = paced_run(duty, steps=40_000)  # 40 ms of work, 40 slices
    rest = SLICE_S * (1 - duty) / duty  # the sleep after each slice: slice / (slice + rest) = duty
    worked_at = [w for w, _ in t.sleeps]
    assert 35 <= len(t.sleeps) <= 40, len(t.sleeps)
    assert all(s == pytest.approx(rest, rel=1e-12) for _, s in t.sleeps), t.sleeps[:3]
    # each slice of work runs past SLICE_S by at most one check interval (the clock is read every 64 events)
    slices = [b - a for a, b in zip([0.0, *worked_at], worked_at)]
    late = CHECK_EVERY * STEP_S
    assert all(SLICE_S < w <= SLICE_S + late + 1e-12 for w in slices), (min(slices), max(slices))
    # so over the paced part, work / (work + sleep) is the duty, give or take that one check interval per slice
    work, slept = worked_at[-1], sum(s for _, s in t.sleeps)
    assert duty < work / (work + slept) <= (SLICE_S + late) / (SLICE_S + late + rest)
    assert t.work - work <= SLICE_S + late  # the tail after the last sleep is less than one slice
    assert t.now == pytest.approx(t.work + slept, rel=1e-12)  # time is work plus sleep: nothing else slept


def test_the_pacer_does_not_sleep_without_work_or_at_duty_one():
    assert paced_run(0.25, steps=10_000, seconds=0.0).sleeps == []  # the clock stood still: no slice is over
    assert paced_run(0.25, steps=100).sleeps == []  # 0.1 ms of work: under one slice
    t = FakeTime()
    with paced_load(1.0, SLICE_S, clock=t.clock, sleep=t.sleep):
        assert sys.getprofile() is None  # duty 1: no hook at all
        for _ in range(10_000):
            step(t, STEP_S)
    assert t.sleeps == []


def test_paced_load_restores_the_interpreter_after_an_error():
    interval, enabled = sys.getswitchinterval(), gc.isenabled()
    assert enabled
    with pytest.raises(RuntimeError, match="load failed"), paced_load(0.5):
        assert not gc.isenabled() and sys.getprofile() is not None
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        raise RuntimeError("load failed")
    assert sys.getswitchinterval() == interval and gc.isenabled() and sys.getprofile() is None


@pytest.mark.parametrize("duty", [0.0, -0.1, 1.5])
def test_paced_load_refuses_a_duty_outside_0_1(duty):
    with pytest.raises(ConfigError, match=f"load duty: must be in \\(0, 1\\], got {duty}"), paced_load(duty):
        pass
