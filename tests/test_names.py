"""How things are counted and named for people: nouns agree with their counts; which names are allowed."""

from __future__ import annotations

import pytest

from asbatch.names import check_name, count
from asbatch.train.run import where_stopped
from asbatch.train.trainer import Progress


def test_counts_agree_with_their_nouns():
    assert [count(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]


def test_where_a_one_epoch_run_stopped_reads_as_english():
    prog = Progress(epoch=0, step_in_epoch=1, global_step=1)
    assert where_stopped(prog, epochs=1, steps_per_epoch=3) == "epoch 1 step 1 (of 1 epoch x 3 steps)"


@pytest.mark.parametrize("bad", ["-x", "--help", "-", ".x", "", "a b", "a/b", "x" * 101])
def test_a_sweep_or_stage_name_that_would_read_as_an_option_or_a_hidden_dir_is_refused(bad):
    # `asbatch status -x` would read a sweep named '-x' as an option; '.x' would be a hidden directory
    with pytest.raises(ValueError, match=r"^must be 1-100 letters, digits, '-', '_' or '\.', not starting with "
                                         r"'\.' or '-'$"):
        check_name(bad)


def test_a_dash_inside_or_at_the_end_of_a_name_is_fine():
    assert [check_name(v) for v in ("a-b", "a-", "_x", "x.y", "0", "x" * 100)] == ["a-b", "a-", "_x", "x.y", "0",
                                                                                    "x" * 100]
