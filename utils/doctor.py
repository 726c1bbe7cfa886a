"""Check that this machine can run the course's labs: ``make doctor``.

Introduced in chapter 0 ("Why one device is not enough") and in the instructor guide,
as the first thing a workshop participant runs::

    python -m utils.doctor          # or: make doctor

Each line is a plain verdict (OK / WARN / FAIL), what was checked, what was found,
and a fix where one is known. A check that raises (a MemoryError when the machine
is short of memory) is a FAIL showing the exception's type and message; the others
still run. The exit status is non-zero if anything FAILs. It also reports where
gloo listens: on loopback in ``utils.launch``'s ranks, and, under torchrun, on the
address the hostname resolves to unless GLOO_SOCKET_IFNAME is set.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time

PINNED_TORCH = "2.13.0"
MIN_SHM = 1 << 30
"""NCCL between the GPUs of one node opens shared memory in /dev/shm: in a container
with Docker's default 64 MiB it crashed in ``ncclShmOpen`` (pytorch/tutorials#2475,
fixed with ``--shm-size=2gb``). The CPU labs do not use it: the launcher returns
results by pickle over pipes, and gloo's CPU transport is TCP."""
LOOPBACK = ("127.0.0.1", "::1")


def all_reduce_check() -> tuple[float, list[str]]:
    """Runs in each rank of the doctor's 2-rank job: the sum of the ranks, and the
    addresses this rank's gloo listens on (its listening TCP sockets)."""
    import psutil
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    conns = psutil.Process().net_connections(kind="tcp")
    return t.item(), sorted({c.laddr.ip for c in conns if c.status == "LISTEN"})


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def checks():
    """Yield (verdict, what, found, fix or None), one per check.

    Each check runs on its own: one that raises (a MemoryError on a machine short
    of memory, a broken install) is reported as FAIL with the exception's type and
    message, and the others still run.
    """
    state: dict = {}
    for what, check in (
        ("Python", lambda: _python()),
        ("torch", lambda: _torch(state)),
        ("GPUs", lambda: _gpus(_needs_torch(state))),
        ("/dev/shm", lambda: _shm()),
        ("backend for a 4-rank lab", lambda: _backend(_needs_torch(state))),
        ("a 2-rank gloo job", lambda: _gloo_job(state)),
        ("gloo bind address", lambda: _bind_address(state)),
    ):
        try:
            verdict, found, fix = check()
        except Exception as exc:  # noqa: BLE001 - the doctor reports, never crashes
            first = (str(exc).splitlines() or [""])[0]
            found = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            verdict, fix = "FAIL", "see the error; run `make test` for the details"
        yield verdict, what, found, fix


def _python():
    v = sys.version_info
    ok = v >= (3, 10)
    fix = None if ok else "the course needs Python >= 3.10"
    return ("OK" if ok else "FAIL"), platform.python_version(), fix


def _torch(state):
    try:
        import torch
    except ImportError as exc:
        return "FAIL", f"cannot import: {exc}", "run `make venv`"
    state["torch"] = torch
    version = torch.__version__.split("+")[0]
    pinned = version == PINNED_TORCH
    return (
        "OK" if pinned else "WARN",
        f"{torch.__version__}" + (" (the pinned version)" if pinned else ""),
        None if pinned else f"pip install torch=={PINNED_TORCH} (the course's pin)",
    )


def _needs_torch(state):
    if "torch" not in state:
        raise RuntimeError("needs torch, which did not import")
    return state["torch"]


def _gpus(torch):
    n = torch.cuda.device_count()
    if n == 0:
        fix = None
        if torch.version.cuda is None and os.path.exists("/dev/nvidiactl"):
            fix = "this torch is a CPU build: install a CUDA build to use the GPUs"
        found = "none: labs run as CPU processes on gloo"
        return ("WARN" if fix else "OK"), found, fix
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    names = ", ".join(f"{p.name} ({_gib(p.total_memory)})" for p in props)
    return "OK", f"{n}: {names}", None


def _shm():
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "WARN", "missing", "NCCL on several GPUs needs it; the CPU labs do not"
    size = st.f_frsize * st.f_blocks
    if size < MIN_SHM:
        fix = (
            "for NCCL on several GPUs, in docker start the container with "
            "--shm-size=8g (or --ipc=host); the CPU labs do not need it"
        )
        return "WARN", f"{_gib(size)} (under 1 GiB)", fix
    return "OK", _gib(size), None


def _backend(torch):
    from utils.launch import resolve_backend

    backend, why = resolve_backend("auto", 4)
    return "OK", f"{backend}: {why}", None


def _gloo_job(state):
    _needs_torch(state)
    from utils.launch import launch

    start = time.perf_counter()
    results = launch(all_reduce_check, world_size=2, backend="gloo", timeout=30)
    took = time.perf_counter() - start
    state["listening"] = sorted({a for _, addrs in results for a in addrs})
    sums = [total for total, _ in results]
    if sums != [1.0, 1.0]:
        return "FAIL", f"all_reduce gave {sums}, expected [1.0, 1.0]", None
    return "OK", f"all_reduce correct, {took:.2f} s", None


def _bind_address(state):
    """Where gloo listens: measured in launch's ranks (the 2-rank job), and where
    it would under torchrun, which leaves GLOO_SOCKET_IFNAME to the user."""
    if "listening" not in state:
        raise RuntimeError("needs the 2-rank gloo job, which failed")
    ranks = state["listening"]
    external = [a for a in ranks if a not in LOOPBACK]
    user = os.environ.get("GLOO_SOCKET_IFNAME")
    host = socket.gethostname()
    default = _default_gloo_address(host)
    if user:
        torchrun = f"interface {user} (GLOO_SOCKET_IFNAME)"
    else:
        torchrun = f"{default} (what hostname {host!r} resolves to)"
    found = f"launch's ranks: {', '.join(ranks) or 'none'}; torchrun: {torchrun}"
    if external and not user:
        return "FAIL", found, "utils.launch should bind gloo to loopback: a bug"
    if not user and default not in LOOPBACK and not default.startswith("127."):
        fix = (
            "on one machine, `export GLOO_SOCKET_IFNAME=lo` before torchrun (gloo "
            "listens on that address otherwise); across machines, the interface "
            "of the cluster's network (and NCCL_SOCKET_IFNAME likewise)"
        )
        return "WARN", found, fix
    return "OK", found, None


def _default_gloo_address(host: str) -> str:
    """The address gloo binds without GLOO_SOCKET_IFNAME: the first address the
    hostname resolves to that can be bound, else 127.0.0.1 (gloo's
    ``createDefaultDevice`` in torch/csrc/distributed/c10d/ProcessGroupGloo.cpp)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return "127.0.0.1"
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((address[0], 0, *address[2:]))
            return address[0]
        except OSError:
            continue
    return "127.0.0.1"


def main() -> int:
    """Print every check; 1 if any FAILed, else 0."""
    failed = False
    for verdict, what, found, fix in checks():
        print(f"{verdict:<5} {what:<25} {found}", flush=True)
        if fix:
            print(f"{'':<5} {'':<25} fix: {fix}", flush=True)
        failed |= verdict == "FAIL"
    print("doctor: " + ("something FAILed (see above)" if failed else "ready"))
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the job with the function imported by module path, not this __main__.
    from utils import doctor

    sys.exit(doctor.main())
