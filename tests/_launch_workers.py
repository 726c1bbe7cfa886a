"""Worker functions for tests/test_launch.py: importable, so the ranks can find them.

Run under torchrun it is also the check that ``launch`` joins an existing world::

    python -m torch.distributed.run --nproc-per-node 2 -m tests._launch_workers

and, with ``--hang-rank R --timeout T``, that a rank that never returns is named
(``never_return``); ``--backend nccl`` on a machine without GPUs shows how a command
line reports bad launch input (the message alone, exit status 2).
"""

import argparse
import ctypes
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from utils.launch import LaunchConfigError, launch, rank_device, rank_print


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


def segfault_in_native_code(bad_rank):
    """Rank ``bad_rank`` reads address 0 from C (a real SIGSEGV, as a bug in an
    extension would); the others wait in an all_reduce."""
    if dist.get_rank() == bad_rank:
        ctypes.string_at(0)
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


def start_grandchild(kind, then="return"):
    """Starts ``sleep 600`` as ``kind`` ("plain": in this rank's process group;
    "session": in a session of its own; "orphan": its own session and its parent
    gone, as a daemon does), prints its pid, then returns it, raises or sleeps."""
    if kind == "orphan":  # sh starts it and exits: the sleep is reparented
        sh = subprocess.run(
            ["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
        )
        pid = int(sh.stdout)
    else:
        proc = subprocess.Popen(["sleep", "600"], start_new_session=kind == "session")
        pid = proc.pid
    rank_print("grandchild", pid)
    if then == "raise":
        raise ValueError(f"raised after starting {pid}")
    if then == "sleep":
        time.sleep(600)
    return pid


def dataloader_sum(num_workers):
    """Iterates a DataLoader with worker processes (children of this rank)."""
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(12, dtype=torch.float32))
    loader = DataLoader(data, batch_size=4, num_workers=num_workers)
    return sum(batch.sum().item() for (batch,) in loader)


def print_wide(char, n):
    """Writes ``n`` copies of a non-ASCII character between "<" and ">"."""
    sys.stdout.write("<" + char * n + ">\n")
    sys.stdout.flush()
    return n


def listening_addresses():
    """The addresses this rank's listening TCP sockets are bound to (after init)."""
    import psutil

    dist.barrier()  # every connection is up
    conns = psutil.Process().net_connections(kind="tcp")
    return sorted({c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN})


def rendezvous_modes(caller_pid):
    """Permission bits of the caller's ``parlaunch-<pid>-*`` folders."""
    pattern = os.path.join(tempfile.gettempdir(), f"parlaunch-{caller_pid}-*")
    return sorted(oct(os.stat(p).st_mode & 0o777) for p in glob.glob(pattern))


def spin_holding_the_gil():
    """Ignores SIGTERM and never releases the GIL (a long C loop), so that neither
    the job pipe's watcher thread nor SIGTERM can end it: only SIGKILL does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank_print("spinning")
    return sum(range(10**12))


def main(argv=None):
    """Under torchrun: join its world. As ``python -m``: start 2 ranks of this
    module's own (``__main__``) function, as ``python -m labs.<name>`` does."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--hang-rank", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 2))
    fn, fn_args = rank_info, ()
    if args.hang_rank is not None:
        fn, fn_args = never_return, (args.hang_rank,)
    try:
        results = launch(
            fn,
            *fn_args,
            world_size=world_size,
            backend=args.backend,
            timeout=args.timeout,
        )
    except LaunchConfigError as err:  # bad input: the message alone, status 2
        parser.exit(2, f"error: {err}\n")
    if int(os.environ.get("RANK", 0)) == 0:
        print("results:", results, flush=True)


if __name__ == "__main__":
    main()


def tensor_result(n):
    """A tensor result must outlive its rank (plain pickle, not a shared fd)."""
    import torch.distributed as dist

    return torch.full((n,), float(dist.get_rank()))
