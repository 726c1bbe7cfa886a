"""Reading what a failed (or quietly wrong) run printed: a diagnosis.

Introduced by the workshop page ``workshop/failures.md`` ("Failure-injection lab"),
whose lab ``labs/failures.py`` injects the faults named here; it reads any lab's
output, though, since every lab fails through the same tools::

    from labs.failures import Config, run
    from utils.failures import capture, diagnose

    printed = capture(run, Config(fault="hung_rank", rank=1))  # output, echoed
    print(diagnose(printed))
    # hung_rank (rank 1): rank 1 hung: rank 0 waited 3 s for it in a collective

:func:`capture` runs a function, shows what it prints (the ranks' output reaches
the caller's stdout and stderr through the launcher) and keeps a copy, with the
error it raised, if any, written as the lab's command line writes it
(``error: LaunchError: ...``). :func:`diagnose` takes that text (or a string, or
the exception itself) and returns a :class:`Diagnosis`: which fault, which rank,
the key fact, the numbers it rests on and the line that shows it.
:func:`check_diagnosis` is the workshop's exercise check: a learner's reading of
the output against :func:`diagnose`'s.

What it reads, first match wins (who prints each message, and where):

=====================  =================================================================
diagnosis              the message
=====================  =================================================================
collective_mismatch    "Detected mismatch between collectives on ranks. Rank 0 is
                       running collective: CollectiveFingerPrint(...)": torch's
                       ``ProcessGroupWrapper``, when ``TORCH_DISTRIBUTED_DEBUG=DETAIL``
                       checks collectives (both ranks named, neither blamed)
collective_mismatch    "op.preamble.length <= op.nbytes. 76296 vs 76288. Received data
                       size doesn't match expected size": gloo's ``Pair::prepareRead``
                       (gloo/transport/tcp/pair.cc) when a message is longer than the
                       receive posted for it; it throws on gloo's own thread, so the
                       process aborts, and the launcher says "rank 1 was killed by
                       SIGABRT": the rank whose buffer was the smaller
collective_mismatch    "rank 0, 1 failed waiting for other ranks": the launcher, when
                       every rank timed out in a collective and none hung (different
                       collectives, or a different number of them)
oom                    "Device pool out of memory ... Tried to allocate X (N bytes) ...
                       a budget of Y (M bytes)": the memory ledger's budget
                       (``utils.memory``); "CUDA out of memory. Tried to allocate X":
                       the caching allocator; "this run needs about X ... but the
                       machine has Y available": ``utils.lab.check_memory``, before
                       any rank starts
hung_rank              "rank 1 hung: rank 0 failed waiting for it in a collective
                       (timeout 3 s)" or "rank 1 hung: still running 3 s after the
                       first rank returned": the launcher (``utils._procs.blame``)
diverged               "the loss is nan at step 2": ``utils.lab.check_finite``
loss_scaling / none    "gradient norm / single-process reference: x2.000 at step 0
                       (world_size=2; ...)": ``labs.failures.describe``; x1 is a clean
                       run, x world_size gradients summed rather than averaged
wrong_gradients        the same line with a ratio that is no power of world_size
raised / killed        "rank 1 raised; its traceback:" / "rank 1 was killed by SIGKILL":
                       the launcher, about a failure none of the above explains
unknown                none of these
=====================  =================================================================

Beware what the text cannot tell: a rank that hangs and a rank that never sends
a message its peer waits for (chapter 5's mismatched schedule) read the same to
the launcher ("rank 1 hung"); and with two ranks, which of two mismatched
collectives was the wrong one is not in the text.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

DIAGNOSES = (
    "none",
    "collective_mismatch",
    "hung_rank",
    "oom",
    "loss_scaling",
    "wrong_gradients",
    "diverged",
    "raised",
    "killed",
    "unknown",
)
"""Every fault :func:`diagnose` can name; the first five are ``labs.failures``'s."""


@dataclass(frozen=True)
class Diagnosis:
    """What a run's output says went wrong."""

    fault: str
    """One of ``DIAGNOSES``."""
    rank: int | None
    """The rank at fault; None where every rank is (loss scaling) or the output
    cannot tell which one (a mismatch between two ranks)."""
    fact: str
    """The key fact, one sentence."""
    numbers: dict = field(default_factory=dict, compare=False)
    """The figures the fact rests on, e.g. {"need": bytes, "budget": bytes}."""
    evidence: str = field(default="", compare=False)
    """The printed line the diagnosis rests on."""

    def __str__(self) -> str:
        who = f" (rank {self.rank})" if self.rank is not None else ""
        return f"{self.fault}{who}: {self.fact}"


@dataclass(frozen=True)
class Captured:
    """What :func:`capture` saw: the text printed (stdout and stderr together, in
    order, then the error line), the error raised (None if none), the result
    (None if it raised) and the wall time in seconds."""

    text: str
    error: BaseException | None
    result: Any
    seconds: float

    def __str__(self) -> str:
        return self.text


class _Tee(io.TextIOBase):
    """A text stream that writes to several streams."""

    def __init__(self, *streams):
        self.streams = streams

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def error_line(err: BaseException) -> str:
    """An error as the labs' command lines print it: ``error: Type: message``."""
    return f"error: {type(err).__name__}: {err}"


def capture(fn, *args, echo: bool = True, **kwargs) -> Captured:
    """Run ``fn(*args, **kwargs)`` and keep what it printed, and the ``Exception``
    it raised if any (then printed to stderr as the labs' CLIs print it).

    The launcher forwards the ranks' output to ``sys.stdout`` / ``sys.stderr`` as
    they are when it starts the job, so C-level messages of a rank (gloo's abort)
    are kept too. ``echo``: also show it, as the notebook cell or terminal would.
    """
    buffer = io.StringIO()
    out = _Tee(buffer, sys.stdout) if echo else buffer
    err = _Tee(buffer, sys.stderr) if echo else buffer
    result, error = None, None
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the failure is what we study
            error = exc
            print(error_line(exc), file=sys.stderr, flush=True)
    return Captured(buffer.getvalue(), error, result, time.monotonic() - start)


def _text_of(printed) -> str:
    if isinstance(printed, Captured):
        return printed.text
    if isinstance(printed, BaseException):
        return error_line(printed)
    if isinstance(printed, str):
        return printed
    raise TypeError(
        "diagnose reads a str, an exception or a Captured, got "
        f"{type(printed).__name__}"
    )


def _line(text: str, at: int) -> str:
    """The line of ``text`` around offset ``at`` (stripped; its first 300
    characters)."""
    start = text.rfind("\n", 0, at) + 1
    end = text.find("\n", at)
    return text[start : end if end >= 0 else len(text)].strip()[:300]


def _bytes(figure: str) -> int:
    """``int`` of a figure printed with thousands separators, "1,468,006"."""
    return int(figure.replace(",", ""))


# ------------------------------------------------------------------ the rules
def _checked_mismatch(text: str) -> Diagnosis | None:
    m = re.search(
        r"Detected mismatch between collectives on ranks\. Rank (\d+) is running "
        r"collective: (.*?), but Rank (\d+) is running collective: (.*?)\."
        r"\s*Collectives differ in the following aspects:\s*([^\n]*)",
        text,
    )
    if not m:
        return None
    ops = {int(m.group(1)): m.group(2), int(m.group(3)): m.group(4)}

    def what(fingerprint: str) -> str:
        op = re.search(r"OpType=(\w+)", fingerprint)
        shape = re.search(r"TensorShape=(\[[^\]]*\])", fingerprint)
        return (op.group(1) if op else "?") + (shape.group(1) if shape else "")

    ops = {r: what(ops[r]) for r in sorted(ops)}  # the reporting rank varies
    aspects = re.sub(r"\s*vs\s*", " vs ", m.group(5)).strip()
    aspects = re.sub(r"\s+", " ", aspects).replace("Tensor Tensor", "Tensor")
    ranks = tuple(ops)
    fact = (
        f"ranks {ranks[0]} and {ranks[1]} called different collectives: "
        + ", ".join(f"rank {r} {op}" for r, op in ops.items())
        + f" (rank {m.group(1)}'s first: {aspects})"
    )
    numbers = {"ranks": ranks, "ops": ops}
    return Diagnosis("collective_mismatch", None, fact, numbers, _line(text, m.start()))


def _gloo_size_mismatch(text: str) -> Diagnosis | None:
    m = re.search(
        r"op\.preamble\.length <= op\.nbytes\. (\d+) vs (\d+)\. Received data size "
        r"doesn't match expected size",
        text,
    )
    if not m:
        return None
    sent, posted = int(m.group(1)), int(m.group(2))
    killed = re.search(r"rank (\d+) was killed by (SIG\w+)", text)
    rank = int(killed.group(1)) if killed else None
    how = f" and aborted rank {rank} ({killed.group(2)})" if killed else ""
    who = f"rank {rank}'s" if killed else "one rank's"
    fact = (
        f"{who} collective had a smaller buffer than its peer's: a {sent:,}-byte "
        f"message arrived for a {posted:,}-byte receive, gloo refused it{how}"
    )
    numbers = {"message_bytes": sent, "receive_bytes": posted}
    return Diagnosis("collective_mismatch", rank, fact, numbers, _line(text, m.start()))


def _waiters(text: str) -> Diagnosis | None:
    m = re.search(
        r"rank ([\d, ]+) failed waiting for other ranks \(timeout ([\d.]+) s\)", text
    )
    if not m:
        return None
    ranks = tuple(int(r) for r in re.findall(r"\d+", m.group(1)))
    timeout = float(m.group(2))
    fact = (
        f"every rank ({', '.join(map(str, ranks))}) waited {timeout:g} s in a "
        "collective that no peer joined, and none hung: the ranks called different "
        "collectives (or a different number of them)"
    )
    numbers = {"ranks": ranks, "timeout_s": timeout}
    return Diagnosis("collective_mismatch", None, fact, numbers, _line(text, m.start()))


def _blamed_rank(text: str) -> int | None:
    """The rank the launcher (or ``labs.offload.check_fits``) names first."""
    m = re.search(r"rank (\d+) raised; its traceback", text) or re.search(
        r"OutOfMemoryError: rank (\d+):", text
    )
    return int(m.group(1)) if m else None


def _out_of_memory(text: str) -> Diagnosis | None:
    m = re.search(
        r"Device pool out of memory.*?Tried to allocate (.+?) \(([\d,]+) bytes\)\. "
        r"The device pool of (\S+) has a budget of (.+?) \(([\d,]+) bytes\) of which "
        r"(.+?) is free",
        text,
    )
    rank = _blamed_rank(text)
    where = f"rank {rank}: " if rank is not None else ""
    if m:
        need, budget = _bytes(m.group(2)), _bytes(m.group(5))
        fact = (
            f"{where}device pool out of memory: need {m.group(1)} ({need:,} bytes) "
            f"more, budget {m.group(4)} ({budget:,} bytes), {m.group(6)} free"
        )
        numbers = {"pool": "device", "need": need, "budget": budget}
        return Diagnosis("oom", rank, fact, numbers, _line(text, m.start()))
    m = re.search(r"CUDA out of memory\. Tried to allocate ([\d.]+ \w+)", text)
    if m:
        fact = f"{where}CUDA out of memory: need {m.group(1)} more"
        numbers = {"pool": "device", "need_text": m.group(1)}
        return Diagnosis("oom", rank, fact, numbers, _line(text, m.start()))
    m = re.search(
        r"this run needs about (.+?) \((\d+) ranks x (.+?)\) but the machine has "
        r"(.+?) available",
        text,
    )
    if m:
        fact = (
            f"refused before any rank started: the run needs about {m.group(1)} "
            f"of host memory ({m.group(2)} ranks x {m.group(3)}), the machine has "
            f"{m.group(4)} available"
        )
        numbers = {"pool": "host", "need_text": m.group(1)}
        return Diagnosis("oom", None, fact, numbers, _line(text, m.start()))
    return None


def _hung(text: str) -> Diagnosis | None:
    m = re.search(r"rank ([\d, ]+) hung: (.*)", text)
    if not m:
        return None
    ranks = [int(r) for r in re.findall(r"\d+", m.group(1))]
    rest = m.group(2)
    waited = re.search(r"rank (\d+) failed waiting for (?:it|them) in a collective "
                       r"\(timeout ([\d.]+) s\)", rest)  # fmt: skip
    running = re.search(r"still running ([\d.]+) s after", rest)
    who = ", ".join(map(str, ranks))
    numbers: dict = {"ranks": tuple(ranks)}
    if waited:
        timeout = float(waited.group(2))
        numbers |= {"timeout_s": timeout, "waiting_rank": int(waited.group(1))}
        fact = (
            f"rank {who} hung: rank {waited.group(1)} waited {timeout:g} s for it in "
            "a collective"
        )
    elif running:
        timeout = float(running.group(1))
        numbers["timeout_s"] = timeout
        fact = f"rank {who} hung: still running {timeout:g} s after a rank returned"
    else:
        fact = f"rank {who} hung: {rest.strip()}"
    return Diagnosis("hung_rank", ranks[0], fact, numbers, _line(text, m.start()))


def _diverged(text: str) -> Diagnosis | None:
    m = re.search(r"the loss is (nan|inf|-inf) at step (\d+)", text)
    if not m:
        return None
    rank = _blamed_rank(text)
    fact = f"the loss became {m.group(1)} at step {m.group(2)}: training diverged"
    numbers = {"step": int(m.group(2))}
    return Diagnosis("diverged", rank, fact, numbers, _line(text, m.start()))


def _gradient_ratio(text: str) -> Diagnosis | None:
    m = re.search(
        r"gradient norm / single-process reference: x([\d.eE+-]+|nan|inf) at step "
        r"(\d+) \(world_size=(\d+)",
        text,
    )
    if not m:
        return None
    ratio, n = float(m.group(1)), int(m.group(3))
    numbers = {"factor": ratio, "world_size": n}
    evidence = _line(text, m.start())
    at = f"at step {m.group(2)}"
    if math.isclose(ratio, 1.0, rel_tol=1e-3):
        fact = f"the gradients match the single-process reference's (x1 {at})"
        return Diagnosis("none", None, fact, numbers, evidence)
    for scale, name, why in (
        (n, "the number of ranks", "summed over the ranks, not averaged"),
        (1 / n, "one over the number of ranks", "divided by it twice"),
    ):
        if n > 1 and math.isclose(ratio, scale, rel_tol=1e-3):
            fact = (
                f"every rank's gradient is x{ratio:.3f} the single-process "
                f"reference's {at}: {name} ({n}), so the gradients were {why}"
            )
            return Diagnosis("loss_scaling", None, fact, numbers, evidence)
    fact = (
        f"the gradient is x{ratio:.3f} the single-process reference's {at}, not a "
        f"power of world_size {n}: the ranks did not average the gradient of the "
        "global batch (overlapping or uneven shards?)"
    )
    return Diagnosis("wrong_gradients", None, fact, numbers, evidence)


def _raised_or_killed(text: str) -> Diagnosis | None:
    m = re.search(r"rank (\d+) raised; its traceback:", text)
    if m:
        rank = int(m.group(1))
        last = ""
        seen_frames = False
        for line in text[m.end() :].splitlines():
            if line.startswith((" ", "\t")):
                seen_frames = True
            elif line.strip() and seen_frames and not line.startswith("Traceback"):
                last = line.strip()
                break
        fact = f"rank {rank} raised {last or 'an error'}"
        return Diagnosis("raised", rank, fact, {}, _line(text, m.start()))
    m = re.search(r"rank (\d+) (?:was killed by|died with) ([^\n]+?)(?: without|$)",
                  text, re.M)  # fmt: skip
    if m:
        rank = int(m.group(1))
        fact = f"rank {rank} died ({m.group(2)}) without reporting"
        return Diagnosis("killed", rank, fact, {}, _line(text, m.start()))
    return None


RULES = (
    _checked_mismatch,
    _gloo_size_mismatch,
    _out_of_memory,
    _waiters,
    _hung,
    _diverged,
    _gradient_ratio,
    _raised_or_killed,
)
"""The rules in the order :func:`diagnose` tries them: the most specific message
first, so that a traceback the launcher wraps is read before the wrapper."""


def diagnose(printed) -> Diagnosis:
    """The :class:`Diagnosis` of a run from what it printed: ``printed`` is the
    text (``str``), the exception it raised, or :func:`capture`'s ``Captured``."""
    text = _text_of(printed)
    for rule in RULES:
        found = rule(text)
        if found is not None:
            return found
    lines = [line for line in text.splitlines() if line.strip()]
    return Diagnosis(
        "unknown",
        None,
        "no message the course's tools print for a fault",
        {},
        lines[-1].strip() if lines else "",
    )


# ------------------------------------------------------------ the exercise check
_UNSET = object()


def check_diagnosis(printed, fault: str, rank=_UNSET, **facts) -> None:
    """A learner's reading of ``printed`` against :func:`diagnose`'s.

    ``fault`` (one of ``DIAGNOSES``) and ``rank`` (an int, or None for "every
    rank" / "cannot tell") must both match; each of ``facts`` (e.g. ``need=``,
    ``budget=`` in bytes, ``timeout_s=``, ``factor=``) must match the figure of
    that name the diagnosis rests on, to 1 %. Prints one line when all do; raises
    ``AssertionError`` with a hint (the line to reread), not the answer.
    """
    if fault not in DIAGNOSES:
        raise ValueError(f"fault must be one of {DIAGNOSES}, got {fault!r}")
    if rank is _UNSET:
        raise TypeError("say which rank too: rank=<int>, or rank=None for every rank")
    found = diagnose(printed)
    hint = f"reread this line of the output: {found.evidence!r}"
    if fault != found.fault:
        raise AssertionError(f"the output does not show {fault!r}; {hint}")
    if rank != found.rank:
        raise AssertionError(
            f"{fault!r} is right, but rank={rank!r} is not the rank at fault "
            "(None means every rank, or that the output cannot tell which); "
            f"{hint}"
        )
    for name, value in facts.items():
        if name not in found.numbers:
            known = ", ".join(sorted(found.numbers)) or "none"
            raise AssertionError(
                f"this diagnosis has no figure {name!r} (it has: {known})"
            )
        expected = found.numbers[name]
        if isinstance(expected, int | float) and isinstance(value, int | float):
            ok = math.isclose(value, expected, rel_tol=0.01)
        else:
            ok = value == expected
        if not ok:
            raise AssertionError(f"{name}={value!r} does not match the output; {hint}")
    print(f"correct: {found}")
