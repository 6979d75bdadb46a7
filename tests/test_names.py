"""How things are counted and named for people: nouns agree with their counts."""

from __future__ import annotations

from asbatch.names import count
from asbatch.train.run import where_stopped
from asbatch.train.trainer import Progress


def test_counts_agree_with_their_nouns():
    assert [count(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]


def test_where_a_one_epoch_run_stopped_reads_as_english():
    prog = Progress(epoch=0, step_in_epoch=1, global_step=1)
    assert where_stopped(prog, epochs=1, steps_per_epoch=3) == "epoch 1 step 1 (of 1 epoch x 3 steps)"
