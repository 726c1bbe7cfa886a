"""Checks for the exercises of chapter 2, "ZeRO".

* :func:`check_smallest_world_size` (exercise 2.1): the fewest data-parallel ranks
  at which a model's states fit a device, for each stage, against
  ``model_state_bytes``; each call gets a second, and some answers are in the
  billions, so trying every N in turn cannot pass.
* :func:`check_shard_update` (exercise 2.2): stage 1's step (reduce-scatter the
  gradients, update this rank's shard, all-gather the parameters), written by the
  learner to a file (ranks find code by path), run in 2 gloo ranks against stage 0
  (``utils.zero.ReplicatedOptimizer``); the bytes of the collectives it calls are
  *modelled* (nccl-tests' accounting), and the bytes its sockets sent are *counted*
  (``utils.wire``) and shown beside them.
* :func:`check_grad_hook` (exercise 2.3): stage 2's gradient hook (copy a finished
  gradient into its bucket, free it, reduce-scatter the bucket once complete), run
  in 2 gloo ranks against stage 0, with the full gradients alive after every hook
  measured.

A check prints one line when the answer is right and raises ``AssertionError`` with
what was expected when it is not.
"""

from __future__ import annotations

import signal
import threading
import traceback

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from utils.comm import CollectiveCounter, CommMeter, bytes_sent
from utils.exercises import load_function, run_in_ranks
from utils.flat import FlatLayout
from utils.memory_model import model_state_bytes
from utils.models import MLP, mlp_batch, shard_batch
from utils.wire import WireCounter
from utils.zero.optim import ReplicatedOptimizer

__all__ = [
    "REPLICATED_BYTES",
    "Bucket",
    "check_grad_hook",
    "check_shard_update",
    "check_smallest_world_size",
    "smallest_world_size",
]

REPLICATED_BYTES = {0: 16, 1: 4, 2: 2, 3: 0}
"""Bytes per parameter each stage keeps whole on every rank (mixed-precision Adam,
16 bytes in all; the rest, ``16 - R``, is sharded)."""

_SIZES = (1_300_000_000, 7_500_000_000, 70_000_000_000, 175_000_000_000, 10**12)
_DEVICES_GB = (24, 80, 141)
_EXTRA_CASES = (
    # (params, device bytes): where the closed form without the shard's ceil is one
    # rank short (2B on 16 GB at stage 1: 3 ranks need 8,000,000,004 bytes of Adam).
    (2_000_000_000, 16 * 10**9),
    (10_000_000_000, 80 * 10**9),
    # Sizes no one trains, where the answer is 16 or 1.6e10 ranks: trying every N
    # in turn cannot finish within the time each call is allowed.
    (10**18, 10**9),
    (10**15, 64 * 10**6),
)
TIME_LIMIT_S = 1.0
"""Seconds each call of the learner's ``smallest_world_size`` may take."""


def smallest_world_size(num_params: int, device_bytes: int, stage: int) -> int | None:
    """The reference answer: the fewest ranks whose mixed-precision model states
    (the paper's 16 B/param) fit in ``device_bytes`` at ``stage``; None if no number
    of ranks does (what stays whole is too big alone).

    Solved, not searched: the states are ``R psi + (16 - R) ceil(psi / N)`` bytes,
    which fit when ``ceil(psi / N) <= k = floor((M - R psi) / (16 - R))``, that is
    when ``N >= psi / k``.
    """
    whole = REPLICATED_BYTES[stage]
    room = device_bytes - whole * num_params  # what the shards may use
    if whole == 16:
        return 1 if room >= 0 else None
    per_shard = room // (16 - whole)  # the most elements one shard may hold
    if per_shard < 1:
        return None
    return -(-num_params // per_shard)  # ceil(psi / k)


class _TooSlow(BaseException):
    """Raised inside the learner's function when its time is up (a BaseException,
    so an ``except Exception`` in their code does not swallow it)."""


def _within(seconds: float, fn, *args):
    """``fn(*args)``, interrupted after ``seconds`` (main thread, POSIX; elsewhere
    it just runs)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        return fn(*args)

    def alarm(signum, frame):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fits(num_params: int, world_size: int, stage: int, device: int) -> bool:
    need = model_state_bytes(num_params, world_size=world_size, zero_stage=stage)
    return need.total <= device


def _cases():
    for num_params in _SIZES:
        for gb in _DEVICES_GB:
            yield num_params, gb * 10**9
    yield from _EXTRA_CASES


def check_smallest_world_size(fn) -> None:
    """``fn(num_params, device_bytes, stage)`` must return the fewest ranks (or
    None) for every model size, device and stage of a grid, each call within
    :data:`TIME_LIMIT_S`; every expected answer is confirmed with
    ``model_state_bytes`` (it fits at N, not at N - 1)."""
    cases = 0
    for num_params, device in _cases():
        for stage in range(4):
            want = smallest_world_size(num_params, device, stage)
            if want is not None:  # the closed form, confirmed by the formula
                assert _fits(num_params, want, stage, device)
                assert want == 1 or not _fits(num_params, want - 1, stage, device)
            where = (
                f"{num_params:.3g} params, {device / 1e9:g} GB device, stage {stage}"
            )
            try:
                got = _within(TIME_LIMIT_S, fn, num_params, device, stage)
            except _TooSlow:
                answer = "None" if want is None else f"{want:,} ranks"
                raise AssertionError(
                    f"{where}: no answer after {TIME_LIMIT_S:g} s (the answer is "
                    f"{answer}). Solve the inequality for N instead of trying "
                    f"every N."
                ) from None
            cases += 1
            if got is None and want is not None and want > 4096:
                raise AssertionError(
                    f"{where}: you return None, expected {want:,} ranks: an answer "
                    f"this large is out of reach of any search up to a bound; "
                    f"solve the inequality for N"
                )
            if got != want:
                raise AssertionError(
                    f"{where}: you return {got!r}, expected {want!r} (the states "
                    f"per rank are model_state_bytes(num_params, world_size=N, "
                    f"zero_stage={stage}).total; a shard holds ceil(psi / N) "
                    f"elements)"
                )
    print(
        f"correct: {cases} cases (model sizes x devices x stages) agree, each "
        f"answered within {TIME_LIMIT_S:g} s"
    )


# -------------------------------------------------------------- stage 1's update
SIZES = (16, 32, 8)
"""The MLP of exercise 2.2: 16*32+32 + 32*8+8 = 808 parameters."""
STEPS = 3


def rank_check_shard_update(path: str, name: str) -> dict:
    """Runs in each rank: the learner's stage-1 step against stage 0."""
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        step_fn = load_function(path, name)
        model, ref = MLP(SIZES, seed=0), MLP(SIZES, seed=0)
        params = list(model.parameters())
        layout = FlatLayout((p.numel() for p in params), n)
        flat = torch.zeros(layout.padded)
        flat_grad = torch.zeros(layout.padded)
        for p, (a, b) in zip(params, layout.spans()):
            flat[a:b].copy_(p.detach().reshape(-1))
            p.data = flat[a:b].view_as(p)  # the model reads the flat buffer
            p.grad = flat_grad[a:b].view_as(p)  # backward writes into it
        start, end = layout.shard(rank)
        shard = flat[start:end]  # what this rank's optimizer owns
        opt = torch.optim.AdamW([shard], lr=1e-2)
        ref_opt = ReplicatedOptimizer(ref.parameters(), torch.optim.AdamW, lr=1e-2)
        meter, wired = CommMeter(), 0
        for step in range(STEPS):
            x, y = shard_batch(mlp_batch(SIZES, 8, step=step), rank, n)
            for m in (model, ref):
                F.mse_loss(m(x), y).backward()
            dist.barrier()
            wire = WireCounter().start()
            with CollectiveCounter(meter):
                step_fn(flat, flat_grad, shard, opt)
            wired += wire.stop() or 0
            ref_opt.step()
            flat_grad.zero_()
            ref_opt.zero_grad()
        diff = max((a - b).abs().max().item() for a, b in zip(params, ref.parameters()))
        state = [t.numel() for s in opt.state.values() for t in s.values() if t.dim()]
        return {
            "diff": diff,
            "bytes": meter.total / STEPS,
            "by_op": {k: v / STEPS for k, v in meter.by_op.items()},
            "wire": wired / STEPS if wire.sent is not None else None,
            "state": state,
            "shard": end - start,
            "padded": layout.padded,
            "error": None,
        }
    except Exception:
        return {"error": f"rank {rank} raised:\n{traceback.format_exc()}"}


def check_shard_update(path, name: str = "sharded_step", world_size: int = 2) -> None:
    """Run ``name`` from the file ``path`` as the step of a 2-rank stage-1 training
    of a small MLP; parameters must equal stage 0's, the optimizer must hold only
    the shard's state, and the modelled bytes of the collectives it calls must be
    stage 1's 2 Psi (N-1)/N (counted socket bytes are shown beside them)."""
    results = run_in_ranks(
        rank_check_shard_update, path, name, world_size=world_size, timeout=60.0
    )
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise AssertionError("\n".join(errors))
    r = results[0]
    want = 2 * bytes_sent("all_gather", r["padded"] * 4, world_size)
    for rank, res in enumerate(results):
        if res["diff"] > 1e-6:
            raise AssertionError(
                f"rank {rank}: parameters differ from stage 0 by {res['diff']:.3g} "
                f"after {STEPS} steps: average the gradients (reduce-scatter, then "
                f"divide by {world_size}), step, then all-gather every shard"
            )
        if any(size != res["shard"] for size in res["state"]):
            raise AssertionError(
                f"rank {rank}: optimizer state sizes {res['state']}, expected "
                f"{res['shard']} each (this rank's shard only)"
            )
    calls = ", ".join(f"{op} {b:,.0f} B" for op, b in r["by_op"].items()) or "none"
    if abs(r["bytes"] - want) > 0.01 * want:
        raise AssertionError(
            f"the collectives you call move {r['bytes']:,.0f} bytes per rank per "
            f"step, modelled ({calls}); stage 1 needs {want:,} (a reduce-scatter "
            f"and an all-gather of the padded buffer, 2 Psi (N-1)/N x 4 bytes). An "
            f"all-reduce plus an all-gather would be {1.5 * want:,.0f}."
        )
    wire = "not countable here" if r["wire"] is None else f"{r['wire']:,.0f} B"
    print(
        f"correct: same parameters as stage 0 after {STEPS} steps on {world_size} "
        f"ranks, optimizer state of {r['shard']} elements per rank (of "
        f"{r['padded']}), {r['bytes']:,.0f} bytes per step modelled = "
        f"2 Psi (N-1)/N x 4 ({calls}); counted on rank 0's sockets: {wire} (gloo "
        f"runs a reduce-scatter as an all-reduce, plus 48-byte message headers)"
    )


# ------------------------------------------------------------- stage 2's hook
HOOK_SIZES = (16, 32, 32, 8)
"""The MLP of exercise 2.3: three linear layers, one bucket each (264, 1,056 and
544 parameters, padded to divide by the world size)."""


class Bucket:
    """What exercise 2.3's hook gets with each gradient: one bucket of parameters.

    ``params``: its parameters (one linear layer's weight and bias); ``numel``: the
    length of its flat gradient buffer (padded to divide by the world size);
    ``span(param)``: ``(start, end)`` of ``param`` in that buffer; ``grad_shard``:
    this rank's slice of the bucket's averaged gradient (``numel / world_size``
    elements, zero at the start of a step): add into it. ``full`` (None) and
    ``arrived`` (0) are yours to use between calls; the check resets them before
    every backward.
    """

    def __init__(self, params: list[torch.Tensor], world_size: int, rank: int):
        self.params = params
        self.layout = FlatLayout((p.numel() for p in params), world_size)
        self.numel = self.layout.padded
        self._spans = {id(p): s for p, s in zip(params, self.layout.spans())}
        self.grad_shard = torch.zeros(self.layout.shard_numel)
        self.full: torch.Tensor | None = None
        self.arrived = 0

    def span(self, param: torch.Tensor) -> tuple[int, int]:
        """Where ``param``'s gradient goes in the bucket's flat buffer."""
        return self._spans[id(param)]

    def live_elements(self) -> int:
        """Elements of the tensors the learner keeps on this bucket (``full`` or
        any other attribute), the shard aside."""
        return sum(
            t.numel()
            for k, t in vars(self).items()
            if isinstance(t, torch.Tensor) and k != "grad_shard"
        )


class _CollectiveLog(TorchDispatchMode):
    """Appends ("collective", name) to ``log`` for every c10d op dispatched."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "c10d" and name not in ("barrier", "monitored_barrier_"):
            self.log.append(("collective", name.rstrip("_")))
        return func(*args, **(kwargs or {}))


def rank_check_grad_hook(path: str, name: str) -> dict:
    """Runs in each rank: the learner's stage-2 hook against stage 0, with the full
    gradient elements alive before and after every hook call measured."""
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        hook_fn = load_function(path, name)
        model, ref = MLP(HOOK_SIZES, seed=0), MLP(HOOK_SIZES, seed=0)
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        buckets = [Bucket([m.weight, m.bias], n, rank) for m in reversed(layers)]
        bucket_of = {id(p): b for b in buckets for p in b.params}
        log: list = []
        worst = {"over": 0, "where": ""}
        seen: dict[int, int] = {}  # gradients arrived per bucket, this backward
        late: list[int] = []

        def live() -> int:
            grads = sum(
                p.grad.numel() for p in model.parameters() if p.grad is not None
            )
            return grads + sum(b.live_elements() for b in buckets)

        def on_grad(p):
            b = bucket_of[id(p)]
            allowed = b.numel + p.numel()  # the bucket's buffer and this gradient
            for when in ("before", "after"):
                if when == "after":
                    hook_fn(p, b)
                over = live() - allowed
                if over > worst["over"]:
                    shape = tuple(p.shape)
                    worst.update(over=over, where=f"{when} the hook of a {shape} grad")
            seen[id(b)] = seen.get(id(b), 0) + 1
            completed = sum(
                seen[id(c)] == len(c.params) for c in buckets if id(c) in seen
            )
            issued = sum(e[0] == "collective" and "reduce_scatter" in e[1] for e in log)
            if issued < completed:  # a complete bucket not yet reduce-scattered
                late.append(completed - issued)

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(on_grad)
        opts = [
            torch.optim.AdamW([torch.zeros(b.layout.shard_numel)], lr=1e-2)
            for b in buckets
        ]
        ref_opt = ReplicatedOptimizer(ref.parameters(), torch.optim.AdamW, lr=1e-2)
        grads_left, reduce_scatters, other_ops = 0, 0, set()
        for step in range(STEPS):
            x, y = shard_batch(mlp_batch(HOOK_SIZES, 8, step=step), rank, n)
            for b in buckets:
                b.grad_shard.zero_()
                b.full, b.arrived = None, 0
            log.clear()
            seen.clear()
            with _CollectiveLog(log):
                F.mse_loss(model(x), y).backward()
            grads_left += sum(p.grad is not None for p in model.parameters())
            ops = [e[1] for e in log if e[0] == "collective"]
            reduce_scatters += sum("reduce_scatter" in op for op in ops)
            other_ops |= {op for op in ops if "reduce_scatter" not in op}
            # the update: stage 2's, from the shards the hook filled
            for b, opt in zip(buckets, opts):
                flat = torch.zeros(b.numel)
                for p in b.params:
                    s0, s1 = b.span(p)
                    flat[s0:s1] = p.detach().reshape(-1)
                s0, s1 = b.layout.shard(rank)
                shard = opt.param_groups[0]["params"][0]
                if step == 0:
                    shard.copy_(flat[s0:s1])
                shard.grad = b.grad_shard.clone()
                opt.step()
                dist.all_gather_single(flat, shard.detach().clone())
                with torch.no_grad():
                    for p in b.params:
                        s0, s1 = b.span(p)
                        p.copy_(flat[s0:s1].view_as(p))
            F.mse_loss(ref(x), y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            for p in model.parameters():
                p.grad = None  # whatever the hook left, so the next step starts clean
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(model.parameters(), ref.parameters())
        )
        return {
            "diff": diff,
            "grads_left": grads_left,
            "reduce_scatters": reduce_scatters / STEPS,
            "other_ops": sorted(other_ops),
            "late": len(late),
            "over": worst["over"],
            "where": worst["where"],
            "buckets": len(buckets),
            "sizes": [b.numel for b in buckets],
            "error": None,
        }
    except Exception:
        return {"error": f"rank {rank} raised:\n{traceback.format_exc()}"}


def check_grad_hook(path, name: str = "on_grad_ready", world_size: int = 2) -> None:
    """Run ``name(param, bucket)`` from the file ``path`` as stage 2's gradient hook
    (``register_post_accumulate_grad_hook``) in a 2-rank training of a small MLP.

    Refused unless: the parameters equal stage 0's after the steps; no ``.grad``
    is left after backward (the full gradients were freed); each bucket is
    reduce-scattered exactly once per step, with no other collective, inside the
    hook of its last gradient (while backward goes on); and, before and after
    every hook call, the full gradient elements alive (``.grad`` of every
    parameter plus what the hook keeps on the buckets) never exceed that bucket's
    buffer plus the parameter just finished."""
    results = run_in_ranks(
        rank_check_grad_hook, path, name, world_size=world_size, timeout=60.0
    )
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise AssertionError("\n".join(errors))
    for rank, r in enumerate(results):
        if r["diff"] > 1e-6:
            raise AssertionError(
                f"rank {rank}: parameters differ from stage 0 by {r['diff']:.3g} "
                f"after {STEPS} steps: each bucket's grad_shard must hold the "
                f"average over the {world_size} ranks of this rank's slice "
                f"(reduce-scatter the bucket's flat gradients, divide by "
                f"{world_size}, add into grad_shard)"
            )
        if r["grads_left"]:
            raise AssertionError(
                f"rank {rank}: {r['grads_left']} parameters still had a .grad after "
                f"backward: set param.grad = None once it is copied into the bucket"
            )
        if r["other_ops"] or r["reduce_scatters"] != r["buckets"]:
            raise AssertionError(
                f"rank {rank}: {r['reduce_scatters']:g} reduce-scatters per step "
                f"(and other collectives: {r['other_ops'] or 'none'}); expected "
                f"exactly one reduce-scatter per bucket, {r['buckets']}, each when "
                f"its last gradient arrives"
            )
        if r["late"]:
            raise AssertionError(
                f"rank {rank}: {r['late']} times a bucket was complete but not yet "
                f"reduce-scattered when its last gradient's hook returned: reduce "
                f"a bucket in the hook of its last gradient, while backward goes on"
            )
        if r["over"] > 0:
            raise AssertionError(
                f"rank {rank}: {r['where']}, {r['over']:,} more gradient elements "
                f"were alive than that parameter's bucket ({r['sizes']} elements "
                f"per bucket) plus the gradient just produced: copy each gradient "
                f"into its bucket and free it at once, and free the bucket's buffer "
                f"once it is reduced"
            )
    r = results[0]
    print(
        f"correct: same parameters as stage 0 after {STEPS} steps on {world_size} "
        f"ranks; {r['buckets']} buckets ({', '.join(map(str, r['sizes']))} "
        f"elements), each reduce-scattered once in backward as it completed; never "
        f"more than one bucket plus one gradient alive, and no .grad left after "
        f"backward"
    )
