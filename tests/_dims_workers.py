"""Rank functions for tests/test_dims.py (importable: the launched ranks find them)."""

import time

import torch
import torch.distributed as dist

from utils.dims import AXES, ParallelDims


def check_groups(dims: ParallelDims) -> dict:
    """Build the layout in this rank and report what its groups hold.

    Returns, per axis, the group's size, its member ranks as torch sees them, this
    rank's rank inside it, the tp/dp all-reduce sums of the global rank, and the
    DeviceMesh's view (member ranks and local rank per dim), so the test can
    compare everything against the pure ``ParallelDims.ranks``.
    """
    pm = dims.build()
    out = {"rank": pm.rank, "coords": pm.coords, "world_size": pm.world_size}
    out["groups"] = {
        axis: {
            "size": pm.group(axis).size(),
            "ranks": dist.get_process_group_ranks(pm.group(axis)),
            "group_rank": dist.get_rank(pm.group(axis)),
            "local_rank": pm.local_rank(axis),
        }
        for axis in AXES
    }
    sums = {}
    for axis in AXES:
        x = torch.tensor([float(pm.rank)])
        dist.all_reduce(x, group=pm.group(axis))
        sums[axis] = x.item()
    out["sums"] = sums
    mesh = pm.mesh
    out["mesh_dim_names"] = mesh.mesh_dim_names
    out["mesh"] = {
        axis: {
            "ranks": dist.get_process_group_ranks(pm.submesh(axis).get_group()),
            "flat_ranks": pm.submesh(axis).mesh.tolist(),
            "local_rank": pm.submesh(axis).get_local_rank(),
            "root_local_rank": mesh.get_local_rank(axis) if axis != "dp_cp" else None,
        }
        for axis in AXES
    }
    out["mesh_coordinate"] = list(mesh.get_coordinate())
    # A collective over the mesh's tp group agrees with ours.
    y = torch.tensor([float(pm.rank)])
    dist.all_reduce(y, group=mesh["tp"].get_group())
    out["mesh_tp_sum"] = y.item()
    return out


def build_errors(dims: ParallelDims) -> tuple[str, str]:
    """The messages of building ``dims`` in a world of another size, and of asking
    for ``.mesh`` after ``build(mesh=False)`` (on a layout that fits this world)."""
    try:
        dims.build()
    except ValueError as e:
        wrong_world = str(e)
    else:
        raise AssertionError("build() accepted a world of another size")
    pm = ParallelDims.infer(dist.get_world_size()).build(mesh=False)
    try:
        pm.submesh("tp")
    except RuntimeError as e:
        no_mesh = str(e)
    else:
        raise AssertionError("mesh=False still gave a mesh")
    return wrong_world, no_mesh


def _count_groups() -> int:
    return dist.distributed_c10d._world.group_count


def time_build(dims: ParallelDims, repeats: int = 3) -> dict:
    """Seconds to create our groups and, separately, the DeviceMesh, in this rank.

    Each phase starts after a barrier so that ranks start together; the times are
    the median of ``repeats`` builds (groups accumulate: torch never frees them).
    """
    from torch.distributed.device_mesh import init_device_mesh

    from utils.dims import MESH_DIM_NAMES

    groups_s, mesh_s, flat_s = [], [], []
    for _ in range(repeats):
        dist.barrier()
        n0 = _count_groups()
        t0 = time.perf_counter()
        dims.build(mesh=False)
        groups_s.append(time.perf_counter() - t0)
        n_ours = _count_groups() - n0
        dist.barrier()
        n0 = _count_groups()
        t0 = time.perf_counter()
        mesh = init_device_mesh("cpu", dims.mesh_shape, mesh_dim_names=MESH_DIM_NAMES)
        mesh_s.append(time.perf_counter() - t0)
        n_mesh = _count_groups() - n0
        t0 = time.perf_counter()
        mesh["dp", "cp"]._flatten("dp_cp")
        flat_s.append(time.perf_counter() - t0)
        n_flat = _count_groups() - n0 - n_mesh
        dist.barrier()
    return {
        "groups_s": sorted(groups_s)[repeats // 2],
        "mesh_s": sorted(mesh_s)[repeats // 2],
        "flatten_s": sorted(flat_s)[repeats // 2],
        "new_groups_ours": n_ours,
        "new_groups_mesh": n_mesh,
        "new_groups_flatten": n_flat,
    }
