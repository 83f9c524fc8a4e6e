"""lorafuse.parallel in one process (no distributed state made) and its sharding logic
with the collectives replaced by hand; tests/parallel/ runs two real processes."""

from __future__ import annotations

import pytest

from lorafuse import parallel
from lorafuse.errors import LorafuseError


def _boom():
    raise LorafuseError("boom")


def test_one_process_is_the_plain_case(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not parallel.launched()
    assert (parallel.world_size(), parallel.rank(), parallel.is_main_process()) == (1, 0, True)
    assert parallel.map_sharded(lambda x: x * x, [3, 1, 2]) == [9, 1, 4]
    assert parallel.gather({"a": 1}) == [{"a": 1}]
    assert parallel.once(lambda: "value") == "value"
    parallel.barrier()
    with pytest.raises(LorafuseError, match="boom"):
        parallel.once(_boom)
    assert not dist.is_initialized()  # nothing was started
    monkeypatch.setenv("WORLD_SIZE", "not a number")
    assert not parallel.launched()


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [2, 3])
def test_map_sharded_splits_by_stride_and_restores_the_order(monkeypatch, n, world):
    # Every rank runs its share; the gather (here by hand) hands back all the shares.
    items = [f"item{i}" for i in range(n)]
    ran: dict[int, list[str]] = {}
    shares = []
    for r in range(world):
        monkeypatch.setattr(parallel, "world_size", lambda w=world: w)
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        monkeypatch.setattr(parallel, "gather", lambda part: shares.append(part) or [])
        parallel.map_sharded(lambda x, r=r: ran.setdefault(r, []).append(x) or x.upper(), items)
    assert all(ran.get(r, []) == items[r::world] for r in range(world))
    monkeypatch.setattr(parallel, "rank", lambda: 0)
    monkeypatch.setattr(parallel, "gather", lambda part: shares)
    assert parallel.map_sharded(str.upper, items) == [x.upper() for x in items]


def test_once_runs_alone_on_the_main_process(monkeypatch):
    # Inside `once` the main process sees a world of one: its maps run every item.
    monkeypatch.setattr(parallel, "launched", lambda: True)
    sent = []

    class FakeDist:
        def get_world_size(self):
            return 2

        def get_rank(self):
            return 0

        def broadcast_object_list(self, box, src):
            sent.append((box[0], src))

    monkeypatch.setattr(parallel, "_dist", FakeDist)
    assert parallel.world_size() == 2
    seen = parallel.once(lambda: (parallel.world_size(), parallel.map_sharded(abs, [-1, -2])))
    assert seen == (1, [1, 2]) and sent == [((True, seen), 0)]
    assert parallel.world_size() == 2  # and two again after it
    with pytest.raises(LorafuseError, match="boom"):
        parallel.once(_boom)
    ok, error = sent[-1][0]
    assert not ok and isinstance(error, LorafuseError)


@pytest.mark.parametrize("me", [0, 1])
def test_agreed_raises_everywhere_when_one_process_fails(monkeypatch, me):
    # Process 1 fails after its collectives; process 0 must not go on to its next one.
    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    monkeypatch.setattr(parallel, "rank", lambda: me)
    outcome = {0: None, 1: "OSError: the folder is gone"}
    monkeypatch.setattr(parallel, "gather", lambda mine: [mine if r == me else outcome[r]
                                                          for r in (0, 1)])  # fmt: skip

    def work():
        if me == 1:
            raise OSError("the folder is gone")
        return "value"

    error = OSError if me == 1 else LorafuseError
    with pytest.raises(error, match="the folder is gone") as e:
        parallel.agreed(work)
    if me == 0:
        assert "process 1 of 2 failed" in str(e.value)
    monkeypatch.setattr(parallel, "gather", lambda mine: [None, None])
    assert parallel.agreed(lambda: "value") == "value"  # none failed: every process goes on


def test_agreed_is_a_plain_call_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.agreed(lambda: 7) == 7
    with pytest.raises(LorafuseError, match="boom"):
        parallel.agreed(_boom)
