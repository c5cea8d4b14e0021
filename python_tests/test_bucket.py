"""Bucketed batch sizes (dynkernels.nn.bucket): the rounding rule and its argument checks."""
import pytest
import torch

from dynkernels.nn.bucket import bucket_sizes, bucketed_rows, check_bucket, resolve_bucket


@pytest.mark.parametrize("count, bucket, n, rows", [
    (0, 8, 128, 0), (1, 8, 128, 8), (8, 8, 128, 8), (9, 8, 128, 16), (125, 8, 128, 128),
    (5, None, 128, 5), (3, (4, 16, 64), 128, 4), (17, (4, 16, 64), 128, 64), (65, (4, 16, 64), 128, 128),
    (3, (4, 16, 64), 10, 4), (5, (4, 16, 64), 10, 10), (7, 3, 7, 7),
])
def test_bucketed_rows(count, bucket, n, rows):
    assert bucketed_rows(count, bucket, n) == rows
    assert rows == 0 or rows >= count


def test_bucket_sizes_bounded():
    assert bucket_sizes(8, 128) == tuple(range(8, 129, 8))
    assert bucket_sizes((4, 16), 10) == (4, 10)
    assert bucket_sizes(None, 128) is None


def test_resolve_auto():
    assert resolve_bucket("auto", torch.device("cpu")) is None
    assert resolve_bucket("auto", torch.device("cuda")) == 8
    assert resolve_bucket(4, torch.device("cpu")) == 4


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, [], [4, 4], [8, 4], [0, 4], "8", [2, 3.5]])
def test_bad_bucket(bad):
    with pytest.raises(ValueError, match="Owner: bucket must"):
        check_bucket("Owner", bad)


def test_good_bucket():
    assert check_bucket("o", None) is None
    assert check_bucket("o", "auto") == "auto"
    assert check_bucket("o", 8) == 8
    assert check_bucket("o", [4, 16]) == (4, 16)
