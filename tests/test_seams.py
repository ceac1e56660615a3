"""dptune.seams: empty in production, a test's wrapper or observer only inside its block."""

import pytest

from dptune import seams
from dptune.data import sampling
from dptune.trainer import train


@seams.seam
def double(x):
    return 2 * x


def test_a_seam_calls_its_function_unchanged_until_a_test_installs_something():
    assert double(3) == 6 and not seams.active(double)
    with seams.installed({double: lambda fn, x: fn(x) + 1}):
        assert seams.active(double) and double(3) == 7
    assert double(3) == 6 and not seams.active(double)


def test_a_point_calls_only_an_installed_observer():
    seen = []
    seams.reached("tests.point", 1)  # nothing installed: nothing happens
    with seams.installed({"tests.point": seen.append}):
        seams.reached("tests.point", 2)
    seams.reached("tests.point", 3)
    assert seen == [2]


def test_a_seam_takes_one_hook_and_is_emptied_even_when_the_block_fails():
    with pytest.raises(RuntimeError, match="already taken"):
        with seams.installed({double: lambda fn, x: fn(x)}):
            seams.install(double, lambda fn, x: fn(x))
    with pytest.raises(KeyError):
        with seams.installed({double: lambda fn, x: fn(x)}):
            raise KeyError
    assert not seams.active(double)


def test_the_production_seams_are_empty_and_named_by_their_function():
    assert seams.name_of(train.train_step) == "dptune.trainer.train.train_step"
    assert seams.name_of(sampling.poisson_batch) == "dptune.data.sampling.poisson_batch"
    assert not seams.active(train.train_step) and not seams.active(sampling.poisson_batch)
    assert not seams.active("trial.training") and not seams.active("trial.reported")
