"""adore.checks: the one validator of counts and shares every config key goes through."""

import pytest

from adore.checks import check_integer, check_share, is_integer, is_share


@pytest.mark.parametrize("value", [1, 7, 10**9])
def test_positive_integers_pass(value):
    assert is_integer(value)
    check_integer("eval.batch_size", value)


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "1", None, [1]])
def test_bools_floats_strings_and_small_values_fail(value):
    assert not is_integer(value)
    with pytest.raises(ValueError, match=r"^eval\.batch_size=.* must be a positive integer$"):
        check_integer("eval.batch_size", value)


def test_least_sets_the_lower_bound():
    assert is_integer(0, least=0) and not is_integer(-1, least=0) and not is_integer(False, least=0)
    assert not is_integer(1, least=2)
    with pytest.raises(ValueError, match=r"^method\.R=-1 must be an integer >= 0$"):
        check_integer("method.R", -1, 0)


def test_optional_allows_none_only():
    check_integer("task.arrival.chunk", None, optional=True)
    with pytest.raises(ValueError, match=r"^method\.m=None must be a positive integer$"):
        check_integer("method.m", None)
    with pytest.raises(ValueError, match=r"^task\.arrival\.chunk=0 must be a positive integer or null$"):
        check_integer("task.arrival.chunk", 0, optional=True)


def test_the_fix_ends_the_one_line_message():
    with pytest.raises(ValueError) as err:
        check_integer("K", 0, fix=": pass e.g. K=64")
    assert str(err.value) == "K=0 must be a positive integer: pass e.g. K=64" and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value, open_, closed",
    [(0.5, True, True), (0, False, True), (1, False, True), (1.0, False, True), (1.5, False, False),
     (-0.1, False, False), (True, False, False), (False, False, False), ("0.5", False, False), (None, False, False)],
)  # fmt: skip
def test_shares_open_and_closed(value, open_, closed):
    assert is_share(value) is open_
    assert is_share(value, closed=True) is closed


def test_share_messages_name_the_interval():
    check_share("bootstrap.level", 0.95)
    check_share("task.depth", None, optional=True)
    with pytest.raises(ValueError, match=r"^bootstrap\.level=1 must be a share in \(0, 1\): e\.g\. 0\.95$"):
        check_share("bootstrap.level", 1, fix=": e.g. 0.95")
    with pytest.raises(ValueError, match=r"^task\.depth=1\.5 must be a share in \[0, 1\] or null$"):
        check_share("task.depth", 1.5, closed=True, optional=True)


def test_a_positive_number_is_a_real_above_zero():
    from adore.checks import check_positive

    for good in (1, 0.5, 4.0):
        check_positive("task.length_factor", good)
    for bad in (0, -1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"^sampling.temperature=.* must be a number > 0 \(greedy\)$"):
            check_positive("sampling.temperature", bad, fix=" (greedy)")
