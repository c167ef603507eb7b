"""The ranks' agreement on signals: at which training steps, and what runs there (one process, a fake all-reduce)."""

from __future__ import annotations

import signal

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_dembed.strategies import hybrid_parallel
from lightning_dembed.strategies.hybrid_parallel import _SignalsAtStepStart


class _Done:
    def wait(self) -> None:
        pass


@pytest.fixture
def agreement(monkeypatch: pytest.MonkeyPatch):
    """A `_SignalsAtStepStart` on SIGUSR2, with a fake clock and an all-reduce that records its steps."""
    clock = {"now": 0.0}
    reduced_at: list[int] = []
    handled: list[int] = []
    step = {"n": 0}

    def all_reduce(tensor, op, group, async_op):
        reduced_at.append(step["n"])
        return _Done()

    monkeypatch.setattr(hybrid_parallel.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    trainer = Trainer(accelerator="cpu", logger=False)
    signals = _SignalsAtStepStart({signal.SIGUSR2: lambda signum, frame: handled.append(step["n"])}, None, trainer)

    def run(steps: int, seconds_per_step: float) -> None:
        for _ in range(steps):
            step["n"] += 1
            signals.at_step_start()
            clock["now"] += seconds_per_step

    yield signals, run, reduced_at, handled, trainer
    signals.release()
    signal.signal(signal.SIGUSR2, previous)


def test_the_ranks_agree_about_once_a_second_and_every_step_when_steps_are_slow(agreement) -> None:
    signals, run, reduced_at, _, _ = agreement
    run(3, seconds_per_step=2.0)
    assert reduced_at == [1, 2, 3]
    # Each agreed step reads the time per step the one before it measured: 1 s is 8 steps from step 6 on.
    run(30, seconds_per_step=0.125)
    assert reduced_at[3:] == [4, 5, 6, 14, 22, 30]
    run(300, seconds_per_step=0.001)  # 1 s would be 1000 steps; never more than 100 apart
    assert [later - earlier for earlier, later in zip(reduced_at, reduced_at[1:])][-2:] == [100, 100]


def test_a_mark_runs_the_handler_at_the_agreed_step_after_the_one_that_shares_it(agreement) -> None:
    signals, run, reduced_at, handled, _ = agreement
    run(3, seconds_per_step=0.25)  # agreed at 1, 2, 3; next at 7 (1 s is 4 steps)
    signals._mark(signal.SIGUSR2, None)
    run(12, seconds_per_step=0.25)
    assert reduced_at == [1, 2, 3, 7, 11, 15]
    assert handled == [11]  # shared in the all-reduce started at 7, read at 11
    signals._mark(signal.SIGUSR2, None)  # once per run
    run(8, seconds_per_step=0.25)
    assert handled == [11]


def test_a_mark_left_at_the_end_of_fit_runs_the_handler_there(agreement) -> None:
    signals, run, _, handled, trainer = agreement
    run(3, seconds_per_step=0.25)
    signals._mark(signal.SIGUSR2, None)
    signals.close()
    assert handled == [3]
    assert signal.getsignal(signal.SIGUSR2) is not signals._mark
    assert "_broadcast_sigterm_tensor" not in vars(trainer.fit_loop.epoch_loop)
