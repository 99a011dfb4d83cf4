"""``ranking.servable.paced_load``: the loading thread runs at most ``duty`` of the time; state is restored."""

from __future__ import annotations

import gc
import sys
import time

import pytest

from features.spec import ConfigError
from ranking.servable import paced_load


def python_work(n: int = 300_000) -> float:
    """Seconds of wall time for ``n`` small Python calls (what loading a SavedModel mostly is)."""
    def f(i: int) -> int:
        return i + 1

    t0 = time.perf_counter()
    for i in range(n):
        f(i)
    return time.perf_counter() - t0


def test_paced_load_slows_the_loading_thread_to_its_duty():
    python_work()  # warm
    full = min(python_work() for _ in range(3))
    with paced_load(1.0):
        unpaced = python_work()
    with paced_load(0.25):
        paced = python_work()
    # ideal: 4x the full-speed time (run 1 ms, sleep 3 ms); profile-hook overhead only adds to it
    assert unpaced < 2.5 * full, (unpaced, full)
    assert paced > 2.5 * full, (paced, full)


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
