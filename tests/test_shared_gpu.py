"""One GPU, many ranks: where ``utils.launch`` puts the ranks, and what they can send.

The decision (``resolve_placement``) is pure and runs here with the GPU count
mocked (0, 1, 2 GPUs x 1, 2, 4 ranks); the plumbing (the device each rank is told,
the torchrun rule by LOCAL_RANK, point-to-point staging) runs on CPU/gloo. The
tests marked ``gpu`` run a lab with 2 ranks sharing one GPU through gloo and skip
where there is none. The rank workers live at the top of this module: the ranks
import them by module path.
"""

import os
import re
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from utils import _procs
from utils import launch as launch_module
from utils.launch import (
    DEVICE_ENV,
    LaunchConfigError,
    Placement,
    check_cuda_p2p,
    irecv,
    isend,
    launch,
    p2p_device,
    rank_device,
    resolve_backend,
    resolve_placement,
)

GPUS = launch_module.cuda_gpus()
MiB = 1 << 20


def gpus_text(n: int) -> str:
    return f"{n} CUDA GPU" + ("" if n == 1 else "s")


@pytest.fixture
def machine(monkeypatch):
    """``machine(gpus, nccl=True)``: what torch reports about CUDA, mocked."""

    def set_gpus(gpus: int, nccl: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)

    return set_gpus


# ------------------------------------------------------------------- the decision
def expected(gpus: int, n: int) -> tuple[str, str, list[str]]:
    """The rule of the issue, written out: (backend, device, each rank's device)."""
    if gpus >= n:
        return "nccl", "cuda", [f"cuda:{r}" for r in range(n)]
    if gpus >= 1:
        return "gloo", "cuda", [f"cuda:{r % gpus}" for r in range(n)]
    return "gloo", "cpu", ["cpu"] * n


@pytest.mark.parametrize("gpus", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_auto_places_the_ranks_by_the_gpus_there_are(machine, gpus, n):
    machine(gpus)
    p = resolve_placement("auto", n)
    backend, device, devices = expected(gpus, n)
    assert (p.backend, p.device, p.gpus, p.world_size) == (backend, device, gpus, n)
    assert [str(p.device_for(r)) for r in range(n)] == devices
    assert resolve_backend("auto", n) == (p.backend, p.why)
    assert p.shares_gpus == (1 <= gpus < n)
    # The reason names the counts it compared.
    if gpus >= n:
        assert p.kind == "one GPU per rank"
        assert p.why == f"one GPU per rank: {gpus_text(gpus)} >= {n} ranks"
    elif gpus:
        assert p.kind == f"sharing {gpus_text(gpus)}"
        assert p.why.startswith(f"{gpus_text(gpus)} < {n} ranks and NCCL needs")
        where = "every rank on cuda:0" if gpus == 1 else f"cuda:(r % {gpus})"
        assert where in p.why
    else:
        assert p.kind == "CPU processes"
        assert p.why == f"0 CUDA GPUs < {n} ranks"


def test_the_launch_line_says_where_and_why(machine):
    machine(1)
    assert resolve_placement("auto", 4).describe() == (
        "gloo (sharing 1 CUDA GPU): 1 CUDA GPU < 4 ranks and NCCL needs one GPU "
        "per rank: gloo, every rank on cuda:0"
    )
    machine(2)
    assert resolve_placement("auto", 2).describe() == (
        "nccl (one GPU per rank): one GPU per rank: 2 CUDA GPUs >= 2 ranks"
    )
    assert (
        resolve_placement("auto", 3)
        .describe()
        .startswith("gloo (sharing 2 CUDA GPUs): 2 CUDA GPUs < 3 ranks")
    )


def test_auto_without_nccl_shares_the_gpus_through_gloo(machine):
    machine(4, nccl=False)
    p = resolve_placement("auto", 2)
    assert (p.backend, p.device, str(p.device_for(1))) == ("gloo", "cuda", "cuda:1")
    assert "this torch build has no NCCL" in p.why
    assert p.kind == "CUDA tensors, one GPU per rank"


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_gloo_is_cpu_processes_whatever_the_gpus(machine, gpus):
    machine(gpus)
    p = resolve_placement("gloo", 4)
    assert (p.backend, p.device, p.why) == ("gloo", "cpu", "requested")
    assert {str(p.device_for(r)) for r in range(4)} == {"cpu"}


@pytest.mark.parametrize("gpus, n", [(1, 4), (2, 2), (2, 3)])
def test_gloo_cuda_puts_every_rank_on_a_gpu(machine, gpus, n):
    machine(gpus)
    p = resolve_placement("gloo-cuda", n)
    assert (p.backend, p.device) == ("gloo", "cuda")
    assert [p.device_for(r).index for r in range(n)] == [r % gpus for r in range(n)]
    assert p.why.startswith("requested; ")


def test_gloo_cuda_without_a_gpu_is_refused(machine):
    machine(0)
    with pytest.raises(LaunchConfigError) as info:
        resolve_placement("gloo-cuda", 2)
    assert "backend='gloo-cuda' needs a CUDA GPU" in str(info.value)
    assert "'auto' or 'gloo'" in str(info.value)


@pytest.mark.parametrize("gpus, n", [(0, 1), (0, 2), (1, 2), (2, 4)])
def test_nccl_with_too_few_gpus_is_refused_with_the_counts(machine, gpus, n):
    machine(gpus)
    with pytest.raises(LaunchConfigError) as info:
        resolve_placement("nccl", n)
    assert str(info.value) == (
        f"backend='nccl' needs one GPU per rank: {gpus_text(gpus)} < {n} ranks "
        "(use backend='auto' or 'gloo')"
    )


def test_nccl_without_nccl_in_the_build_is_refused(machine):
    machine(2, nccl=False)
    with pytest.raises(LaunchConfigError, match="has no NCCL"):
        resolve_placement("nccl", 2)


def test_a_refused_placement_starts_no_rank(machine, capsys):
    machine(1)
    with pytest.raises(LaunchConfigError):
        launch(rank_devices, world_size=2, backend="nccl")
    assert "launch:" not in capsys.readouterr().out


# ------------------------------------------------------- the device a rank is told
def rank_devices() -> tuple[str | None, str, str]:
    """(PARLAUNCH_DEVICE, rank_device(), the device of a tensor made there)."""
    device = rank_device()
    return (
        os.environ.get(DEVICE_ENV),
        str(device),
        str(torch.ones(1, device=device).device),
    )


def test_each_rank_is_told_its_device(capsys):
    results = launch(rank_devices, world_size=2, backend="gloo")
    assert results == [("cpu", "cpu", "cpu")] * 2
    assert (
        "launch: 2 ranks on gloo (CPU processes): requested" in capsys.readouterr().out
    )


def test_rank_device_follows_what_the_launcher_chose(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert rank_device() == torch.device("cpu")  # outside any rank
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    assert rank_device() == torch.device("cuda", 1)  # a rank sharing GPU 1


def _fn_under_torchrun() -> tuple[str | None, str]:
    return os.environ.get(DEVICE_ENV), str(rank_device())


def test_under_torchrun_the_rule_is_applied_by_local_rank(machine, monkeypatch, capsys):
    """4 local ranks, 2 GPUs: LOCAL_RANK 3 computes on cuda:1, over gloo. Run in
    this process as a world of one (the device choice is all that is checked);
    CUDA itself is mocked, so ``use_device`` only records its argument."""
    machine(2)
    used = []
    monkeypatch.setattr(_procs, "use_device", used.append)
    init = dist.init_process_group

    def init_alone(backend, **kw):
        assert backend == "gloo"
        init(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)

    monkeypatch.setattr(dist, "init_process_group", init_alone)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3"}
    env.update(LOCAL_WORLD_SIZE="4", MASTER_ADDR="127.0.0.1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    try:
        results = launch(_fn_under_torchrun, world_size=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert results == [("cuda:1", "cuda:1")]
    assert used == [torch.device("cuda", 1)]
    assert DEVICE_ENV not in os.environ  # gone with the group launch made
    out = capsys.readouterr().out
    assert "launch: joined torchrun's 1 ranks on gloo; per machine, 4 ranks: " in out
    assert "gloo (sharing 2 CUDA GPUs): 2 CUDA GPUs < 4 ranks" in out


# ------------------------------------------------------------ point to point
def check_cuda_p2p_refuses(backend, n) -> str | None:
    try:
        check_cuda_p2p(backend, n, "torch.distributed.pipelining")
    except LaunchConfigError as err:
        return str(err)
    return None


def test_torch_p2p_on_shared_gpus_is_refused_before_the_start(machine, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    machine(1)
    message = check_cuda_p2p_refuses("auto", 2)
    assert message is not None
    assert message.startswith(
        "torch.distributed.pipelining sends CUDA tensors point to point, which gloo "
        "cannot do"
    )
    assert "backend='gloo' (CPU processes)" in message
    assert check_cuda_p2p_refuses("gloo-cuda", 1) is not None
    assert check_cuda_p2p_refuses("gloo", 2) is None  # CPU tensors: fine
    machine(2)
    assert check_cuda_p2p_refuses("auto", 2) is None  # NCCL sends CUDA tensors
    machine(0)
    assert check_cuda_p2p_refuses("auto", 4) is None


def staged_exchange() -> dict:
    """Rank 0 sends a non-contiguous tensor to rank 1, which receives into a
    non-contiguous one: both take the staging path (a contiguous copy, a buffer
    copied back on wait) that CUDA tensors take under gloo."""
    rank = dist.get_rank()
    out = {"p2p cuda": str(p2p_device("cuda:0")), "p2p cpu": str(p2p_device("cpu"))}
    if rank == 0:
        src = torch.arange(12.0).reshape(3, 4).t()  # 4 x 3, not contiguous
        work = isend(src, 1, tag=7)
        src.fill_(-1.0)  # the copy was made before isend returned
        work.wait()
    else:
        dest = torch.zeros(4, 6)[:, ::2]  # 4 x 3, not contiguous
        work = irecv(dest, 0, tag=7)
        out["staged"] = type(work).__name__
        work.wait()
        out["completed"] = work.is_completed()
        out["received"] = dest.tolist()
    return out


def test_point_to_point_staging_delivers_the_message():
    r0, r1 = launch(staged_exchange, world_size=2, backend="gloo")
    assert r0["p2p cuda"] == r1["p2p cuda"] == "cpu"  # gloo: CUDA goes via the host
    assert r0["p2p cpu"] == "cpu"
    assert r1["staged"] == "_CopyBack" and r1["completed"] is True
    assert r1["received"] == torch.arange(12.0).reshape(3, 4).t().tolist()


def test_placement_is_plain_data():
    p = Placement("gloo", "cuda", 1, 4, "why")
    assert p == Placement("gloo", "cuda", 1, 4, "why")
    with pytest.raises(AttributeError):
        p.gpus = 2  # frozen: a decision, not a state


# ------------------------------------------------------------------------ GPU
def own_allocations(mib_per_rank: int) -> tuple[str, int, int]:
    """Rank r allocates (r + 1) x ``mib_per_rank`` MiB on its device while every
    rank holds its own: (device, what its allocator counts, the device's use)."""
    device = rank_device()
    before = torch.cuda.memory_allocated(device)
    size = (dist.get_rank() + 1) * mib_per_rank * MiB
    block = torch.empty(size, dtype=torch.uint8, device=device)
    dist.barrier()  # every rank holds its block now
    mine = torch.cuda.memory_allocated(device) - before
    free, total = torch.cuda.mem_get_info(device)
    dist.barrier()
    del block
    return str(device), mine, total - free


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_ranks_sharing_a_gpu_each_count_only_their_own_memory(capsys):
    results = launch(own_allocations, 64, world_size=2, backend="gloo-cuda")
    assert [d for d, _, _ in results] == ["cuda:0", f"cuda:{1 % GPUS}"]
    assert [mine for _, mine, _ in results] == [64 * MiB, 128 * MiB]
    if GPUS == 1:  # the device sees both blocks (and two CUDA contexts)
        assert min(used for _, _, used in results) > 192 * MiB
    assert "launch: 2 ranks on gloo (" in capsys.readouterr().out


def cuda_collectives() -> dict:
    """The collectives the labs use, on CUDA tensors over gloo, and the staged
    point-to-point messages: each result checked against its arithmetic."""
    rank, n, device = dist.get_rank(), dist.get_world_size(), rank_device()
    ones = torch.ones(4, device=device)
    got = {}
    t = ones * (rank + 1)
    dist.all_reduce(t)
    got["all_reduce"] = t.tolist() == [n * (n + 1) / 2] * 4
    t = ones * rank
    dist.broadcast(t, src=n - 1)
    got["broadcast"] = t.tolist() == [n - 1.0] * 4
    parts = [torch.empty(4, device=device) for _ in range(n)]
    dist.all_gather(parts, ones * rank)
    got["all_gather"] = [p[0].item() for p in parts] == list(map(float, range(n)))
    flat = torch.empty(4 * n, device=device)
    gather_single = getattr(dist, "all_gather_single", None)
    (gather_single or dist.all_gather_into_tensor)(flat, ones * rank)
    got["all_gather_single"] = flat.view(n, 4)[:, 0].tolist() == list(
        map(float, range(n))
    )
    shard = torch.empty(4, device=device)
    scatter_single = getattr(dist, "reduce_scatter_single", None)
    (scatter_single or dist.reduce_scatter_tensor)(
        shard, torch.arange(4.0 * n, device=device)
    )
    got["reduce_scatter_single"] = shard.tolist() == [
        n * float(4 * rank + i) for i in range(4)
    ]
    out = torch.empty(n, device=device)
    dist.all_to_all_single(out, torch.full((n,), float(rank), device=device))
    got["all_to_all_single"] = out.tolist() == list(map(float, range(n)))
    right, left = (rank + 1) % n, (rank - 1) % n
    inbox = torch.empty(4, device=device)
    works = [isend(ones * rank, right, tag=1), irecv(inbox, left, tag=1)]
    for work in works:
        work.wait()
    got["isend/irecv"] = inbox.tolist() == [float(left)] * 4 and inbox.is_cuda
    return got


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [2, 4])
def test_collectives_on_cuda_tensors_over_gloo(n):
    for got in launch(cuda_collectives, world_size=n, backend="gloo-cuda"):
        assert all(got.values()), got


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_a_lab_on_a_shared_gpu_matches_the_cpu_run(capsys):
    from labs import data_parallel

    cfg = replace(data_parallel.TINY, world_size=2, impl="bucketed")
    gpu = data_parallel.run(replace(cfg, backend="gloo-cuda"))
    cpu = data_parallel.run(replace(cfg, backend="gloo"))
    assert re.search(
        r"launch: 2 ranks on gloo \((sharing|CUDA)", capsys.readouterr().out
    )
    for r in gpu:
        assert r.backend == "gloo" and r.device.startswith("cuda")
        peak = max(e["allocator"]["peak"] for e in r.memory)
        assert peak > 0  # real CUDA memory, from this rank's allocator
    torch.testing.assert_close(
        [r.losses for r in gpu], [r.losses for r in cpu], rtol=1e-4, atol=1e-5
    )
