"""The checkpoint policy on a fake clock: when a save is due, and when the job's deadline says stop now."""

from __future__ import annotations

import pytest

from vit_scale.checkpoint.policy import CheckpointPolicy


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy(every_steps=0, every_minutes=0.0, deadline=None, step=0, t=0.0):
    """A policy whose monotonic and wall clocks are one fake clock starting at `t`."""
    clock = Clock(t)
    return CheckpointPolicy(every_steps, every_minutes, deadline, step, clock=clock, wall_clock=clock), clock


def test_step_based_saves_fall_on_multiples_of_every_steps():
    p, _ = policy(every_steps=10)
    assert [s for s in range(1, 41) if p.save_due(s)] == [10, 20, 30, 40]
    p, _ = policy()
    assert not any(p.save_due(s) for s in range(1, 41))  # 0 disables


def test_time_based_saves_count_from_the_start_then_from_each_save():
    p, clock = policy(every_minutes=2.0, t=1000.0)
    clock.t = 1119.9
    assert not p.save_due(7)
    clock.t = 1120.0
    assert p.save_due(7)
    p.saved(7, seconds=3.0)
    assert not p.save_due(8)
    clock.t = 1239.0
    assert not p.save_due(9)
    clock.t = 1240.0
    assert p.save_due(9)


def test_unsaved_counts_from_the_start_step_then_from_each_save():
    p, _ = policy(every_steps=5, step=20)  # a resumed run: step 20 is on disk
    assert not p.unsaved(20) and p.unsaved(21)
    p.saved(25, seconds=1.0)
    assert not p.unsaved(25) and p.unsaved(26)


def test_no_deadline_never_stops():
    p, clock = policy(every_steps=10)
    clock.t = 1e12
    assert not p.deadline_near(5, step_s=1e6)


def test_deadline_counts_the_time_to_the_next_scheduled_checkpoint():
    # Saves every 5 steps of 10 s each, deadline at t=100: at step 0 the next save ends at
    # 5 steps + 1 more step = 60 s, which fits; at step 1, 4 steps + 1 = 50 s fits as well.
    p, clock = policy(every_steps=5, deadline=100.0)
    assert not p.deadline_near(0, step_s=10.0)
    # Slower steps: 5 × 30 s + 30 s = 180 s would cross the deadline, so stop (and save) now.
    assert p.deadline_near(0, step_s=30.0)
    # The last save's duration counts too: 60 s of steps + 45 s of writing is past t=100.
    p.saved(0, seconds=45.0)
    assert p.deadline_near(0, step_s=10.0)


def test_deadline_takes_the_earlier_of_the_step_and_the_time_schedule():
    # Every 1000 steps (of 1 s) or every minute, deadline at t=100: the next save is the timed one at t=60,
    # then one step: 61 s < 100, keep going; at t=50 it is 10 s away, and 50 + 10 + 1 < 100 still.
    p, clock = policy(every_steps=1000, every_minutes=1.0, deadline=100.0)
    assert not p.deadline_near(3, step_s=1.0)
    clock.t = 50.0
    assert not p.deadline_near(53, step_s=1.0)
    # Saved at t=60 in 30 s: the next timed save would start at 120 and end after 151 s, past the deadline.
    clock.t = 60.0
    p.saved(60, seconds=30.0)
    assert p.deadline_near(60, step_s=1.0)


@pytest.mark.parametrize("to_deadline, stops", [(100.0, False), (10.5, False), (10.0, True), (-1.0, True)])
def test_without_a_schedule_the_horizon_is_one_step_and_a_save(to_deadline, stops):
    p, clock = policy(deadline=1000.0 + to_deadline, t=1000.0)
    p.saved(0, seconds=4.0)
    assert p.deadline_near(17, step_s=6.0) is stops
