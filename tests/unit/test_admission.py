"""Admission control of the async loop, as a property: whatever the workers' speeds, the completion order,
the weight-sync period and the reuse, no group is first trained more than ``max_staleness`` versions after
the weights that generated it, no step waits forever, and ``max_staleness = 0`` is strictly sequential.

The simulation drives :class:`offpolicy.train.async_loop.Plan` exactly as ``RayRollouts`` does (fill idle
workers with the newest broadcast version; receive; broadcast every ``sync_every`` updates, and when the
learner waits on nothing in flight), with hypothesis choosing which in-flight request finishes next.
"""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from offpolicy.train.async_loop import Plan


def make_plan(steps, prompts, per_request, updates, staleness, learner):
    cfg = SimpleNamespace(run=SimpleNamespace(seed=0),
                          rl=SimpleNamespace(steps=steps, prompts_per_step=prompts, updates_per_step=updates,
                                             buffer=SimpleNamespace(max_staleness=staleness)),
                          async_=SimpleNamespace(groups_per_request=per_request))
    run = SimpleNamespace(cfg=cfg, state={"step": 0},
                          task=SimpleNamespace(problems=lambda n, split, seed: list(range(n))))
    return Plan(run, SimpleNamespace(learner=learner))


@settings(max_examples=150, deadline=None)
@given(steps=st.integers(1, 6), prompts=st.integers(1, 6), per_request=st.integers(1, 3),
       updates=st.integers(1, 4), staleness=st.integers(0, 6), workers=st.integers(1, 3),
       sync_every=st.integers(1, 3), data=st.data())
def test_no_group_is_trained_past_the_bound_and_nothing_deadlocks(steps, prompts, per_request, updates, staleness,
                                                                   workers, sync_every, data):
    learner = SimpleNamespace(version=0)
    plan = make_plan(steps, prompts, per_request, updates, staleness, learner)
    broadcast = 0  # the newest version in the object store
    in_flight: dict[int, tuple] = {}  # worker -> (job, start version)
    done: dict[tuple[int, int], int] = {}  # (step, chunk) -> start version
    n_updates = 0

    def fill():
        for w in range(workers):
            if w not in in_flight:
                job = plan.next_job(broadcast, skip=set(done))
                if job is None:
                    return
                in_flight[w] = (job, broadcast)

    def finish_one():
        w = data.draw(st.sampled_from(sorted(in_flight)))
        job, start = in_flight.pop(w)
        done[(job.step, job.chunk)] = start

    fill()
    for step in range(steps):
        wanted = [(step, c) for c in range(plan.per_step)]
        while not all(k in done for k in wanted):
            if not in_flight:
                broadcast = learner.version
                fill()
                assert in_flight, f"deadlock at step {step}"
            finish_one()
            fill()
        plan.took(step)
        for k in wanted:  # first use: the learner's version when the step is taken
            assert learner.version - done.pop(k) <= staleness
        fill()
        for _ in range(updates):
            learner.version += 1
            plan.updated()
            n_updates += 1
            if n_updates % sync_every == 0:
                broadcast = learner.version
            while in_flight and data.draw(st.booleans()):
                finish_one()
            fill()


def test_staleness_zero_generates_a_step_only_after_the_previous_one_was_learned():
    learner = SimpleNamespace(version=0)
    plan = make_plan(steps=3, prompts=4, per_request=2, updates=2, staleness=0, learner=learner)
    assert [plan.next_job(0, set()).chunk for _ in range(2)] == [0, 1]  # step 0: both requests
    assert plan.next_job(0, set()) is None  # step 1 must wait for step 0's two updates
    plan.took(0)
    learner.version = 1
    plan.updated()
    assert plan.next_job(1, set()) is None
    learner.version = 2
    plan.updated()
    assert plan.next_job(1, set()) is None  # version 1 weights are stale for step 1's first use at 2
    assert plan.next_job(2, set()).step == 1


def test_a_larger_bound_lets_generation_run_ahead():
    learner = SimpleNamespace(version=0)
    plan = make_plan(steps=10, prompts=2, per_request=2, updates=2, staleness=4, learner=learner)
    started = []
    while (job := plan.next_job(0, set())) is not None:
        started.append(job.step)
    assert started == [0, 1, 2]  # first uses at versions 0, 2, 4: all within 4 of version 0
