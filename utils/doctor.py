"""Check that this machine can run the course's labs: ``make doctor``.

Introduced in chapter 0 ("Why one device is not enough") and in the instructor guide,
as the first thing a workshop participant runs::

    python -m utils.doctor          # or: make doctor

Each line is a plain verdict (OK / WARN / FAIL), what was checked, what was found,
and a fix where one is known. The exit status is non-zero if anything FAILs.
"""

from __future__ import annotations

import os
import platform
import sys
import time

PINNED_TORCH = "2.13.0"
MIN_SHM = 1 << 30  # gloo and DataLoader workers pass tensors through /dev/shm


def all_reduce_check() -> float:
    """Runs in each rank of the doctor's 2-rank job: the sum of the ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def checks():
    """Yield (verdict, what, found, fix or None), one per check."""
    v = sys.version_info
    ok = v >= (3, 10)
    yield (
        "OK" if ok else "FAIL",
        "Python",
        platform.python_version(),
        None if ok else "the course needs Python >= 3.10",
    )
    try:
        import torch
    except ImportError as exc:
        yield "FAIL", "torch", f"cannot import: {exc}", "run `make venv`"
        return
    version = torch.__version__.split("+")[0]
    pinned = version == PINNED_TORCH
    yield (
        "OK" if pinned else "WARN",
        "torch",
        f"{torch.__version__}" + (" (the pinned version)" if pinned else ""),
        None if pinned else f"pip install torch=={PINNED_TORCH} (the course's pin)",
    )
    yield _gpus(torch)
    yield _shm()
    from utils.launch import resolve_backend

    backend, why = resolve_backend("auto", 4)
    yield "OK", "backend for a 4-rank lab", f"{backend}: {why}", None
    yield _gloo_job()


def _gpus(torch):
    n = torch.cuda.device_count()
    if n == 0:
        fix = None
        if torch.version.cuda is None and os.path.exists("/dev/nvidiactl"):
            fix = "this torch is a CPU build: install a CUDA build to use the GPUs"
        found = "none: labs run as CPU processes on gloo"
        return ("WARN" if fix else "OK"), "GPUs", found, fix
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    names = ", ".join(f"{p.name} ({_gib(p.total_memory)})" for p in props)
    return "OK", "GPUs", f"{n}: {names}", None


def _shm():
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "WARN", "/dev/shm", "missing", "gloo falls back to slower paths"
    size = st.f_frsize * st.f_blocks
    if size < MIN_SHM:
        fix = "in docker, start the container with --shm-size=8g (or --ipc=host)"
        return "WARN", "/dev/shm", f"{_gib(size)} (under 1 GiB)", fix
    return "OK", "/dev/shm", _gib(size), None


def _gloo_job():
    from utils.launch import launch

    what = "a 2-rank gloo job"
    start = time.perf_counter()
    try:
        results = launch(all_reduce_check, world_size=2, backend="gloo", timeout=30)
    except Exception as exc:  # noqa: BLE001 - the doctor reports, never crashes
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return "FAIL", what, f"failed: {first}", "see the error above; run make test"
    took = time.perf_counter() - start
    if results != [1.0, 1.0]:
        return "FAIL", what, f"all_reduce gave {results}, expected [1.0, 1.0]", None
    return "OK", what, f"all_reduce correct, {took:.2f} s", None


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
