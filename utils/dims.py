"""``ParallelDims``: the course's one description of how ranks are laid out.

A job of ``world_size`` ranks is cut along up to four axes at once: data parallel
(``dp``), tensor parallel (``tp``), pipeline parallel (``pp``) and, with room for it
later, context parallel (``cp``). ``ParallelDims`` holds the four degrees, checks that
they multiply to the world size, and answers, without any process group, which rank
sits where and which ranks talk to each other along each axis. Inside a rank,
``ParallelDims.build()`` creates those groups and returns a ``ParallelMesh`` that is
passed explicitly to whatever needs it (there is no global).

Rank order (Megatron-LM's default ``tp-cp-dp-pp``): tp varies fastest, then cp, then
dp, then pp::

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Worked example, 8 ranks, ``dp=2, tp=2, pp=2`` (cp=1)::

              dp=0    dp=1
    pp=0     [0  1]  [2  3]        each [..] pair is a tp group
    pp=1     [4  5]  [6  7]

    ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]   neighbours
    ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]   same tp shard, same stage
    ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]   the two stages of one replica

Why this order: tensor parallelism all-reduces activations in every layer, so its
ranks should be adjacent (the GPUs of one node, joined by NVLink); context
parallelism is nearly as chatty; data parallelism communicates once per step;
pipeline parallelism only sends activations point to point between stages, so it
can span the slowest links. Megatron-LM's 16-GPU example (tp=2, pp=4, dp=2) gives tp
groups [0, 1], [2, 3], ..., pp groups [0, 4, 8, 12], [1, 5, 9, 13], ... and dp groups
[0, 2], [1, 3], [4, 6], ... (``tests/test_dims.py`` checks exactly that).

The same order is what ``init_device_mesh(device_type, (pp, dp, cp, tp),
mesh_dim_names=("pp", "dp", "cp", "tp"))`` produces: the mesh is a row-major array of
ranks ``0 .. world_size-1``, so its last dimension (tp) varies fastest.
``ParallelMesh.mesh`` is that ``DeviceMesh``, for torch's own DTensor, FSDP2 and
tensor-parallel APIs; its groups are checked to equal ours in the tests.

Sources:
    torchtitan ``torchtitan/distributed/parallel_dims.py`` (``ParallelDims``: degrees
    validated against the world size, a mesh built in the order
    ``["pp", "dp_replicate", "dp_shard", "cp", "tp"]``, ``dp_shard`` and ``cp``
    flattened into ``dp_shard_cp``).
    Megatron-LM ``megatron/core/parallel_state.py`` (``initialize_model_parallel``
    docstring example, ``RankGenerator`` with the default order ``tp-cp-ep-dp-pp``).
    torch ``torch/distributed/device_mesh.py`` (``init_device_mesh``,
    ``DeviceMesh._flatten``, ``get_group``, ``get_local_rank``) and
    ``torch/distributed/distributed_c10d.py`` (``new_group``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch.distributed as dist

from utils.launch import rank_device

# The four degrees, and the axes one can ask about ("dp_cp" is dp and cp flattened:
# the ranks that see different data, over which gradients are averaged once cp > 1).
DEGREES = ("dp", "tp", "pp", "cp")
AXES = ("dp", "tp", "pp", "cp", "dp_cp")
# Slowest to fastest: the DeviceMesh's dimension order.
MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")


def _check_positive_int(name: str, value) -> int:
    # bool is an int subclass: True would silently mean a degree of 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_axis(axis) -> str:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return axis


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of parallelism of a job of ``world_size`` ranks, in tp-cp-dp-pp order.

    ``ParallelDims(dp=2, tp=2, pp=1, world_size=4)``; ``cp`` defaults to 1 (room for
    context parallelism). Every degree is a positive int (bools refused) and
    ``dp * cp * tp * pp == world_size``, else ``ValueError``. All fields are keyword
    only, so a tp cannot be mistaken for a pp. ``ParallelDims.infer(world_size, tp=2)``
    derives dp. See the module docstring for the rank order.
    """

    dp: int
    tp: int
    pp: int
    cp: int = 1
    world_size: int

    def __post_init__(self):
        for name in (*DEGREES, "world_size"):
            # Frozen: normalise (e.g. a numpy integer) through object.__setattr__.
            value = _check_positive_int(name, getattr(self, name))
            object.__setattr__(self, name, value)
        product = self.dp * self.cp * self.tp * self.pp
        if product != self.world_size:
            cp = f" x cp={self.cp}" if self.cp != 1 else ""
            raise ValueError(
                f"dp={self.dp}{cp} x tp={self.tp} x pp={self.pp} = {product} "
                f"!= world_size={self.world_size}: the degrees must multiply to "
                "the world size"
            )

    @classmethod
    def infer(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1):
        """The layout with these tp, pp, cp and ``dp = world_size / (tp*cp*pp)``."""
        world_size = _check_positive_int("world_size", world_size)
        tp = _check_positive_int("tp", tp)
        pp = _check_positive_int("pp", pp)
        cp = _check_positive_int("cp", cp)
        model = tp * cp * pp
        if world_size % model:
            raise ValueError(
                f"world_size={world_size} is not divisible by tp={tp} x cp={cp} x "
                f"pp={pp} = {model}: dp = world_size / (tp*cp*pp) must be a "
                f"whole number (world_size must be a multiple of {model})"
            )
        return cls(dp=world_size // model, tp=tp, pp=pp, cp=cp, world_size=world_size)

    # ---- pure questions: no process group needed ---------------------------------

    def degree(self, axis: str) -> int:
        """How many ranks one group of ``axis`` holds ("dp_cp": dp * cp)."""
        _check_axis(axis)
        return self.dp * self.cp if axis == "dp_cp" else getattr(self, axis)

    def enabled(self, axis: str) -> bool:
        """True when ``axis`` really splits work (its degree is above 1)."""
        return self.degree(axis) > 1

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """``(pp, dp, cp, tp)``: the DeviceMesh shape, slowest axis first."""
        return (self.pp, self.dp, self.cp, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """``{"dp": .., "tp": .., "pp": .., "cp": ..}``: where ``rank`` sits."""
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(
                f"rank must be an int in [0, {self.world_size}), got {rank!r}"
            )
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank must be an int in [0, {self.world_size}), got {rank!r}"
            )
        rest, tp = divmod(int(rank), self.tp)
        rest, cp = divmod(rest, self.cp)
        pp, dp = divmod(rest, self.dp)
        return {"dp": dp, "tp": tp, "pp": pp, "cp": cp}

    def rank_of(self, **coords: int) -> int:
        """The global rank at these coordinates; a coordinate left out counts as 0.

        ``rank_of(**dims.coords(r)) == r``. Each coordinate must lie in
        ``[0, degree)``.
        """
        unknown = sorted(set(coords) - set(DEGREES))
        if unknown:
            raise ValueError(f"unknown coordinate(s) {unknown}: the axes are {DEGREES}")
        c = {}
        for axis in DEGREES:
            value = coords.get(axis, 0)
            size = getattr(self, axis)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or not 0 <= value < size
            ):
                raise ValueError(
                    f"{axis} coordinate must be an int in [0, {size}) since "
                    f"{axis}={size}, got {value!r}"
                )
            c[axis] = int(value)
        return c["tp"] + self.tp * (c["cp"] + self.cp * (c["dp"] + self.dp * c["pp"]))

    def ranks(self, axis: str) -> list[list[int]]:
        """Every group of ``axis``, as lists of global ranks.

        Each inner list is ordered by the coordinate along ``axis`` (position i holds
        the rank whose ``axis`` coordinate is i; for "dp_cp" the index is
        ``dp * cp_size + cp``, cp fastest as in the rank order); the groups are
        ordered by their smallest rank. The groups partition ``range(world_size)``.
        """
        _check_axis(axis)
        along = ("dp", "cp") if axis == "dp_cp" else (axis,)
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = tuple(c[a] for a in DEGREES if a not in along)
            # With the other coordinates fixed, the rank grows with the coordinate
            # along the axis, so appending in rank order sorts each group by it.
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def group_of(self, axis: str, rank: int) -> list[int]:
        """The one group of ``axis`` that holds ``rank``."""
        for group in self.ranks(axis):
            if rank in group:
                return group
        raise ValueError(f"rank must be in [0, {self.world_size}), got {rank!r}")

    def __str__(self) -> str:
        cp = f" cp={self.cp}" if self.cp != 1 else ""
        return (
            f"dp={self.dp} tp={self.tp} pp={self.pp}{cp} (world_size={self.world_size})"
        )

    # ---- inside a rank -------------------------------------------------------------

    def build(
        self, device_type: str | None = None, *, mesh: bool = True
    ) -> ParallelMesh:
        """This rank's groups, created collectively: every rank must call it.

        Needs the default process group (``utils.launch.launch`` or torchrun set it
        up) with ``dist.get_world_size() == world_size``. Creates, with
        ``dist.new_group``, every group of every axis in ``AXES`` and, if ``mesh``,
        the ``DeviceMesh`` (``init_device_mesh(device_type, (pp, dp, cp, tp),
        mesh_dim_names=("pp", "dp", "cp", "tp"))``, plus ``dp_cp`` flattened).
        ``device_type`` defaults to this rank's device type (``rank_device()``): "cuda"
        under NCCL and for ranks sharing GPUs through gloo, "cpu" otherwise.
        ``mesh=False`` skips the DeviceMesh (its groups are a second copy of ours).

        Cost on gloo CPU ranks (2 shared cores, median of 3 builds, slowest rank):
        dp=2 tp=2 (4 ranks) about 25 ms for our groups + 30 ms for the mesh + 14 ms
        for the flattened dp_cp; dp=2 tp=2 pp=2 (8 ranks) about 37 + 45 + 21 ms. So
        the mesh is always built unless asked not to.
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelDims.build() needs the default process group: run inside "
                "utils.launch.launch(...) or torchrun"
            )
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"the process group has {dist.get_world_size()} ranks but these "
                f"dims describe world_size={self.world_size} ({self})"
            )
        if device_type is None:
            device_type = rank_device().type  # cuda also for ranks sharing GPUs
        rank = dist.get_rank()

        # new_group is collective over the *whole* default group, members or not:
        # a group is named by a counter every process increments on each call
        # (distributed_c10d._process_group_name), and its members meet in the store
        # under that name. A rank that skipped a call, or created the groups in
        # another order, would give the next group another name than its peers do
        # and wait for them under it until the timeout. So every rank walks the
        # same axes and the same groups in the same order, and keeps only its own.
        groups: dict[str, dist.ProcessGroup] = {}
        for axis in AXES:
            if axis == "dp_cp" and self.cp == 1:
                groups[axis] = groups["dp"]  # the same ranks: no second group
                continue
            for members in self.ranks(axis):
                group = dist.new_group(ranks=members, group_desc=f"dims_{axis}")
                if rank in members:
                    groups[axis] = group

        device_mesh, submeshes = None, {}
        if mesh:
            from torch.distributed.device_mesh import init_device_mesh

            device_mesh = init_device_mesh(
                device_type, self.mesh_shape, mesh_dim_names=MESH_DIM_NAMES
            )
            # Also collective (new groups for dp x cp, none when they span the
            # world). torch warns when a flattened dim is sliced from the root mesh
            # (device_mesh["dp_cp"]) and asks callers to keep the flattened mesh
            # themselves: submesh("dp_cp") returns this one.
            submeshes = {name: device_mesh[name] for name in MESH_DIM_NAMES}
            submeshes["dp_cp"] = device_mesh["dp", "cp"]._flatten("dp_cp")
        return ParallelMesh(
            dims=self,
            rank=rank,
            coords=self.coords(rank),
            device_type=device_type,
            _groups=groups,
            _mesh=device_mesh,
            _submeshes=submeshes,
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class ParallelMesh:
    """One rank's view of a ``ParallelDims`` layout, from ``ParallelDims.build()``.

    ``group(axis)`` is this rank's ``ProcessGroup`` along ``axis``; ``coords`` its
    coordinates; ``mesh`` torch's ``DeviceMesh`` of the same layout (dims
    ``("pp", "dp", "cp", "tp")``) and ``submesh(axis)`` its 1-D slice along one
    axis, "dp_cp" included. Pass it explicitly to what needs it.
    """

    dims: ParallelDims
    rank: int
    coords: dict[str, int]
    device_type: str
    _groups: dict[str, dist.ProcessGroup] = field(repr=False)
    _mesh: object = field(repr=False, default=None)
    _submeshes: dict = field(repr=False, default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    def group(self, axis: str) -> dist.ProcessGroup:
        """This rank's process group along ``axis`` (one of ``AXES``)."""
        return self._groups[_check_axis(axis)]

    def group_ranks(self, axis: str) -> list[int]:
        """The global ranks of this rank's ``axis`` group, by coordinate."""
        return self.dims.group_of(axis, self.rank)

    def local_rank(self, axis: str) -> int:
        """This rank's position in its ``axis`` group (its coordinate along it)."""
        return self.group_ranks(axis).index(self.rank)

    @property
    def mesh(self):
        """The ``DeviceMesh`` (``torch.distributed.device_mesh``) of this layout."""
        if self._mesh is None:
            raise RuntimeError(
                "this ParallelMesh was built with mesh=False: call "
                "dims.build(mesh=True) on every rank to get the DeviceMesh"
            )
        return self._mesh

    def submesh(self, axis: str):
        """The 1-D ``DeviceMesh`` of this rank's ``axis`` group (``mesh[axis]``).

        For "dp_cp" it is the mesh ``_flatten`` returned when the mesh was built:
        slicing ``mesh["dp_cp"]`` works too but torch warns that it is deprecated.
        """
        _check_axis(axis)
        if not self._submeshes:
            self.mesh  # noqa: B018 (raises the error that explains mesh=False)
        return self._submeshes[axis]
