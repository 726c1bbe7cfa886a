"""The failure-injection lab: how long each fault takes to read, and what it reads.

Run with ``python -m bench failures``. For each fault of ``labs.failures`` (the
workshop page ``workshop/failures.md``) on 2 CPU ranks, with the lab's defaults: the
wall seconds from the call to the diagnosis (``utils.failures.capture`` around
``run_and_describe``, launch included), and what ``utils.failures.diagnose``
reads from the output, which should be the fault injected. A hung rank and an op
mismatch end by the lab's collective timeout (``Config.timeout``), so their times
are mostly that timeout.
"""

from __future__ import annotations

from labs.failures import FAULTS, MISMATCHES, Config, run_and_describe
from utils.failures import capture, diagnose


def cases() -> list[tuple[str, Config]]:
    """(label, config): every fault, and each kind of collective mismatch."""
    out = []
    for fault in FAULTS:
        kinds = MISMATCHES if fault == "collective_mismatch" else (None,)
        for kind in kinds:
            cfg = Config(fault=fault, mismatch=kind) if kind else Config(fault=fault)
            out.append((f"{fault} ({kind})" if kind else fault, cfg))
    return out


def main() -> None:
    print("failure lab on 2 CPU ranks, seconds from the call to the diagnosis:")
    for label, cfg in cases():
        printed = capture(run_and_describe, cfg, echo=False)
        found = diagnose(printed)
        verdict = "ok" if found.fault == cfg.fault else f"MISREAD (not {cfg.fault})"
        print(
            f"  {label:<28} {printed.seconds:5.1f} s  -> {found.fault}"
            f" (rank {found.rank}): {verdict}"
        )


if __name__ == "__main__":
    main()
