"""Start ``world_size`` ranks, run one function in each, bring their results back.

Introduced in chapter 0 ("Why one device is not enough"); every lab runs through it.

Usage::

    from utils.launch import launch
    from labs.data_parallel import TINY, worker

    reports = launch(worker, TINY, world_size=4)   # a list, ordered by rank

``launch(fn, *args, world_size, backend="auto", timeout=60.0)`` runs ``fn(*args)`` in
``world_size`` processes, each with the default process group initialised, and returns
the ranks' return values ordered by rank (they must pickle). Where the ranks run
(``resolve_placement``; it prints one line saying which and why)::

    backend       CUDA GPUs here     the ranks
    "auto"        >= world_size      NCCL, one GPU per rank (rank r on cuda:r)
    "auto"        1 .. world_size-1  gloo with CUDA tensors, sharing the GPUs:
                                     rank r on cuda:(r % GPUs)
    "auto"        0                  gloo on CPU processes
    "gloo"        any                gloo on CPU processes (how to force the CPU)
    "gloo-cuda"   >= 1               gloo with CUDA tensors, rank r on cuda:(r % GPUs)
    "nccl"        >= world_size      NCCL, one GPU per rank (else refused)

NCCL refuses two ranks on one GPU (NCCL's src/init.cc: "Duplicate GPU detected",
ncclInvalidUsage), so ranks that share a GPU talk through gloo. gloo runs its
collectives on CUDA tensors by staging them through pinned host memory
(torch/csrc/distributed/c10d/ProcessGroupGloo*.cpp: ``AsyncAllreduceCUDAHostWork``,
``AsyncBroadcastCUDAWork``, ``AsyncAllgatherCUDAWork``, ...; its reduce-scatter is an
all-reduce of the whole buffer, each rank keeping its chunk). Each rank is a process
with its own CUDA context and caching allocator, so the memory a rank reports
(``torch.cuda.memory_allocated``, the allocator's statistics) is its own, real CUDA
memory (torch/cuda/memory.py: ``set_per_process_memory_fraction`` limits "a caching
allocator" of "a process"; ``mem_get_info`` is the device's "global" free memory,
all processes together). What gloo cannot do
with CUDA tensors: send/recv (``ProcessGroupGloo::send`` hands the tensor's address to
its TCP transport as host memory), which :func:`isend` and :func:`irecv` stage
through the CPU; ``all_reduce_coalesced`` (refused: "unsupported device type") and
``all_gather_coalesced`` (no CUDA path), which the course's code does not call. A
part that sends CUDA tensors point to point through torch itself
(``torch.distributed.pipelining``) calls :func:`check_cuda_p2p`, to be refused
before any process starts. Inside a rank use ``rank_device()``,
``synchronize(device)`` and ``rank_print(...)`` rather than naming ``cuda``/``nccl``
yourself.

``fn`` must be importable by module path (defined at the top level of a module such
as ``labs/`` or a ``.py`` file next to the notebook): the children find it by name.
A lambda, a nested function or one defined in a notebook cell or in a script run as
``python file.py`` is refused before any process starts. A module run as
``python -m labs.zero`` may launch its own functions: the ranks import it by that
name. What the ranks print is forwarded to the caller's stdout/stderr, so it shows
up in the notebook cell; it is decoded as UTF-8 by one incremental decoder per
stream, so a character split between two 64 KiB reads arrives whole.

Bad input (``LaunchConfigError``, a ``ValueError``; also a ``TypeError`` where the
type is wrong) is refused before any process starts: a bad ``world_size``,
``backend`` or ``timeout``, a backend the machine cannot run (``backend='nccl'``
without a GPU per rank: "backend='nccl' needs one GPU per rank: 0 CUDA GPUs < 2
ranks (use backend='auto' or 'gloo')"; ``backend='gloo-cuda'`` without a GPU), a
function the ranks could not import, arguments that do not pickle. Its message is
meant to be shown alone: a command line catches ``LaunchConfigError``, prints it and
exits with status 2.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set) ``launch`` starts
nothing: it joins the world that exists (initialising the default group from the
environment if needed, by the rule above applied to this machine's ranks,
LOCAL_WORLD_SIZE, and LOCAL_RANK for the GPU), runs ``fn`` once in this process and
returns every rank's result (``all_gather_object``), so the caller behaves the same::

    torchrun --nproc-per-node 8 -m labs.data_parallel

There, a rank that does not finish is named too: after ``fn`` every rank enters a
``dist.monitored_barrier`` (on a gloo group made before ``fn``), and rank 0 raises
``LaunchError("rank 1 hung: ...", kind="hung")`` for the ranks that have not
arrived ``timeout`` s after it did; if rank 0 is the one that hangs, the others
raise "rank 0 hung" after ``2 * timeout`` s. torchrun's own summary still names
rank 0 as the first failure; the traceback it shows holds our message. torchrun
(not ``launch``) leaves a ``torchelastic_*`` folder in the temp dir per run.

Failures (``LaunchError``: ``rank`` to blame first, ``ranks`` all of them, ``kind``)
    raised  a rank raised: the job ends within about a second (the launcher listens
            ``_procs.GRACE_S`` = 1 s more so every rank can report), the message
            names the rank and carries its full traceback; the others are stopped.
    killed  a rank died without reporting (a signal such as SIGKILL, or os._exit):
            named with the signal name or exit code. Each rank enables Python's
            ``faulthandler``, so a crash (SIGSEGV, SIGABRT, ...) prints the Python
            stack of each of its threads to its stderr, which the caller shows.
    hung    a rank never reported. ``timeout`` (seconds) plays two roles: it is the
            collective timeout given to ``init_process_group`` (a rank waiting for a
            peer that never arrives fails after it), and how long the launcher waits
            for stragglers after the first rank returned. Either way the ranks that
            had not reported are named as hung, after about ``timeout`` (+1 s); a
            waiting rank's timeout error is shown as context, not blamed. If every
            rank failed waiting (mismatched collectives), the waiters are named.
            A job in which no rank ever returns or fails is not bounded: interrupt
            it (KeyboardInterrupt / the notebook's stop button).

Cleanup: whatever happens, no rank outlives its job, nor does any process a rank
started (a ``subprocess``, ``DataLoader`` workers: ranks are not daemonic
processes, so they may have children).
    - The launcher closes a pipe that each rank watches (its watcher thread kills
      what the rank started, then exits), waits ``_procs.WATCH_S`` = 0.5 s, then
      terminates and kills what is left. Each rank asks Linux (PR_SET_PDEATHSIG) to
      kill it if its parent, the fork server, dies, which happens when the caller
      dies. ``shutdown()`` stops the fork server (at exit).
    - Each rank leads a session and process group of its own (``setsid``, first
      thing in the rank), and after every job, success or failure, the launcher
      SIGKILLs each rank's group (``killpg``): what a rank started dies with the
      job even if the rank itself was killed.
    - A descendant that leaves that group (``setsid``, ``start_new_session=True``,
      a daemon's double fork) is caught by the rank: it is its descendants'
      subreaper (PR_SET_CHILD_SUBREAPER, so an orphan is reparented to it, not to
      init) and kills all its descendants as it ends (returned, raised, or told
      to stop by the pipe). Not caught: such a descendant of a rank that is
      itself killed outright (SIGKILL, a crash, or still holding the GIL after
      ``WATCH_S``); and, when the caller is SIGKILLed, any descendant if the
      rank's watcher loses the race with PR_SET_PDEATHSIG (it usually wins).
    - SIGTERM and SIGHUP of the caller (main thread, while a job runs) run the
      same cleanup, then the signal goes to the handler it would have met: by
      default the caller then dies of it, after removing the fork server's
      folder and other threads' jobs; a Python handler runs, then ``launch``
      raises KeyboardInterrupt. During the cleanup SIGINT, SIGTERM and SIGHUP are
      held back and delivered after it, so a fast second Ctrl-C cannot leave a
      folder or a rank behind. Outside the main thread none of this is possible
      (Python handles signals there only): the next launch's sweep is the rest.

Design: why not ``torch.multiprocessing.spawn`` or torch elastic's launcher? Both
start fresh interpreters that import torch again, about 2.3 s of CPU per rank, which
makes a notebook cell that relaunches 4 ranks slow. We use torch.multiprocessing's
*forkserver* context with torch preloaded: a server process imports torch once
(never touching CUDA, so NCCL ranks start with a clean CUDA state) and each rank is a
cheap fork of it. Rendezvous goes through a ``torch.distributed.FileStore`` in a
fresh temporary folder per job, ``parlaunch-<caller's pid>-*`` in the temp dir,
created 0700 (``tempfile.mkdtemp``), as is the fork server's socket folder under
the same prefix. A job removes its folder when it ends; a caller killed by SIGKILL
(which no process can handle) leaves it, and the next launch removes it: that sweep
takes only folders owned by the current user whose caller's pid is not running, so
root's launches leave other users' jobs alone. Concurrent launches never share a
rendezvous and no port is reserved. (A ``TCPStore`` hosted by the caller on port 0
was the first design, but about one relaunch in ten then stalled for 5 s while a
rank's store client connected, when jobs followed each other within a few hundred
milliseconds; the FileStore has no such stall.) Measured by ``python -m bench
launch``.

Bind address: left to itself gloo listens on the address the hostname resolves to,
possibly an external interface. A job of this launcher is on one machine, so each
rank sets ``GLOO_SOCKET_IFNAME`` to the loopback interface ("lo") before init, and
gloo listens on 127.0.0.1 on ports the OS picks, unless the caller's environment
sets ``GLOO_SOCKET_IFNAME`` (then that wins). NCCL's own bootstrap sockets are not
moved (set ``NCCL_SOCKET_IFNAME=lo`` for that). Under torchrun nothing is changed:
across machines set ``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME``) to the
cluster's interface; on one machine, ``GLOO_SOCKET_IFNAME=lo`` keeps gloo on
loopback.
"""

from __future__ import annotations

import atexit
import functools
import glob
import multiprocessing
import multiprocessing.util
import numbers
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import _procs

BACKENDS = ("auto", "gloo", "gloo-cuda", "nccl")
_CHOICES = "{" + ", ".join(map(repr, BACKENDS)) + "}"
DEVICE_ENV = _procs.DEVICE_ENV  # "PARLAUNCH_DEVICE": each rank's device, set in it
# Imported once by the fork server, so ranks start with them loaded. utils.memory
# pulls in DTensor and inductor (about 1 s per rank otherwise); none touches CUDA.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "utils._procs",
    "utils.launch",
    "utils.memory",
]


class LaunchConfigError(ValueError):
    """Bad launch input, refused before any process starts (a ``ValueError``).

    Raised for a bad ``world_size``, ``backend`` or ``timeout``, a backend this
    machine cannot run (``backend='nccl'`` without a GPU per rank, ``'gloo-cuda'``
    without a GPU), a part gloo cannot run on CUDA tensors (``check_cuda_p2p``), a
    function the ranks could not import or arguments that do not pickle. The
    message is meant to be shown alone: a command line catches it, prints it and
    exits with status 2, as for a bad flag. Where the input has the wrong type it is a
    ``TypeError`` too.
    """


class _LaunchTypeError(LaunchConfigError, TypeError):
    """A ``LaunchConfigError`` about an input's type (also a ``TypeError``)."""


class LaunchError(RuntimeError):
    """A job failed: ``rank`` (the first rank to blame), ``ranks`` (all of them) and
    ``kind`` in {"raised", "hung", "killed"}; the message holds the traceback."""

    def __init__(self, message: str, rank: int, kind: str, ranks=None):
        super().__init__(message)
        self.rank = rank
        self.kind = kind
        self.ranks = list(ranks) if ranks is not None else [rank]


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or any env:// launcher)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    return all(k in os.environ for k in keys)


@dataclass(frozen=True)
class Placement:
    """Where ``world_size`` ranks run on this machine: :func:`resolve_placement`."""

    backend: str
    """What ``init_process_group`` gets: "nccl" or "gloo"."""
    device: str
    """Where the ranks compute: "cuda" or "cpu"."""
    gpus: int
    """CUDA GPUs torch sees here (0 without CUDA)."""
    world_size: int
    """Ranks on this machine (under torchrun: LOCAL_WORLD_SIZE)."""
    why: str
    """The reason, in words, for the launch line."""

    @property
    def shares_gpus(self) -> bool:
        """True when several ranks compute on one GPU (gloo with CUDA tensors)."""
        return self.device == "cuda" and self.gpus < self.world_size

    @property
    def kind(self) -> str:
        """How the ranks sit on the devices, for the launch line."""
        if self.device == "cpu":
            return "CPU processes"
        if self.shares_gpus:
            return f"sharing {_gpus_text(self.gpus)}"
        if self.backend == "nccl":
            return "one GPU per rank"
        return "CUDA tensors, one GPU per rank"

    def describe(self) -> str:
        """What the launch line says after the number of ranks: "gloo (sharing 1
        CUDA GPU): 1 CUDA GPU < 4 ranks and NCCL needs one GPU per rank: ..."."""
        return f"{self.backend} ({self.kind}): {self.why}"

    def device_for(self, local_rank: int) -> torch.device:
        """The device of the rank with this local rank: round-robin on the GPUs."""
        if self.device == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", local_rank % self.gpus)


def _gpus_text(n: int) -> str:
    return f"{n} CUDA GPU" + ("" if n == 1 else "s")


def _where(gpus: int, world_size: int) -> str:
    if gpus == 1:
        return "every rank on cuda:0"
    if gpus >= world_size:
        return "rank r on cuda:r"
    return f"rank r on cuda:(r % {gpus})"


def cuda_gpus() -> int:
    """CUDA GPUs torch can use here: 0 where ``torch.cuda.is_available()`` is False
    (a CPU build, no driver), else ``torch.cuda.device_count()``. Neither creates a
    CUDA context in the caller."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_placement(backend: str, world_size: int) -> Placement:
    """Where ``world_size`` ranks run on this machine (the table in the module
    docstring), as a :class:`Placement`.

    Raises ``LaunchConfigError`` for an unknown backend or one this machine cannot
    run, e.g. "backend='nccl' needs one GPU per rank: 0 CUDA GPUs < 2 ranks".
    """
    if backend not in BACKENDS:
        raise LaunchConfigError(f"backend must be one of {_CHOICES}, got {backend!r}")
    gpus = cuda_gpus()
    nccl_ok = dist.is_available() and dist.is_nccl_available()
    n, have = world_size, _gpus_text(gpus)

    def place(backend: str, device: str, why: str) -> Placement:
        return Placement(backend, device, gpus, world_size, why)

    if backend == "nccl":
        if gpus < n:
            raise LaunchConfigError(
                f"backend='nccl' needs one GPU per rank: {have} < {n} ranks "
                "(use backend='auto' or 'gloo')"
            )
        if not nccl_ok:
            raise LaunchConfigError("backend='nccl' but this torch build has no NCCL")
        return place("nccl", "cuda", f"requested; {have} >= {n} ranks")
    if backend == "gloo":
        return place("gloo", "cpu", "requested")
    if backend == "gloo-cuda":
        if gpus == 0:
            raise LaunchConfigError(
                "backend='gloo-cuda' needs a CUDA GPU, and torch sees none here "
                "(torch.cuda.is_available() is False): use backend='auto' or 'gloo'"
            )
        return place("gloo", "cuda", f"requested; {_where(gpus, n)}")
    if gpus >= n and nccl_ok:
        return place("nccl", "cuda", f"one GPU per rank: {have} >= {n} ranks")
    if gpus:  # fewer GPUs than ranks (NCCL refuses two ranks on one), or no NCCL
        short = (
            f"{have} < {n} ranks and NCCL needs one GPU per rank"
            if gpus < n
            else "this torch build has no NCCL"
        )
        return place("gloo", "cuda", f"{short}: gloo, {_where(gpus, n)}")
    return place("gloo", "cpu", f"{have} < {n} ranks")


def resolve_backend(backend: str, world_size: int) -> tuple[str, str]:
    """("nccl" | "gloo", a human reason) for ``world_size`` ranks on this machine:
    the backend half of :func:`resolve_placement` (which also says the device)."""
    placement = resolve_placement(backend, world_size)
    return placement.backend, placement.why


def rank_device() -> torch.device:
    """This rank's device.

    In a rank that ``launch`` started or joined, the one it chose
    (``PARLAUNCH_DEVICE``, set in the rank: ``Placement.device_for(LOCAL_RANK)``,
    cuda:r under NCCL, cuda:(r % GPUs) for ranks sharing GPUs, or the CPU).
    Elsewhere (a world the caller initialised itself, or outside any rank):
    ``cuda:LOCAL_RANK`` under NCCL, else the CPU.
    """
    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        return torch.device(chosen)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _local_world_size(world_size: int) -> int:
    """The ranks on this machine: torchrun's LOCAL_WORLD_SIZE, else ``world_size``."""
    if in_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    return world_size


def check_cuda_p2p(backend: str, world_size: int, what: str) -> None:
    """Refuse, before any process starts, a job in which ``what`` would send CUDA
    tensors point to point over gloo (``backend`` resolving to gloo with CUDA
    tensors), which gloo cannot do: ``ProcessGroupGloo::send``/``recv`` hand the
    tensor's address to the TCP transport as host memory, with no CUDA path (its
    collectives have one). The course's own messages use :func:`isend` and
    :func:`irecv`, which stage through the CPU; torch's pipelining does not.
    """
    placement = resolve_placement(backend, _local_world_size(world_size))
    if placement.backend == "gloo" and placement.device == "cuda":
        raise LaunchConfigError(
            f"{what} sends CUDA tensors point to point, which gloo cannot do "
            f"(its send/recv have no CUDA path), and backend={backend!r} puts "
            f"{placement.world_size} ranks on gloo with CUDA tensors "
            f"({placement.why}): use backend='gloo' (CPU processes), or 'nccl' "
            "with one GPU per rank"
        )


# [p2p-staging-start]
def p2p_device(device: torch.device | str, group=None) -> torch.device:
    """Where a point-to-point message to or from a tensor on ``device`` must be
    for ``group``'s backend: ``device`` itself, except CUDA under gloo (whose
    send/recv read and write the buffer as host memory): there the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return device


def isend(tensor: torch.Tensor, dst: int, *, group=None, tag: int = 0):
    """``dist.isend`` of ``tensor`` to global rank ``dst``, through a host copy
    where :func:`p2p_device` says so (the copy is made now, so ``tensor`` may
    change as soon as this returns; gloo's work keeps the copy alive)."""
    where = p2p_device(tensor.device, group)
    if where != tensor.device or not tensor.is_contiguous():
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype, device=where).copy_(
            tensor
        )
    return dist.isend(tensor, dst=dst, group=group, tag=tag)


def irecv(tensor: torch.Tensor, src: int, *, group=None, tag: int = 0):
    """``dist.irecv`` into ``tensor`` from global rank ``src``, through a host
    buffer where :func:`p2p_device` says so: waiting on the returned work also
    copies the message into ``tensor``."""
    where = p2p_device(tensor.device, group)
    if where == tensor.device and tensor.is_contiguous():
        return dist.irecv(tensor, src=src, group=group, tag=tag)
    staging = torch.empty(tensor.shape, dtype=tensor.dtype, device=where)
    return _CopyBack(
        dist.irecv(staging, src=src, group=group, tag=tag), staging, tensor
    )


class _CopyBack:
    """The work of a staged :func:`irecv`: ``wait()`` waits for the message, then
    copies it from the staging buffer into the destination tensor (once)."""

    def __init__(self, work, staging: torch.Tensor, tensor: torch.Tensor):
        self.work, self.staging, self.tensor = work, staging, tensor
        self.copied = False

    def wait(self, *args, **kwargs):
        done = self.work.wait(*args, **kwargs)
        if not self.copied:
            self.tensor.copy_(self.staging)
            self.copied = True
        return done

    def is_completed(self) -> bool:
        return self.work.is_completed() and self.copied


# [p2p-staging-end]
def synchronize(device: torch.device | str) -> None:
    """Wait for work queued on ``device`` (CUDA) before reading a clock; CPU: no-op."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rank_print(*args, **kw) -> None:
    """``print`` prefixed with ``[rank r]`` and flushed, so interleaved lines read."""
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
    sep, end = kw.pop("sep", " "), kw.pop("end", "\n")
    stream = kw.pop("file", None) or sys.stdout
    # One write per line, so that lines from different ranks do not interleave.
    stream.write(f"[rank {rank}] " + sep.join(map(str, args)) + end)
    stream.flush()


def shutdown() -> None:
    """Stop the fork server (it restarts on the next launch). Runs at exit."""
    from multiprocessing import forkserver

    fs = forkserver._forkserver
    if getattr(fs, "_forkserver_pid", None) is not None:
        fs._stop()


atexit.register(shutdown)


def _check(world_size, backend, timeout) -> None:
    """Refuse bad input before any process starts."""
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
        raise _LaunchTypeError(f"world_size must be a positive int, got {world_size!r}")
    if world_size < 1:
        raise LaunchConfigError(
            f"world_size must be a positive int, got {world_size!r}"
        )
    if backend not in BACKENDS:
        raise LaunchConfigError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or not timeout > 0
        or timeout == float("inf")
    ):
        raise LaunchConfigError(
            f"timeout must be a positive number of seconds: {timeout!r}"
        )


def _check_portable(fn, args) -> None:
    """Refuse what the ranks could not unpickle (they import ``fn`` by name)."""
    _check_importable(fn)
    try:
        pickle.dumps(args)
    except Exception as exc:
        raise _LaunchTypeError(
            f"the arguments for the ranks must pickle: {exc}"
        ) from exc


def _check_importable(fn) -> None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not callable(target):
        raise _LaunchTypeError(f"fn must be a function, got {type(fn).__name__}")
    name = getattr(target, "__qualname__", type(target).__qualname__)
    module = getattr(target, "__module__", None) or type(target).__module__
    why = None
    if "<lambda>" in name:
        why = "it is a lambda"
    elif "<locals>" in name:
        why = "it is defined inside another function"
    elif module.startswith(("__main__", "__mp_main__", "ipykernel", "__ipython")):
        if not (module == "__main__" and _main_is_importable()):
            why = f"it is defined in {module!r} (a notebook cell or a script)"
    if why:
        raise _LaunchTypeError(
            f"launch cannot run {name!r}: {why}. The ranks find the function by "
            "its module path, so it must be defined at the top level of a module. "
            "Move it into a module (e.g. labs/ or a .py file next to the notebook) "
            "and import it from there."
        )


def _main_is_importable() -> bool:
    """True when ``__main__`` was started as ``python -m pkg.mod`` (not a kernel).

    Then each rank imports ``pkg.mod`` by name (multiprocessing does this for
    ``__main__``), so ``python -m labs.zero --world-size 4`` can launch its own
    ``worker``. A notebook kernel, ``python -c`` or ``python file.py`` cannot.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return bool(name) and not name.startswith(("ipykernel", "IPython", "__main__"))


_RENDEZVOUS = "parlaunch-"  # + the caller's pid + a random suffix


_JOBS: dict[str, list] = {}  # this process's running jobs: folder -> rank processes


def _sweep_rendezvous() -> None:
    """Remove rendezvous folders whose caller is gone.

    A job removes its folder when it ends, unless its caller was killed outright
    (SIGKILL runs no cleanup); the next launch on the machine removes it then.
    Only folders (not links) owned by this user (``st_uid``) are touched, so that
    root's launches do not delete other users' jobs, and only those whose caller's
    pid is not running (a pid in use again keeps its folder: it is never wrong).
    """
    uid = os.getuid()
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _RENDEZVOUS + "*")):
        pid = os.path.basename(path)[len(_RENDEZVOUS) :].split("-")[0]
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not stat.S_ISDIR(st.st_mode):
            continue
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _own_multiprocessing_tempdir() -> None:
    """Put multiprocessing's temporary folder (the fork server's socket) under the
    same pid-named prefix, so that :func:`_sweep_rendezvous` also removes it when
    the caller was killed (a notebook kernel shut down, a SIGKILL). multiprocessing
    otherwise leaves a ``pymp-*`` folder behind for every such caller."""
    config = multiprocessing.current_process()._config
    prefix = f"{_RENDEZVOUS}{os.getpid()}-"
    # The socket's path, <tempdir>/<prefix>XXXXXXXX/listener-XXXXXXXX, must fit
    # AF_UNIX's 108 bytes; under a long TMPDIR keep multiprocessing's shorter one.
    fits = len(tempfile.gettempdir()) + len(prefix) + 27 < 100
    if config.get("tempdir") is None and fits:
        path = tempfile.mkdtemp(prefix=prefix)
        config["tempdir"] = path
        # What multiprocessing.util.get_temp_dir registers for its own folder.
        multiprocessing.util.Finalize(
            None, shutil.rmtree, args=(path, True), exitpriority=-100
        )


def _join_torchrun(fn, args, world_size, backend, timeout) -> list:
    """Run once in this torchrun rank; return all ranks' results."""
    ours = not dist.is_initialized()
    how = ""
    if ours:  # the launch rule, on this machine's ranks and GPUs
        placement = resolve_placement(backend, _local_world_size(world_size))
        device = placement.device_for(int(os.environ["LOCAL_RANK"]))
        if device.type == "cuda":
            _procs.use_device(device)
        os.environ[DEVICE_ENV] = str(device)
        dist.init_process_group(placement.backend, timeout=timedelta(seconds=timeout))
        how = f"; per machine, {placement.world_size} ranks: {placement.describe()}"
    size = dist.get_world_size()
    if dist.get_rank() == 0:
        note = "" if size == world_size else f" (world_size={world_size} ignored)"
        print(
            f"launch: joined torchrun's {size} ranks on {dist.get_backend()}{note}{how}"
        )
    # Made now, while every rank is here (making a group is collective). Its own
    # timeout, twice ours, bounds the wait of ranks 1.. for rank 0 in the barrier.
    monitor = None
    if size > 1 and dist.is_gloo_available():
        wait = timedelta(seconds=2 * timeout)
        monitor = dist.new_group(backend="gloo", timeout=wait)
    result = fn(*args)
    if monitor is not None and dist.is_initialized():  # fn may have torn it down
        _name_stragglers(monitor, timeout)
        dist.destroy_process_group(monitor)
    gathered = [None] * size
    dist.all_gather_object(gathered, result)
    if ours:
        dist.destroy_process_group()
        os.environ.pop(DEVICE_ENV, None)
    return gathered


def _name_stragglers(group, timeout: float) -> None:
    """A barrier after ``fn`` that names, as ``LaunchError(kind="hung")``, the
    ranks that did not reach it within ``timeout`` s.

    ``dist.monitored_barrier`` (gloo only, hence the gloo ``group``): rank 0 waits
    ``timeout`` for every other rank and, with ``wait_all_ranks=True``, raises
    "[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 3000 ms"; the other
    ranks wait for rank 0 for the group's timeout and raise "Rank 2 successfully
    reached monitoredBarrier, but received errors while waiting for send/recv from
    rank 0" with gloo's own error ("Timed out ..." when rank 0 never came,
    "Connection closed" when it left, having named the ranks that hung). Without
    it, torchrun blames rank 0 (the first to fail, its collective timing out) and
    the rank that hung shows only as stopped by SIGTERM.
    """
    try:
        dist.monitored_barrier(
            group=group, timeout=timedelta(seconds=timeout), wait_all_ranks=True
        )
    except RuntimeError as exc:
        text = str(exc)
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if found:
            hung = sorted({int(r) for r in re.findall(r"\d+", found.group(1))})
            names = ", ".join(map(str, hung))
            msg = (
                f"rank {names} hung: still running {timeout:g} s after rank 0 "
                f"returned (timeout={timeout:g}; under torchrun, which names rank 0 "
                "as the first to fail)"
            )
            raise LaunchError(msg, hung[0], "hung", hung) from exc
        if "successfully reached monitoredBarrier" in text and "Timed out" in text:
            msg = (
                f"rank 0 hung: rank {dist.get_rank()} waited {2 * timeout:g} s for "
                f"it after returning (2 x timeout={timeout:g}; under torchrun)"
            )
            raise LaunchError(msg, 0, "hung") from exc
        raise


def _rank_env() -> dict[str, str]:
    """Variables each rank sets before init: where gloo listens.

    gloo binds the address that the hostname resolves to, which may be an
    external interface, unless ``GLOO_SOCKET_IFNAME`` names interfaces (read by
    the ``ProcessGroupGloo(store, rank, size, timeout)`` constructor that
    ``init_process_group`` calls: torch/csrc/distributed/c10d/init.cpp; torch 2.13
    passes no gloo device through ``init_process_group``'s options). A job of
    this launcher is on one machine, so it is the loopback interface, unless the
    user set the variable (read here, at launch time, not from the fork server's
    older environment).
    """
    user = os.environ.get("GLOO_SOCKET_IFNAME")
    if user:
        return {"GLOO_SOCKET_IFNAME": user}
    loopback = loopback_interface()
    return {"GLOO_SOCKET_IFNAME": loopback} if loopback else {}


def loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux), or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return None


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Stopped(BaseException):
    """SIGTERM or SIGHUP reached the caller's main thread during a job."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalGuard:
    """The caller's signals around one job; does nothing outside the main thread
    (Python runs signal handlers there only, and only it may install them).

    ``catch``: SIGTERM and SIGHUP raise ``_Stopped``, so the job's cleanup runs
    (their default action ends the process on the spot). ``defer``: during that
    cleanup SIGINT, SIGTERM and SIGHUP are only recorded, so that a second Ctrl-C
    cannot cut it short. ``release``: the previous handlers come back and what was
    recorded is delivered to them. A signal that is ignored (SIG_IGN, as under
    ``nohup``) or handled outside Python is left alone.
    """

    def __init__(self):
        self.active = threading.current_thread() is threading.main_thread()
        self.saved: dict[int, object] = {}
        self.pending: list[int] = []

    def _install(self, signum: int, handler) -> None:
        old = signal.getsignal(signum)
        if old is None or old is signal.SIG_IGN:
            return
        self.saved.setdefault(signum, old)
        signal.signal(signum, handler)

    def catch(self) -> None:
        if self.active:
            for signum in _STOP_SIGNALS:
                self._install(signum, self._raise)

    def defer(self) -> None:
        if self.active:
            for signum in (signal.SIGINT, *_STOP_SIGNALS):
                self._install(signum, self._record)

    def release(self, stopped_by: int | None) -> None:
        for signum, old in self.saved.items():
            signal.signal(signum, old)
        self.saved = {}
        got = [stopped_by] if stopped_by is not None else []
        got += [s for s in self.pending if s not in got]
        self.pending = []
        for signum in sorted(got, key=lambda s: s == signal.SIGINT):  # INT last
            _deliver(signum)

    @staticmethod
    def _raise(signum, frame):
        raise _Stopped(signum)

    def _record(self, signum, frame):
        self.pending.append(signum)


def _deliver(signum: int) -> None:
    """Hand a signal that arrived during a job to the handler it would have met:
    a Python handler runs (and may raise, as SIGINT's raises KeyboardInterrupt);
    under the default action the process dies of it, after ``_before_dying``."""
    handler = signal.getsignal(signum)
    if handler is signal.SIG_IGN:
        return
    if handler is signal.SIG_DFL:
        _before_dying()
    signal.raise_signal(signum)


def _before_dying() -> None:
    """What exit would have cleaned, for a death by signal: other threads' jobs
    (their rank groups killed, folders removed) and the fork server's folder (the
    fork server itself exits when we do, and its ranks with it)."""
    try:
        for folder, procs in list(_JOBS.items()):
            _procs.kill_groups(procs)
            shutil.rmtree(folder, ignore_errors=True)
        tempdir = multiprocessing.current_process()._config.get("tempdir") or ""
        if os.path.basename(tempdir).startswith(f"{_RENDEZVOUS}{os.getpid()}-"):
            shutil.rmtree(tempdir, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - we are dying anyway: die of the signal
        pass


def launch(fn, *args, world_size: int, backend: str = "auto", timeout: float = 60.0):
    """Run ``fn(*args)`` in ``world_size`` ranks; their results, ordered by rank."""
    _check(world_size, backend, timeout)
    if in_torchrun():  # fn runs here, in this process: no need to import it
        return _join_torchrun(fn, args, world_size, backend, timeout)
    _check_portable(fn, args)
    placement = resolve_placement(backend, world_size)
    chosen = placement.backend
    print(f"launch: {world_size} ranks on {placement.describe()}", flush=True)

    _own_multiprocessing_tempdir()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    _sweep_rendezvous()
    env = _rank_env()
    out_r, out_w = ctx.Pipe(duplex=False)  # the ranks' stdout, forwarded
    err_r, err_w = ctx.Pipe(duplex=False)  # and stderr
    job_r, job_w = ctx.Pipe(duplex=False)  # ranks exit when we close job_w
    outputs = [_procs.Output(out_r, sys.stdout), _procs.Output(err_r, sys.stderr)]
    procs, conns, outcome, rendezvous, stopped_by, ok = [], [], None, None, None, False
    guard = _SignalGuard()
    try:
        guard.catch()
        rendezvous = tempfile.mkdtemp(prefix=f"{_RENDEZVOUS}{os.getpid()}-")  # 0700
        _JOBS[rendezvous] = procs
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            # Not daemon=True: a daemonic process may not start children, and a
            # rank may (DataLoader workers). Its life is bounded anyway: see above.
            p = ctx.Process(
                target=_procs.rank_main,
                args=(fn, args, rank, world_size, chosen, rendezvous, timeout)
                + ((send, out_w, err_w, job_r), env, str(placement.device_for(rank))),
                name=f"rank{rank}",
            )
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        for c in (out_w, err_w, job_r):
            c.close()
        outcome = _procs.supervise(procs, conns, outputs, timeout)
    except _Stopped as exc:  # SIGTERM / SIGHUP: clean up, then deliver it
        stopped_by = exc.signum
    finally:  # also on KeyboardInterrupt (a notebook's interrupt button)
        guard.defer()  # a second Ctrl-C waits for the cleanup
        try:
            ok = outcome is not None and not (outcome.order or outcome.pending)
            stopped = _procs.stop(procs, job_w, grace=1.0 if ok else 0.0)
            _procs.drain(outputs)
            for c in [*conns, out_r, err_r, out_w, err_w, job_r]:
                c.close()
            if rendezvous is not None:
                shutil.rmtree(rendezvous, ignore_errors=True)
                _JOBS.pop(rendezvous, None)
        finally:
            guard.release(stopped_by)
    if stopped_by is not None:  # its handler returned: the job is over all the same
        name = signal.Signals(stopped_by).name
        raise KeyboardInterrupt(f"launch: the job was stopped by {name}")
    if ok:
        return [outcome.results[r] for r in range(world_size)]
    raise LaunchError(*_procs.blame(outcome, stopped, timeout, chosen))
