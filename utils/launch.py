"""Start ``world_size`` ranks, run one function in each, bring their results back.

Introduced in chapter 0 ("Why one device is not enough"); every lab runs through it.

Usage::

    from utils.launch import launch
    from labs.data_parallel import TINY, worker

    reports = launch(worker, TINY, world_size=4)   # a list, ordered by rank

``launch(fn, *args, world_size, backend="auto", timeout=60.0)`` runs ``fn(*args)`` in
``world_size`` processes, each with the default process group initialised, and returns
the ranks' return values ordered by rank (they must pickle). ``backend="auto"`` picks
NCCL with one GPU per rank when there are at least ``world_size`` CUDA GPUs, otherwise
gloo on CPU processes; it prints one line saying which and why. Inside a rank use
``rank_device()``, ``synchronize(device)`` and ``rank_print(...)`` rather than naming
``cuda``/``nccl`` yourself.

``fn`` must be importable by module path (defined at the top level of a module such
as ``labs/`` or a ``.py`` file next to the notebook): the children find it by name.
A lambda, a nested function or one defined in a notebook cell or in a script run as
``python file.py`` is refused with a ``TypeError`` before any process starts. A
module run as ``python -m labs.zero`` may launch its own functions: the ranks import
it by that name. What the ranks print is forwarded to the caller's stdout/stderr,
so it shows up in the notebook cell.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set) ``launch`` starts
nothing: it joins the world that exists (initialising the default group from the
environment if needed), runs ``fn`` once in this process and returns every rank's
result (``all_gather_object``), so the caller behaves the same::

    torchrun --nproc-per-node 8 -m labs.data_parallel

Failures (``LaunchError``: ``rank`` to blame first, ``ranks`` all of them, ``kind``)
    raised  a rank raised: the job ends within about a second (the launcher listens
            ``_procs.GRACE_S`` = 1 s more so every rank can report), the message
            names the rank and carries its full traceback; the others are stopped.
    killed  a rank died without reporting (a signal such as SIGKILL, or os._exit):
            named with the signal name or exit code.
    hung    a rank never reported. ``timeout`` (seconds) plays two roles: it is the
            collective timeout given to ``init_process_group`` (a rank waiting for a
            peer that never arrives fails after it), and how long the launcher waits
            for stragglers after the first rank returned. Either way the ranks that
            had not reported are named as hung, after about ``timeout`` (+1 s); a
            waiting rank's timeout error is shown as context, not blamed. If every
            rank failed waiting (mismatched collectives), the waiters are named.
            A job in which no rank ever returns or fails is not bounded: interrupt
            it (KeyboardInterrupt / the notebook's stop button).
    Whatever happens, including a KeyboardInterrupt in the caller, no rank outlives
    its job: the launcher closes a pipe that each rank watches (it exits at EOF),
    then terminates and kills what is left; and each rank asks Linux
    (PR_SET_PDEATHSIG) to kill it if its parent, the fork server, dies, which
    happens when the caller dies. ``shutdown()`` stops the fork server (at exit).

Design: why not ``torch.multiprocessing.spawn`` or torch elastic's launcher? Both
start fresh interpreters that import torch again, about 2.3 s of CPU per rank, which
makes a notebook cell that relaunches 4 ranks slow. We use torch.multiprocessing's
*forkserver* context with torch preloaded: a server process imports torch once
(never touching CUDA, so NCCL ranks start with a clean CUDA state) and each rank is a
cheap fork of it. Rendezvous goes through a ``torch.distributed.FileStore`` in a
fresh temporary folder per job (removed when the job ends, or by the next launch if
the caller was killed outright), so concurrent launches
never share a rendezvous and no port is reserved. (A ``TCPStore`` hosted by the
caller on port 0 was the first design, but about one relaunch in ten then stalled
for 5 s while a rank's store client connected, when jobs followed each other within
a few hundred milliseconds; the FileStore has no such stall.) The ranks' own gloo
or NCCL connections still use 127.0.0.1 and ports the OS picks. Measured by
``python -m bench launch``.
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
import shutil
import sys
import tempfile
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import _procs

BACKENDS = ("auto", "gloo", "nccl")
_CHOICES = "{'auto', 'gloo', 'nccl'}"
# Imported once by the fork server, so ranks start with them loaded. utils.memory
# pulls in DTensor and inductor (about 1 s per rank otherwise); none touches CUDA.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "utils._procs",
    "utils.launch",
    "utils.memory",
]


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


def resolve_backend(backend: str, world_size: int) -> tuple[str, str]:
    """("nccl" | "gloo", a human reason) for ``world_size`` ranks on this machine."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    gpus = torch.cuda.device_count()
    nccl_ok = dist.is_available() and dist.is_nccl_available()
    if backend == "nccl":
        if gpus < world_size:
            raise ValueError(
                f"backend='nccl' needs one GPU per rank: {gpus} CUDA GPUs "
                f"< {world_size} ranks (use backend='auto' or 'gloo')"
            )
        if not nccl_ok:
            raise ValueError("backend='nccl' but this torch build has no NCCL")
        return "nccl", f"requested; {gpus} CUDA GPUs >= {world_size} ranks"
    if backend == "gloo":
        return "gloo", "requested"
    if gpus >= world_size and nccl_ok:
        return "nccl", f"one GPU per rank: {gpus} CUDA GPUs >= {world_size} ranks"
    why = f"{gpus} CUDA GPUs < {world_size} ranks" if nccl_ok or not gpus else ""
    return "gloo", why or "this torch build has no NCCL"


def rank_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


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
        raise TypeError(f"world_size must be a positive int, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or not timeout > 0
        or timeout == float("inf")
    ):
        raise ValueError(f"timeout must be a positive number of seconds: {timeout!r}")


def _check_portable(fn, args) -> None:
    """Refuse what the ranks could not unpickle (they import ``fn`` by name)."""
    _check_importable(fn)
    try:
        pickle.dumps(args)
    except Exception as exc:
        raise TypeError(f"the arguments for the ranks must pickle: {exc}") from exc


def _check_importable(fn) -> None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not callable(target):
        raise TypeError(f"fn must be a function, got {type(fn).__name__}")
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
        raise TypeError(
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


def _sweep_rendezvous() -> None:
    """Remove rendezvous folders whose caller is gone.

    A job removes its folder when it ends, unless its caller was killed outright
    (SIGKILL runs no cleanup); the next launch on the machine removes it then.
    """
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _RENDEZVOUS + "*")):
        pid = os.path.basename(path)[len(_RENDEZVOUS) :].split("-")[0]
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
    if ours:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        chosen, why = resolve_backend(backend, local)
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout))
    size = dist.get_world_size()
    if dist.get_rank() == 0:
        note = "" if size == world_size else f" (world_size={world_size} ignored)"
        print(f"launch: joined torchrun's {size} ranks on {dist.get_backend()}{note}")
    result = fn(*args)
    gathered = [None] * size
    dist.all_gather_object(gathered, result)
    if ours:
        dist.destroy_process_group()
    return gathered


def launch(fn, *args, world_size: int, backend: str = "auto", timeout: float = 60.0):
    """Run ``fn(*args)`` in ``world_size`` ranks; their results, ordered by rank."""
    _check(world_size, backend, timeout)
    if in_torchrun():  # fn runs here, in this process: no need to import it
        return _join_torchrun(fn, args, world_size, backend, timeout)
    _check_portable(fn, args)
    chosen, why = resolve_backend(backend, world_size)
    kind = "one GPU per rank" if chosen == "nccl" else "CPU processes"
    print(f"launch: {world_size} ranks on {chosen} ({kind}): {why}", flush=True)

    _own_multiprocessing_tempdir()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    _sweep_rendezvous()
    rendezvous = tempfile.mkdtemp(prefix=f"{_RENDEZVOUS}{os.getpid()}-")
    out_r, out_w = ctx.Pipe(duplex=False)  # the ranks' stdout, forwarded
    err_r, err_w = ctx.Pipe(duplex=False)  # and stderr
    job_r, job_w = ctx.Pipe(duplex=False)  # ranks exit when we close job_w
    outputs = [(out_r, sys.stdout), (err_r, sys.stderr)]
    procs, conns, outcome = [], [], None
    try:
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_procs.rank_main,
                args=(fn, args, rank, world_size, chosen, rendezvous, timeout)
                + ((send, out_w, err_w, job_r),),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        for c in (out_w, err_w, job_r):
            c.close()
        outcome = _procs.supervise(procs, conns, outputs, timeout)
    finally:  # also on KeyboardInterrupt (a notebook's interrupt button)
        ok = outcome is not None and not (outcome.order or outcome.pending)
        stopped = _procs.stop(procs, job_w, grace=1.0 if ok else 0.0)
        _procs.drain(outputs)
        for c in [*conns, out_r, err_r, out_w, err_w, job_r]:
            c.close()
        shutil.rmtree(rendezvous, ignore_errors=True)
    if ok:
        return [outcome.results[r] for r in range(world_size)]
    raise LaunchError(*_procs.blame(outcome, stopped, timeout, chosen))
