"""Shared catalogues: accelerators, links and model shapes, each with its source.

Introduced in chapter 0 ("Why one device is not enough"), where the "does it fit"
calculator reads the accelerators; chapter 1 draws the data-parallel memory limit of
the model presets; later chapters' explorers and ``utils.planner`` use both. These
are published specifications, not measurements: every entry names where it comes
from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 10**9
"""Vendors and the ZeRO paper count memory capacity in GB = 10^9 bytes."""


@dataclass(frozen=True)
class Accelerator:
    """One accelerator's memory as its vendor specifies it (not measured here)."""

    name: str
    memory_gb: float
    """Device memory as printed on the vendor's spec sheet, in GB."""
    source: str
    """The vendor page that states it."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GB)


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("T4", 16, "https://www.nvidia.com/en-us/data-center/tesla-t4/"),
    Accelerator("TPU v5e", 16, "https://cloud.google.com/tpu/docs/v5e"),
    Accelerator(
        "RTX 4090",
        24,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/",
    ),
    Accelerator("A100 40GB", 40, "https://www.nvidia.com/en-us/data-center/a100/"),
    Accelerator("A100 80GB", 80, "https://www.nvidia.com/en-us/data-center/a100/"),
    Accelerator("H100 SXM", 80, "https://www.nvidia.com/en-us/data-center/h100/"),
    Accelerator("H200", 141, "https://www.nvidia.com/en-us/data-center/h200/"),
    Accelerator(
        "MI300X",
        192,
        "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
    ),
)
"""Vendor specifications of device memory (spec sheets, not measurements). What a
program can allocate is somewhat less: the driver, the runtime's context and the
allocator's fragmentation take their share."""


MODELS = {
    "GPT-2 XL (1.5B)": {"params": 1.56e9, "layers": 48, "hidden": 1600, "heads": 25},
    "LLaMA-2 7B": {"params": 6.74e9, "layers": 32, "hidden": 4096, "heads": 32},
    "LLaMA-2 13B": {"params": 13.0e9, "layers": 40, "hidden": 5120, "heads": 40},
}
"""Shapes from the papers (Radford et al. 2019; Touvron et al. 2023)."""


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical GPUs, as the planner models them (vendor specifications,
    not measurements). Bandwidths are per GPU and per direction, what one rank of a
    ring can send."""

    name: str
    nodes: int
    gpus_per_node: int
    memory_gb: float
    """Device memory per GPU (spec sheet, GB = 10^9 bytes)."""
    peak_tflops: float
    """Dense 16-bit tensor-core peak per GPU (spec sheet)."""
    intra_node_gbps: float
    """GB/s per GPU per direction inside a node (NVLink)."""
    inter_node_gbps: float
    """GB/s per GPU per direction between nodes (one NIC per GPU)."""
    host_gbps: float
    """GB/s per GPU per direction to host memory (PCIe)."""
    source: str
    mfu: float = 0.5
    """Fraction of peak that compute reaches: Narayanan et al. 2021 (Table 1)
    report 44% to 52% of A100 peak for GPT models from 1.7B to 1T parameters."""

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GB)

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def intra_node_bytes_per_s(self) -> float:
        return self.intra_node_gbps * GB

    @property
    def inter_node_bytes_per_s(self) -> float:
        return self.inter_node_gbps * GB

    @property
    def host_bytes_per_s(self) -> float:
        return self.host_gbps * GB

    def with_nodes(self, nodes: int) -> Cluster:
        """The same nodes, ``nodes`` of them."""
        return replace(self, nodes=nodes, name=f"{self.name.split(' x ')[0]} x {nodes}")


_DGX_A100 = (
    "NVIDIA A100 datasheet (312 TFLOPS BF16 dense, 80 GB, NVLink 600 GB/s total, "
    "PCIe Gen4 64 GB/s total) https://www.nvidia.com/en-us/data-center/a100/; "
    "DGX A100: 8 x 200 Gb/s HDR InfiniBand, one per GPU "
    "https://www.nvidia.com/en-us/data-center/dgx-a100/"
)
_DGX_H100 = (
    "NVIDIA H100 SXM datasheet (989 TFLOPS BF16 dense, 80 GB, NVLink 900 GB/s "
    "total, PCIe Gen5 128 GB/s total) https://www.nvidia.com/en-us/data-center/h100/;"
    " DGX H100: 8 x 400 Gb/s ConnectX-7, one per GPU "
    "https://www.nvidia.com/en-us/data-center/dgx-h100/"
)
CLUSTERS: dict[str, Cluster] = {
    c.name: c
    for c in (
        Cluster("DGX A100 x 1", 1, 8, 80, 312, 300, 25, 32, _DGX_A100),
        Cluster("DGX A100 x 16", 16, 8, 80, 312, 300, 25, 32, _DGX_A100),
        Cluster("DGX A100 x 128", 128, 8, 80, 312, 300, 25, 32, _DGX_A100),
        Cluster("DGX H100 x 1", 1, 8, 80, 989, 450, 50, 64, _DGX_H100),
        Cluster("DGX H100 x 64", 64, 8, 80, 989, 450, 50, 64, _DGX_H100),
    )
}
"""Clusters the planner's examples use. Per-direction bandwidths are half the
datasheets' bidirectional totals; 200 Gb/s = 25 GB/s, 400 Gb/s = 50 GB/s."""
