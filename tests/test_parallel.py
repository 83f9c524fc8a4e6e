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


def test_is_main_process_has_one_copy():
    from lorafuse.fit import sgd

    assert sgd.is_main_process is parallel.is_main_process


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
