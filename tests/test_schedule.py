"""GrowingSchedule: strength at its boundaries, phases, zero-out timing."""
import pytest

from tpp import GrowingSchedule


def test_reference_defaults():
    s = GrowingSchedule()
    assert (s.delta, s.interval, s.ceiling, s.stabilize_iters, s.zero_out_interval) == (1e-4, 10, 1.0, 10_000, 100)
    assert s.growth_increments == 10_000
    assert s.stabilize_start == 100_000
    assert s.total_iters == 110_000
    im = GrowingSchedule.imagenet()
    assert (im.interval, im.stabilize_iters, im.stabilize_start) == (5, 40_000, 50_000)


def test_strength_boundaries():
    s = GrowingSchedule()
    assert s.strength(0) == 0.0
    assert s.strength(9) == 0.0
    assert s.strength(10) == 1e-4
    assert s.strength(19) == 1e-4
    assert s.strength(20) == 2e-4
    assert s.strength(12_345) == 1e-4 * 1234
    assert s.strength(99_999) == 1e-4 * 9999
    assert s.strength(100_000) == 1.0
    assert s.strength(10**9) == 1.0


def test_ceiling_not_a_multiple_of_delta():
    s = GrowingSchedule(delta=0.3, interval=2, ceiling=1.0, stabilize_iters=5, zero_out_interval=1)
    assert s.growth_increments == 4 and s.stabilize_start == 8
    assert [s.strength(t) for t in range(10)] == pytest.approx([0, 0, 0.3, 0.3, 0.6, 0.6, 0.9, 0.9, 1.0, 1.0])
    assert s.strength(7) < 1.0 and s.strength(8) == 1.0


def test_phases():
    s = GrowingSchedule(delta=0.25, interval=3, stabilize_iters=4, zero_out_interval=1)
    assert s.stabilize_start == 12
    assert [s.phase(t) for t in (0, 11, 12, 15, 16, 100)] == ["grow", "grow", "stabilize", "stabilize", "done", "done"]
    assert s.strength(11) == 0.75 and s.strength(12) == 1.0


def test_zero_out_due():
    s = GrowingSchedule(delta=0.5, interval=1, stabilize_iters=1000, zero_out_interval=100)
    t0 = s.stabilize_start
    assert t0 == 2
    assert not s.zero_out_due(t0 - 1, 0)
    assert not s.zero_out_due(t0 + 99, 0)
    assert s.zero_out_due(t0 + 100, 0)
    assert not s.zero_out_due(t0 + 199, 1)
    assert s.zero_out_due(t0 + 200, 1)
    assert s.zero_out_due(t0 + 5000, 3)  # stays due (also in "done")
    zero_interval = GrowingSchedule(delta=0.5, interval=1, stabilize_iters=0, zero_out_interval=0)
    assert zero_interval.zero_out_due(zero_interval.stabilize_start, 7)


@pytest.mark.parametrize("kwargs", [dict(delta=0), dict(delta=-1e-4), dict(ceiling=float("inf")), dict(interval=0),
                                    dict(interval=1.5), dict(stabilize_iters=-1), dict(zero_out_interval=True)])
def test_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GrowingSchedule(**kwargs)
