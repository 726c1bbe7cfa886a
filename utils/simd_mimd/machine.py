"""What this CPU's vector units are, as far as the operating system says, and the
peak they give: chapter 6, "SIMD and MIMD", section "SIMD on a CPU".

Nothing here is measured: the figures are read from the kernel (Linux's
``/proc/cpuinfo`` and ``/sys/devices/system/cpu``) and from torch
(``torch.backends.cpu.get_cpu_capability()``, the instruction set its CPU kernels
were dispatched to), and the peak is *modelled* from them::

    peak FLOP/s = cores x lanes x 2 (a fused multiply-add is two operations)
                  x FMA pipes per core x clock

counting physical cores (SMT siblings share one core's vector units). An operation
that is not a multiply-add, such as a sum's additions, does one operation per lane
per instruction, so its peak is half this (``figures.simd_table``).

Each input says where it came from, and one that cannot be read is ``None``
("unknown"), never guessed. The FMA pipes per core are not in ``/proc/cpuinfo`` on
any architecture: the model assumes one, and says so. bf16 has no lanes of its own
here: torch's CPU kernels widen bf16 to fp32, compute, and round back
(``binary_op_as_fp32`` in ``ATen/cpu/vec/vec512/vec512_bfloat16.h`` and its
``vec256`` twin, shipped with torch's headers), so a bf16 operation runs on fp32 lanes.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CAPABILITY_BITS = {"AVX512": 512, "AVX2": 256, "SVE256": 256, "VSX": 128,
                   "Z VECTOR": 128}  # fmt: skip
"""Vector width of the kernels torch dispatches to, per capability string (the
values ``torch.backends.cpu.get_cpu_capability`` documents)."""

BASELINE_BITS = 128
""""DEFAULT" (and "NO AVX") is the build's baseline: on aarch64 torch's NEON
``Vectorized`` of 16 bytes (``VECTOR_WIDTH 16`` in ``ATen/cpu/vec/vec_base.h``), on
x86-64 generic C++ loops compiled for the x86-64 baseline, whose widest registers
are SSE2's 128 bits. Either way at most 128 bits, and no wider than the CPU's."""

X86_FLAGS = (("avx512f", 512), ("avx2", 256), ("avx", 256), ("sse2", 128))
"""x86 feature flags in ``/proc/cpuinfo``, widest first: AVX-512 (32 zmm registers of
512 bits), AVX/AVX2 (16 ymm of 256), SSE2 (16 xmm of 128) in 64-bit mode; Intel 64
and IA-32 Architectures Software Developer's Manual, vol. 1, the chapters on SSE2,
AVX/AVX2 and AVX-512."""

COMPUTE_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 4}
"""Bytes per lane each dtype computes in on the CPU: bf16 is widened to fp32."""


@dataclass(frozen=True)
class CpuInfo:
    """This machine's CPU, as read; None where it could not be read."""

    model: str | None
    """The processor's name (``model name`` in /proc/cpuinfo)."""
    cores: int
    """Logical CPUs this process may run on (``os.sched_getaffinity``, else
    cpu_count): with SMT (hyper-threading), two of them may share one core."""
    capability: str
    """``torch.backends.cpu.get_cpu_capability()``: what torch's kernels use."""
    hardware_bits: int | None
    """The widest vector registers the CPU's feature flags advertise."""
    hardware_source: str
    """Which flag (or file) ``hardware_bits`` comes from."""
    clock_mhz: float | None
    """Clock used for the peak, in MHz."""
    clock_source: str
    """Where ``clock_mhz`` comes from (the cpufreq maximum, else /proc/cpuinfo's
    current ``cpu MHz``, which on a virtual machine is the host's nominal clock)."""
    physical_cores: int | None = None
    """Distinct physical cores among ``cores`` (their (package, core id) pairs in
    /sys/devices/system/cpu/cpu*/topology); None where that cannot be read. SMT
    siblings share one core's vector units, so the peak counts these."""

    @property
    def vector_bits(self) -> int | None:
        """The width the peak uses: torch's dispatched kernels' where the capability
        names one; the baseline's (:data:`BASELINE_BITS`, capped by the hardware's)
        for "DEFAULT"; else the hardware's."""
        if self.capability in CAPABILITY_BITS:
            return CAPABILITY_BITS[self.capability]
        if self.capability in ("DEFAULT", "NO AVX"):
            if self.hardware_bits is None:
                return None
            return min(BASELINE_BITS, self.hardware_bits)
        return self.hardware_bits

    @property
    def peak_cores(self) -> int:
        """The cores the all-core peak counts: physical ones where known."""
        return self.physical_cores or self.cores

    def lanes(self, dtype: torch.dtype) -> int | None:
        """Elements one vector register holds while ``dtype`` is computed."""
        if self.vector_bits is None:
            return None
        return self.vector_bits // (8 * COMPUTE_BYTES[dtype])

    def peak_flops(
        self, dtype: torch.dtype, cores: int | None = None, fma_pipes: int = 1
    ) -> float | None:
        """Modelled peak: cores x lanes x 2 x fma_pipes x clock (None if unknown);
        ``cores`` defaults to :attr:`peak_cores`."""
        lanes = self.lanes(dtype)
        if lanes is None or self.clock_mhz is None:
            return None
        cores = self.peak_cores if cores is None else cores
        return cores * lanes * 2 * fma_pipes * self.clock_mhz * 1e6

    def as_dict(self) -> dict:
        return {**asdict(self), "vector_bits": self.vector_bits}


def _cpuinfo(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def hardware_vector_bits(fields: dict[str, str], sve_file: str | None = None):
    """``(bits, source)`` from /proc/cpuinfo's feature flags (x86 ``flags``, Arm
    ``Features``); ``(None, why)`` when they name no vector unit we know."""
    flags = set(fields.get("flags", "").split())
    for flag, bits in X86_FLAGS:
        if flag in flags:
            return bits, f"/proc/cpuinfo flag {flag}"
    features = set(fields.get("Features", "").split())
    if "sve" in features and sve_file is not None:
        # The default SVE vector length, in bytes (Linux, Documentation/arch/arm64/sve)
        return 8 * int(sve_file.strip()), "/proc/sys/abi/sve_default_vector_length"
    if "asimd" in features:  # NEON (Advanced SIMD): 32 registers of 128 bits
        return 128, "/proc/cpuinfo feature asimd (NEON)"
    return None, "no vector flag in /proc/cpuinfo"


def clock_mhz(fields: dict[str, str], cpufreq_max_khz: str | None = None):
    """``(MHz, source)``: the cpufreq maximum if the kernel exposes it, else the
    ``cpu MHz`` line, else ``(None, "unknown")``."""
    if cpufreq_max_khz:
        return int(cpufreq_max_khz.strip()) / 1000, "cpufreq cpuinfo_max_freq"
    if "cpu MHz" in fields:
        return float(fields["cpu MHz"]), "/proc/cpuinfo cpu MHz (current clock)"
    return None, "unknown (no cpufreq, no cpu MHz line)"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def physical_cores(cpus, read=_read) -> int | None:
    """Distinct (package, core id) pairs among the logical ``cpus``, from Linux's
    /sys/devices/system/cpu/cpuN/topology; None if any cannot be read."""
    pairs = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        package, core = read(base + "physical_package_id"), read(base + "core_id")
        if package is None or core is None:
            return None
        pairs.add((package.strip(), core.strip()))
    return len(pairs) or None


def cpu_info() -> CpuInfo:
    """Read this machine's CPU (Linux files; elsewhere most fields are unknown)."""
    fields = _cpuinfo(_read("/proc/cpuinfo") or "")
    bits, bits_source = hardware_vector_bits(
        fields, _read("/proc/sys/abi/sve_default_vector_length")
    )
    mhz, mhz_source = clock_mhz(
        fields, _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    )
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or None,
        cores=len(cpus),
        capability=torch.backends.cpu.get_cpu_capability(),
        hardware_bits=bits,
        hardware_source=bits_source,
        clock_mhz=mhz,
        clock_source=mhz_source,
        physical_cores=physical_cores(cpus),
    )
