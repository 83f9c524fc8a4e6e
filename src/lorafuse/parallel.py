"""Many processes under `accelerate launch`: who this process is, its share, the whole.

Outside `accelerate launch` (WORLD_SIZE unset or 1) every helper is the one-process
case and no accelerate or torch.distributed state is created. Under it, every process
runs the same code in lock step and meets the others at the collectives below, which
must therefore be called by all processes in the same order:
- `map_sharded(fn, items)`: each process runs `fn` on its share of the items (strided:
  process r takes items r, r + W, ...), and every process gets all results back in the
  items' order, so what is computed from them equals a one-process run;
- `once(fn)`: the main process runs `fn` alone (every helper inside sees one process)
  and the others receive its value, or raise its exception;
- `agreed(fn)`: every process runs `fn`; when it raised in any, it raises in all;
- `gather(obj)`, `barrier()`.
Only the main process writes outputs, through `once` (so that its error, a full disk
say, stops every process rather than leaving them waiting at the next collective); a
process that reads what the main process wrote waits at a collective first (`barrier`,
or the `once` that wrote). Files the main process writes are also removed by it alone.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lorafuse.errors import LorafuseError

T = TypeVar("T")
R = TypeVar("R")

_SOLO = {"on": False}  # inside `once` on the main process: the world is this process


def launched() -> bool:
    """True under a launcher of several processes (`accelerate launch`, torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def world_size() -> int:
    """Number of processes sharing the work (1 outside `accelerate launch`)."""
    if _SOLO["on"] or not launched():
        return 1
    return _dist().get_world_size()


def rank() -> int:
    """This process's index in 0..world_size() - 1 (0 outside `accelerate launch`)."""
    if _SOLO["on"] or not launched():
        return 0
    return _dist().get_rank()


def is_main_process() -> bool:
    """True in the process that writes outputs (always, outside `accelerate launch`)."""
    return rank() == 0


def gather(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order, on every process (picklable objects)."""
    W = world_size()
    if W == 1:
        return [obj]
    out: list[Any] = [None] * W
    _dist().all_gather_object(out, obj)
    return out


def map_sharded(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(x) for x in items], each process running `fn` on items rank, rank + W, ...;
    the results are gathered to every process in the items' order."""
    W, r = world_size(), rank()
    if W == 1:
        return [fn(x) for x in items]
    parts = gather([fn(items[i]) for i in range(r, len(items), W)])
    out: list[Any] = [None] * len(items)
    for k, part in enumerate(parts):
        out[k::W] = part
    return out


def once(fn: Callable[[], R]) -> R:
    """`fn()` run by the main process alone, its value broadcast to every process.

    Inside `fn` the main process sees a world of one (its sharded maps run every item),
    so `fn` must not wait for the others. An exception of `fn` is raised on every
    process (as a LorafuseError with its message when it cannot be pickled).
    """
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        _SOLO["on"] = True
        try:
            box[0] = (True, fn())
        except Exception as e:
            box[0] = (False, e if _picklable(e) else LorafuseError(f"{type(e).__name__}: {e}"))
        finally:
            _SOLO["on"] = False
    _dist().broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def agreed(fn: Callable[[], R]) -> R:
    """`fn()` run by every process, which then agree on whether it failed.

    When `fn` raised in any process, every process raises: its own exception, or a
    LorafuseError naming the first process that failed and its message. So one process's
    late error (writing a file, say) cannot leave the others waiting at their next
    collective. An error raised before a collective inside `fn` still leaves the others
    waiting there, until the process group's timeout.
    """
    if world_size() == 1:
        return fn()
    try:
        value, error = fn(), None
    except Exception as e:
        value, error = None, e
    failed = gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for r, message in enumerate(failed):
        if message is not None:
            raise LorafuseError(f"process {r} of {len(failed)} failed: {message}")
    return value


def barrier() -> None:
    """Wait until every process reaches this point (nothing outside `accelerate launch`)."""
    if world_size() > 1:
        _dist().barrier()


def _dist():
    # torch.distributed, its process group started by accelerate (gloo on CPU, nccl on
    # GPUs) the first time a launched process asks.
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # cpu: gloo, not one process
    return dist


def _picklable(e: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return False
    return True
