"""Shared catalogues: accelerators, links and model shapes, each with its source.

Introduced in chapter 0 ("Why one device is not enough"), where the "does it fit"
calculator reads the accelerators; chapter 1 draws the data-parallel memory limit of
the model presets; later chapters' explorers and ``utils.planner`` use both. These
are published specifications, not measurements: every entry names where it comes
from.
"""

from __future__ import annotations

from dataclasses import dataclass

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
