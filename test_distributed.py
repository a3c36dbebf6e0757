"""Tests of distributed.py's evaluation helpers: shards, summed counts, failing together.

Two threads stand in for two torchrun ranks (all_gather_object is replaced by an exchange
between the threads); test_evaluate.py runs the real thing with torchrun and gloo.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import distributed


@pytest.fixture
def two_ranks(monkeypatch):
    """run(fn) calls fn(dist) on two threads that exchange objects like two ranks; returns
    {rank: result or exception}."""
    barrier, slots, local = threading.Barrier(2, timeout=20), {}, threading.local()

    def all_gather_object(out, obj):
        slots[local.rank] = obj
        barrier.wait()
        out[:] = [slots[0], slots[1]]
        barrier.wait()

    monkeypatch.setattr(distributed.torch_dist, "all_gather_object", all_gather_object)

    def run(fn):
        results = {}

        def thread(rank: int) -> None:
            local.rank = rank
            try:
                results[rank] = fn(distributed.Dist(rank, 2, rank))
            except BaseException as error:  # noqa: BLE001 - handed to the test
                results[rank] = error

        threads = [threading.Thread(target=thread, args=(rank,)) for rank in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a rank hangs"
        return results

    return run


def test_shards_are_strided_and_cover_every_index_once():
    for count in range(0, 12):
        for world in (1, 2, 3, 5):
            shares = [list(distributed.shard(count, distributed.Dist(r, world, r))) for r in range(world)]
            assert sorted(i for share in shares for i in share) == list(range(count))
            assert all(share == list(range(r, count, world)) for r, share in enumerate(shares))


def test_sum_counts_adds_every_array_and_number_of_the_raw_dict(two_ranks):
    def counts(rank: int) -> dict:
        rng = np.random.default_rng(rank)
        return {"raw": {"num_images": 3 - rank,
                        "confusion": rng.integers(0, 1000, (4, 5)),
                        "instance_sum": rng.random(4),
                        "boundary": rng.integers(0, 50, (4, 4)),
                        "biou": rng.integers(0, 50, (4, 3))},  # an array the helper never heard of
                "seconds": {"network": 0.5 + rank, "crf": 0.0},
                "dataset": "synthetic"}

    results = two_ranks(lambda dist: distributed.sum_counts(counts(dist.rank), dist))
    a, b = counts(0), counts(1)
    for rank in (0, 1):
        got = results[rank]
        assert got["raw"]["num_images"] == 5 and got["dataset"] == "synthetic"
        for key in ("confusion", "boundary", "biou"):
            np.testing.assert_array_equal(got["raw"][key], a["raw"][key] + b["raw"][key])
            assert got["raw"][key].dtype == a["raw"][key].dtype
        np.testing.assert_allclose(got["raw"]["instance_sum"], a["raw"]["instance_sum"] + b["raw"]["instance_sum"])
        assert got["seconds"] == {"network": 2.0, "crf": 0.0}
    assert np.array_equal(results[0]["raw"]["instance_sum"], results[1]["raw"]["instance_sum"])  # same order
    # One process: the counts as they are.
    one = counts(0)
    assert distributed.sum_counts(one, distributed.Dist()) is one


def test_sum_counts_refuses_counts_that_do_not_fit(two_ranks):
    results = two_ranks(lambda dist: distributed.sum_counts({"confusion": np.zeros((2, 2 + dist.rank))}, dist))
    assert all(isinstance(r, ValueError) and "different shapes" in str(r) for r in results.values())
    results = two_ranks(lambda dist: distributed.sum_counts({"split": ["val", "test"][dist.rank]}, dist))
    assert all(isinstance(r, ValueError) and "different values" in str(r) for r in results.values())


def test_an_input_error_on_one_rank_stops_both_and_rank0_reports_it(two_ranks):
    def work(dist):
        with distributed.FailTogether(dist, (FileNotFoundError,)):
            if dist.rank == 1:
                raise FileNotFoundError("no prediction for b: preds/b.png is missing")
        return "finished"

    results = two_ranks(work)
    for rank in (0, 1):
        assert isinstance(results[rank], distributed.JobFailed), results[rank]
    assert results[0].own is None and isinstance(results[1].own, FileNotFoundError)
    assert results[0].report("evaluate.py") == "evaluate.py: rank 1: no prediction for b: preds/b.png is missing"


def test_a_failure_every_rank_meets_alike_is_reported_once_as_one_process_says_it(two_ranks):
    def work(dist):
        with distributed.FailTogether(dist):
            raise SystemExit("evaluate.py: --data-root data/VOC does not exist")

    results = two_ranks(work)
    assert results[0].report("evaluate.py") == "evaluate.py: --data-root data/VOC does not exist"


def test_a_bug_on_one_rank_is_named_as_a_bug(two_ranks):
    def work(dist):
        with distributed.FailTogether(dist, (FileNotFoundError,)):
            if dist.rank == 0:
                raise KeyError("logits")
        return "finished"

    results = two_ranks(work)
    assert isinstance(results[0].own, KeyError) and results[1].own is None
    assert results[1].report("evaluate.py") == ("evaluate.py: rank 0: KeyError: 'logits' (a bug: its traceback "
                                                "is in that rank's output)")


def test_blocks_without_a_failure_go_on_and_one_process_keeps_its_exception(two_ranks):
    def work(dist):
        for _ in range(3):
            with distributed.FailTogether(dist):
                pass
        return "finished"

    assert two_ranks(work) == {0: "finished", 1: "finished"}
    with pytest.raises(FileNotFoundError):
        with distributed.FailTogether(distributed.Dist(), (FileNotFoundError,)):
            raise FileNotFoundError("x")
