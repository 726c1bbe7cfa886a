"""utils.dims: validation and rank arithmetic (pure), then real groups on gloo ranks."""

import dataclasses

import numpy as np
import pytest

from tests import _dims_workers
from utils.dims import AXES, DEGREES, ParallelDims
from utils.launch import launch

# (dp, tp, pp, cp), world size = their product.
LAYOUTS = [
    (1, 1, 1, 1),
    (4, 1, 1, 1),
    (1, 4, 1, 1),
    (1, 1, 4, 1),
    (2, 2, 1, 1),
    (2, 2, 2, 1),
    (1, 2, 2, 1),
    (2, 1, 2, 1),
    (2, 2, 4, 1),
    (3, 2, 1, 1),
    (2, 2, 1, 2),
    (1, 2, 2, 2),
    (2, 2, 2, 2),
]


def _dims(dp, tp, pp, cp):
    return ParallelDims(dp=dp, tp=tp, pp=pp, cp=cp, world_size=dp * tp * pp * cp)


# ---- validation -------------------------------------------------------------------


def test_cp_defaults_to_one_and_the_dataclass_is_frozen():
    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=4)
    assert (dims.dp, dims.tp, dims.pp, dims.cp, dims.world_size) == (2, 2, 1, 1, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.dp = 4
    assert str(dims) == "dp=2 tp=2 pp=1 (world_size=4)"
    assert dims == ParallelDims(dp=2, tp=2, pp=1, cp=1, world_size=4)


def test_fields_are_keyword_only():
    with pytest.raises(TypeError):
        ParallelDims(2, 2, 1, 4)


def test_product_mismatch_names_every_degree():
    with pytest.raises(ValueError, match=r"dp=3 x tp=2 x pp=1 = 6 != world_size=4"):
        ParallelDims(dp=3, tp=2, pp=1, world_size=4)
    with pytest.raises(
        ValueError, match=r"dp=2 x cp=2 x tp=2 x pp=1 = 8 != world_size=4"
    ):
        ParallelDims(dp=2, tp=2, pp=1, cp=2, world_size=4)


@pytest.mark.parametrize("name", [*DEGREES, "world_size"])
@pytest.mark.parametrize("bad", [True, False, 0, -2, 2.0, "2", None])
def test_each_degree_must_be_a_positive_int(name, bad):
    kw = dict(dp=1, tp=1, pp=1, cp=1, world_size=1)
    kw[name] = bad
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {bad!r}"):
        ParallelDims(**kw)


def test_numpy_integers_are_accepted_as_plain_ints():
    dims = ParallelDims(dp=np.int64(2), tp=2, pp=1, world_size=np.int32(4))
    assert type(dims.dp) is int and type(dims.world_size) is int


def test_infer_derives_dp():
    assert ParallelDims.infer(8, tp=2) == ParallelDims(dp=4, tp=2, pp=1, world_size=8)
    assert ParallelDims.infer(16, tp=2, pp=4).dp == 2
    assert ParallelDims.infer(8, tp=2, cp=2, pp=2).dp == 1
    assert ParallelDims.infer(1).dp == 1


def test_infer_refuses_what_does_not_divide():
    with pytest.raises(ValueError, match=r"world_size=6 is not divisible by.*= 4"):
        ParallelDims.infer(6, tp=4)
    with pytest.raises(ValueError, match=r"tp=2 x cp=1 x pp=4 = 8"):
        ParallelDims.infer(4, tp=2, pp=4)
    with pytest.raises(ValueError, match="tp must be a positive int, got True"):
        ParallelDims.infer(4, tp=True)
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        ParallelDims.infer(0)


def test_bad_axis_names_list_the_allowed_ones():
    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=4)
    for call in (dims.ranks, dims.enabled, dims.degree):
        with pytest.raises(ValueError, match=r"axis must be one of .*'dp_cp'.*'mp'"):
            call("mp")
    with pytest.raises(ValueError, match=r"unknown coordinate\(s\) \['ep'\].*'tp'"):
        dims.rank_of(ep=0)


def test_bad_ranks_and_coordinates_are_named():
    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=4)
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match=r"rank must be an int in \[0, 4\), got"):
            dims.coords(bad)
    with pytest.raises(ValueError, match=r"tp coordinate must be an int in \[0, 2\)"):
        dims.rank_of(tp=2)
    with pytest.raises(ValueError, match=r"pp coordinate .*\[0, 1\) since pp=1"):
        dims.rank_of(pp=1)


# ---- rank arithmetic ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=lambda t: "dp{}-tp{}-pp{}-cp{}".format(*t)
)
def test_coords_rank_of_and_ranks_agree(layout):
    dp, tp, pp, cp = layout
    dims = _dims(*layout)
    n = dims.world_size
    seen = set()
    for rank in range(n):
        c = dims.coords(rank)
        assert set(c) == set(DEGREES)
        assert rank == c["tp"] + tp * (c["cp"] + cp * (c["dp"] + dp * c["pp"]))
        assert dims.rank_of(**c) == rank
        seen.add(tuple(sorted(c.items())))
    assert len(seen) == n  # every coordinate tuple once
    for axis in AXES:
        groups = dims.ranks(axis)
        size = dims.degree(axis)
        assert len(groups) == n // size and all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(n))  # a partition
        assert [g[0] for g in groups] == sorted(g[0] for g in groups)
        assert dims.enabled(axis) == (size > 1)
        for g in groups:
            cs = [dims.coords(r) for r in g]
            along = ("dp", "cp") if axis == "dp_cp" else (axis,)
            others = [a for a in DEGREES if a not in along]
            # Members differ only along the axis, and are ordered by its coordinate.
            assert all(all(c[a] == cs[0][a] for a in others) for c in cs)
            if axis == "dp_cp":
                assert [c["dp"] * cp + c["cp"] for c in cs] == list(range(size))
            else:
                assert [c[axis] for c in cs] == list(range(size))
                assert dims.group_of(axis, g[-1]) == g


def test_rank_of_defaults_missing_coordinates_to_zero():
    dims = ParallelDims(dp=2, tp=2, pp=2, world_size=8)
    assert dims.rank_of() == 0
    assert dims.rank_of(dp=1) == 2
    assert dims.rank_of(pp=1) == 4
    assert dims.rank_of(pp=1, dp=1, tp=1) == 7


def test_the_docstring_example_8_ranks_dp2_tp2_pp2():
    dims = ParallelDims(dp=2, tp=2, pp=2, world_size=8)
    assert dims.ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.ranks("cp") == [[r] for r in range(8)]
    assert dims.ranks("dp_cp") == dims.ranks("dp")
    assert dims.coords(5) == {"dp": 0, "tp": 1, "pp": 1, "cp": 0}
    assert dims.mesh_shape == (2, 2, 1, 2)


def test_megatron_example_16_ranks_tp2_pp4_dp2():
    # megatron/core/parallel_state.py, initialize_model_parallel's docstring.
    dims = ParallelDims.infer(16, tp=2, pp=4)
    assert dims.dp == 2
    assert dims.ranks("tp") == [[2 * i, 2 * i + 1] for i in range(8)]
    assert dims.ranks("pp") == [
        [0, 4, 8, 12],
        [1, 5, 9, 13],
        [2, 6, 10, 14],
        [3, 7, 11, 15],
    ]
    assert dims.ranks("dp") == [
        [0, 2],
        [1, 3],
        [4, 6],
        [5, 7],
        [8, 10],
        [9, 11],
        [12, 14],
        [13, 15],
    ]


def test_cp_sits_between_tp_and_dp():
    dims = ParallelDims(dp=2, tp=2, pp=1, cp=2, world_size=8)
    assert dims.ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.ranks("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # dp and cp flattened, cp fastest: index dp * cp_size + cp.
    assert dims.ranks("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_ranks_match_a_row_major_pp_dp_cp_tp_array():
    # What init_device_mesh builds: arange(world).reshape(pp, dp, cp, tp).
    for layout in LAYOUTS:
        dims = _dims(*layout)
        grid = np.arange(dims.world_size).reshape(dims.mesh_shape)
        for i, axis in enumerate(("pp", "dp", "cp", "tp")):
            moved = np.moveaxis(grid, i, -1).reshape(-1, grid.shape[i])
            assert sorted(map(list, moved.tolist())) == sorted(dims.ranks(axis))


# ---- in real ranks (gloo) -----------------------------------------------------------


def _check_rank_reports(dims, reports):
    assert [r["rank"] for r in reports] == list(range(dims.world_size))
    for rank, out in enumerate(reports):
        assert out["coords"] == dims.coords(rank)
        assert out["world_size"] == dims.world_size
        assert out["mesh_dim_names"] == ("pp", "dp", "cp", "tp")
        assert out["mesh_coordinate"] == [
            out["coords"][a] for a in ("pp", "dp", "cp", "tp")
        ]
        for axis in AXES:
            group = dims.group_of(axis, rank)
            got = out["groups"][axis]
            assert got["size"] == len(group) == dims.degree(axis)
            assert got["ranks"] == group
            assert got["group_rank"] == got["local_rank"] == group.index(rank)
            # all_reduce of the global rank over the group sums exactly its members.
            assert out["sums"][axis] == sum(group)
            # torch's DeviceMesh agrees with our groups.
            mesh = out["mesh"][axis]
            assert mesh["ranks"] == mesh["flat_ranks"] == group
            assert mesh["local_rank"] == group.index(rank)
            if axis != "dp_cp":
                assert mesh["root_local_rank"] == out["coords"][axis]
        assert out["mesh_tp_sum"] == sum(dims.group_of("tp", rank))


@pytest.mark.parametrize(
    "dims",
    [
        ParallelDims(dp=2, tp=2, pp=1, world_size=4),
        ParallelDims(dp=2, tp=2, pp=2, world_size=8),
    ],
    ids=str,
)
def test_groups_in_real_ranks(dims):
    reports = launch(
        _dims_workers.check_groups, dims, world_size=dims.world_size, backend="gloo"
    )
    _check_rank_reports(dims, reports)


def test_groups_with_cp_in_real_ranks():
    dims = ParallelDims(dp=2, tp=1, pp=1, cp=2, world_size=4)
    reports = launch(_dims_workers.check_groups, dims, world_size=4, backend="gloo")
    _check_rank_reports(dims, reports)


def test_build_refuses_a_world_of_another_size_and_mesh_false_skips_the_mesh():
    dims = ParallelDims(dp=2, tp=1, pp=1, world_size=2)
    reports = launch(_dims_workers.build_errors, dims, world_size=4, backend="gloo")
    for wrong_world, no_mesh in reports:
        assert "process group has 4 ranks" in wrong_world
        assert "world_size=2" in wrong_world
        assert "mesh=False" in no_mesh
