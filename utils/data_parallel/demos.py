"""Small measured demonstrations of chapter 1, "Data parallelism", run inside ranks.

Each ``*_rank`` function runs in every rank of a ``utils.launch.launch`` job (ranks
find functions by module path, so they live here and not in notebook cells) and
returns plain data; the chapter draws or tabulates it. Every figure they return is
measured in that run: gradients compared with a one-process reference, storage
addresses, what ``batch_isend_irecv`` really sent.

- :func:`token_mean_rank`: a token-mean loss over unequal token counts per rank.
  Averaging per-rank means is not the global mean; summing and dividing by the
  global token count is (section "Why averaging gradients is exact").
- :func:`ddp_buckets_rank`: what torch's ``DistributedDataParallel`` does with its
  buckets step by step (one bucket in the first iteration, rebuilt after it), and
  whether the gradients live in the buckets (``gradient_as_bucket_view``).
- :func:`reduce_dtype_rank`: the error of an all-reduce done in bf16 (DDP's
  ``bf16_compress_hook``) against one in fp32, both against an exact fp64 sum.
- :func:`ring_trace_rank`: ``utils.comm.ring_all_reduce`` on a tagged tensor,
  recording which chunk each rank sent at each step and whose contributions it held
  (``tests/test_data_parallel.py`` checks it against
  ``utils.data_parallel.figures.ring_schedule``).
- :func:`accumulation_error`: no ranks; K micro-batch gradients accumulated in bf16
  against fp32, both against fp64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from utils.comm import CommMeter, ring_all_reduce

# ------------------------------------------------------------ token-mean losses
FEATURES, CLASSES = 16, 8


def token_batch(tokens_per_rank, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Every rank's tokens: ``(x, y)`` with ``tokens_per_rank[r]`` rows for rank r.

    Deterministic, so every rank (and the one-process reference) can build all of
    them and keep its own.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for count in tokens_per_rank:
        x = torch.randn(count, FEATURES, generator=g)
        y = torch.randint(0, CLASSES, (count,), generator=g)
        out.append((x, y))
    return out


def _token_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, CLASSES)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def token_mean_rank(tokens_per_rank, seed: int = 0) -> dict:
    """One backward of a token-mean cross-entropy, three ways, against one process.

    * ``mean_of_means``: each rank's loss is the mean over its own tokens, and the
      gradients are averaged over ranks (what an averaging all-reduce, or DDP,
      does with an ordinary ``F.cross_entropy``): every rank weighs the same,
      whatever its token count;
    * ``global_count``: each rank sums its tokens' losses, divides by the global
      token count (one all-reduce of the counts), and the gradients are
      all-reduced by SUM: every token weighs the same, as in one process;
    * ``global_count_ddp``: the same through torch's DDP, which averages (divides
      by N), so the local sum is multiplied by N first.

    Returns the loss each way, the one-process loss, and each way's largest
    gradient difference from the one-process gradients.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    if len(tokens_per_rank) != n:
        raise ValueError(f"tokens_per_rank needs {n} counts, got {tokens_per_rank}")
    batches = token_batch(tokens_per_rank, seed)
    x, y = batches[rank]

    ref = _token_model(seed)  # one process, every token of every rank
    all_x = torch.cat([b[0] for b in batches])
    all_y = torch.cat([b[1] for b in batches])
    ref_loss = F.cross_entropy(ref(all_x), all_y)
    ref_loss.backward()
    expected = _grads(ref)

    def report(model, loss) -> dict:
        gap = max((g - e).abs().max().item() for g, e in zip(_grads(model), expected))
        scale = max(e.abs().max().item() for e in expected)
        return {"loss": float(loss), "max_grad_error": gap, "relative": gap / scale}

    out = {"reference_loss": ref_loss.item(), "tokens": list(tokens_per_rank)}

    # Mean over my tokens, then average over ranks.
    model = _token_model(seed)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(n)
    shown = loss.detach().clone()
    dist.all_reduce(shown)
    out["mean_of_means"] = report(model, shown / n)

    # The fix: sum over my tokens, divide by the global count, all-reduce by SUM.
    model = _token_model(seed)
    # [token-mean-fix-start]
    count = torch.tensor(float(len(y)))
    dist.all_reduce(count)  # the global number of tokens
    loss = F.cross_entropy(model(x), y, reduction="sum") / count
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)  # a sum: the division by the count is in the loss
    # [token-mean-fix-end]
    shown = loss.detach().clone()
    dist.all_reduce(shown)
    out["global_count"] = report(model, shown)

    # The same fix through DDP, which divides the summed gradients by N.
    ddp = DistributedDataParallel(_token_model(seed))
    loss = F.cross_entropy(ddp(x), y, reduction="sum") * n / count
    loss.backward()
    shown = loss.detach().clone() / n
    dist.all_reduce(shown)
    out["global_count_ddp"] = report(ddp.module, shown)
    return out


# ------------------------------------------------------------------ DDP buckets
def ddp_buckets_rank(
    sizes=(256, 256, 256, 256, 256), bucket_mb: float = 0.5, steps: int = 3
) -> list[dict]:
    """torch's DDP on an MLP of ``sizes``, with and without
    ``gradient_as_bucket_view``: per step, the buckets the reducer all-reduced
    (read in a comm hook that does what DDP's default hook does) and whether every
    ``p.grad`` lies inside one of those bucket buffers (storage addresses).

    ``bytes_of_buckets`` is what the buckets hold; when the gradients are not views
    into them, that much memory comes on top of the ``.grad`` tensors.
    """
    n = dist.get_world_size()
    rows = []
    for as_view in (False, True):
        torch.manual_seed(0)
        layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
        ddp = DistributedDataParallel(
            nn.Sequential(*layers),
            bucket_cap_mb=bucket_mb,
            gradient_as_bucket_view=as_view,
        )
        seen: list[tuple[int, int, int]] = []

        def hook(state, bucket, seen=seen):
            buffer = bucket.buffer()
            size = buffer.numel() * buffer.element_size()
            seen.append((bucket.index(), buffer.data_ptr(), size))
            fut = dist.all_reduce(buffer.div_(n), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)
        x = torch.randn(8, sizes[0])
        for step in range(steps):
            seen.clear()
            ddp.zero_grad(set_to_none=False)
            ddp(x).sum().backward()
            grads = [p.grad for p in ddp.module.parameters()]
            inside = all(
                any(start <= g.data_ptr() < start + size for _, start, size in seen)
                for g in grads
            )
            rows.append(
                {
                    "gradient_as_bucket_view": as_view,
                    "step": step,
                    "buckets": len(seen),
                    "bytes_of_buckets": sum(size for _, _, size in seen),
                    "bytes_of_grads": sum(g.numel() * g.element_size() for g in grads),
                    "grads_are_bucket_views": inside,
                }
            )
    return rows


# --------------------------------------------------------------- reduction dtype
def reduce_dtype_rank(numel: int = 1 << 20, seed: int = 0) -> dict:
    """Average one gradient-sized buffer over the ranks in fp32 and in bf16.

    Each rank's gradient is fp32 noise of its own seed. The exact mean is taken in
    fp64; ``fp32`` all-reduces the fp32 buffer and divides by N (DDP's default
    hook); ``bf16`` does what torch's ``bf16_compress_hook`` does
    (torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py,
    ``_compress_hook``: ``buffer.to(bfloat16).div_(world_size)``, all-reduce in
    bf16, copy back into the fp32 buffer); ``bf16_cast`` rounds each rank's
    gradient to bf16 once and sums exactly, the part of bf16's error that the
    rounding of the inputs alone causes. Returns each one's relative error
    ``||mean - exact|| / ||exact||`` and the largest element error, and bf16's
    unit roundoff for comparison.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + 1000 * rank)
    grad = torch.randn(numel, generator=g)  # fp32
    exact = grad.double()
    dist.all_reduce(exact)
    exact /= n
    out = {"world_size": n, "numel": numel}
    fp32 = grad.clone()
    dist.all_reduce(fp32)
    fp32 /= n
    bf16 = grad.to(torch.bfloat16).div_(n)
    dist.all_reduce(bf16)
    rounded = grad.to(torch.bfloat16).double()  # rounded once, then summed exactly
    dist.all_reduce(rounded)
    rounded /= n
    for name, got in (("fp32", fp32), ("bf16", bf16.float()), ("bf16_cast", rounded)):
        err = got.double() - exact
        out[name] = {
            "relative": (err.norm() / exact.norm()).item(),
            "max_abs": err.abs().max().item(),
        }
    out["bf16_unit_roundoff"] = torch.finfo(torch.bfloat16).eps / 2  # 2**-8
    return out


def accumulation_error(
    micro_batches: int = 16, numel: int = 1 << 16, seed: int = 0
) -> dict:
    """In one process: the sum of ``micro_batches`` gradients accumulated in a bf16
    ``.grad`` against an fp32 one, both against fp64. Each micro-batch's gradient is
    the same fp32 noise vector plus a little of its own (as consecutive
    micro-batches' gradients are: similar, not equal), and is first rounded to
    bf16 (a bf16 model's backward produces bf16 gradients). Returns the relative
    error ``||acc - exact|| / ||exact||`` of each."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=g)
    acc16 = torch.zeros(numel, dtype=torch.bfloat16)
    acc32 = torch.zeros(numel)
    exact = torch.zeros(numel, dtype=torch.float64)
    for _ in range(micro_batches):
        micro = (common + 0.1 * torch.randn(numel, generator=g)).to(torch.bfloat16)
        acc16 += micro  # rounds to bf16 after every addition
        acc32 += micro.float()
        exact += micro.double()
    rel = {
        "bf16": ((acc16.double() - exact).norm() / exact.norm()).item(),
        "fp32": ((acc32.double() - exact).norm() / exact.norm()).item(),
    }
    return {"micro_batches": micro_batches, **rel}


# ------------------------------------------------------------------- ring trace
def ring_trace_rank(chunk_numel: int = 4) -> list[dict]:
    """Run ``utils.comm.ring_all_reduce`` on a tagged tensor and record each send.

    Rank r's input is the value 2**r everywhere (fp64, so sums are exact), so a
    chunk's value says whose contributions it holds: bit k set means rank k's.
    ``dist.batch_isend_irecv`` is wrapped for the duration to read, at each
    exchange, which chunk of the buffer the isend's tensor is (from its address)
    and its value, and where the irecv lands ("temp" for the reduce-scatter's
    scratch buffer, else a chunk index). Each row: ``{"exchange", "send_chunk",
    "send_ranks", "recv_into", "to", "from", "counted_bytes"}``, with
    ``counted_bytes`` what ``ring_all_reduce`` counted on its meter for the send.
    Returns the rows and checks the result is the full sum on every element.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    buffer = torch.full((n * chunk_numel,), float(2**rank), dtype=torch.float64)
    base, step = buffer.data_ptr(), chunk_numel * buffer.element_size()

    def chunk_of(t: torch.Tensor):
        offset = t.data_ptr() - base
        inside = 0 <= offset < n * step
        return offset // step if inside else "temp"

    rows: list[dict] = []
    meter = CommMeter()
    original = dist.batch_isend_irecv

    def traced(ops):
        row = {"exchange": len(rows)}
        for op in ops:
            if op.op is dist.isend:
                row["send_chunk"] = chunk_of(op.tensor)
                mask = int(op.tensor[0].item())
                row["send_ranks"] = [k for k in range(n) if mask >> k & 1]
                row["to"] = op.peer
            else:
                row["recv_into"] = chunk_of(op.tensor)
                row["from"] = op.peer
        before = meter.total
        reqs = original(ops)
        row["_before"] = before
        rows.append(row)
        return reqs

    dist.batch_isend_irecv = traced
    try:
        ring_all_reduce(buffer, meter=meter)
    finally:
        dist.batch_isend_irecv = original
    # The meter counts a send after its requests completed: attribute each count.
    counts = [r.pop("_before") for r in rows] + [meter.total]
    for r, a, b in zip(rows, counts, counts[1:]):
        r["counted_bytes"] = b - a
    if not torch.equal(buffer, torch.full_like(buffer, float(2**n - 1))):
        raise AssertionError(f"rank {rank}: ring_all_reduce gave {buffer.tolist()}")
    return rows


def chapter_demos_rank(tokens_per_rank, numel: int = 1 << 20) -> dict:
    """Every demonstration the chapter shows, in one launch (a launch costs more
    than the demos): :func:`token_mean_rank`, :func:`ddp_buckets_rank`,
    :func:`reduce_dtype_rank` and :func:`ring_trace_rank`."""
    return {
        "token_mean": token_mean_rank(tokens_per_rank),
        "ddp_buckets": ddp_buckets_rank(),
        "reduce_dtype": reduce_dtype_rank(numel),
        "ring_trace": ring_trace_rank(),
    }
