"""Worker functions for tests/test_launch.py: importable, so the ranks can find them.

Run under torchrun it is also the check that ``launch`` joins an existing world::

    python -m torch.distributed.run --nproc-per-node 2 -m tests._launch_workers
"""

import os
import signal
import time

import torch
import torch.distributed as dist

from utils.launch import launch, rank_device, rank_print


def rank_info():
    """(rank, world_size, sum of ranks by all_reduce, threads, device)."""
    t = torch.tensor([float(dist.get_rank())], device=rank_device())
    dist.all_reduce(t)
    return (
        dist.get_rank(),
        dist.get_world_size(),
        int(t.item()),
        torch.get_num_threads(),
        str(rank_device()),
    )


def raise_on(bad_rank):
    """Rank ``bad_rank`` raises; the others wait in an all_reduce."""
    if dist.get_rank() == bad_rank:
        raise ValueError(f"boom from rank {bad_rank}")
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def hang_in_collective(bad_rank):
    """Rank ``bad_rank`` sleeps forever; the others wait for it in an all_reduce."""
    if dist.get_rank() == bad_rank:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def never_return(bad_rank):
    """Rank ``bad_rank`` sleeps forever; the others return without waiting."""
    if dist.get_rank() == bad_rank:
        time.sleep(3600)
    return dist.get_rank()


def sleep_then_return(seconds):
    """Every rank sleeps (long enough to be interrupted), then returns its rank."""
    time.sleep(seconds)
    return dist.get_rank()


def kill_self(bad_rank):
    """Rank ``bad_rank`` SIGKILLs itself; the others wait in an all_reduce."""
    if dist.get_rank() == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def tagged_sum(tag, seconds):
    """Sleeps (so concurrent jobs overlap): (tag, rank, sum of ranks), (start, end)."""
    start = time.time()
    time.sleep(seconds)
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return (tag, dist.get_rank(), int(t.item())), (start, time.time())


def mismatched():
    """Rank 0 waits in an all_reduce that rank 1 never calls (it just returns)."""
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def unpicklable_result():
    """Returns what cannot travel back to the caller."""
    import threading

    return threading.Lock()


def result_only_the_rank_can_unpickle():
    """Returns an instance of a class that exists only inside the rank."""
    import sys

    cls = type("OnlyInTheRank", (), {"__module__": __name__})
    sys.modules[__name__].OnlyInTheRank = cls
    return cls()


def user_timeout_error(bad_rank):
    """Rank ``bad_rank`` raises an error that merely *mentions* a timeout."""
    if dist.get_rank() == bad_rank:
        raise ValueError("timeout must be positive")
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def pid_then_sleep(seconds):
    """Prints this rank's pid (forwarded to the caller), then sleeps."""
    rank_print("pid", os.getpid())
    time.sleep(seconds)
    return os.getpid()


def print_and_return(tag):
    """Prints a line (forwarded to the caller) and returns (tag, rank)."""
    rank_print("hello", tag)
    return tag, dist.get_rank()


def main():
    """Under torchrun: join its world. As ``python -m``: start 2 ranks of this
    module's own (``__main__``) function, as ``python -m labs.<name>`` does."""
    results = launch(rank_info, world_size=int(os.environ.get("WORLD_SIZE", 2)))
    if int(os.environ.get("RANK", 0)) == 0:
        print("results:", results, flush=True)


if __name__ == "__main__":
    main()


def tensor_result(n):
    """A tensor result must outlive its rank (plain pickle, not a shared fd)."""
    import torch.distributed as dist

    return torch.full((n,), float(dist.get_rank()))
