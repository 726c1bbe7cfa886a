"""Rank functions for tests/test_wire.py (importable, so the ranks find them)."""

import torch
import torch.distributed as dist

from utils.wire import WireCounter, read_sockets

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send")
# torch 2.13 names them *_single (all_gather_into_tensor / reduce_scatter_tensor
# still work there, with a FutureWarning).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


def _op(name: str, nbytes: int):
    """A closure running collective ``name`` on a buffer of ``nbytes`` (float32)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    full = torch.ones(nbytes // 4)
    shard = torch.ones(nbytes // 4 // n)
    if name == "all_reduce":
        return lambda: dist.all_reduce(full)
    if name == "all_gather":  # the full buffer S is the gathered output
        return lambda: _ALL_GATHER(full, shard)
    if name == "reduce_scatter":  # S is the unsharded input
        return lambda: _REDUCE_SCATTER(shard, full)
    if name == "broadcast":
        return lambda: dist.broadcast(full, src=0)
    if name == "send":  # rank 0 sends S to rank 1; the other ranks do nothing
        if rank == 0:
            return lambda: dist.send(full, dst=1)
        if rank == 1:
            return lambda: dist.recv(full, src=0)
        return lambda: None
    raise ValueError(name)


def _connected() -> int:
    """How many of this rank's TCP sockets are connected (not listening)."""
    return sum(r.state == 1 for r in (read_sockets() or {}).values())


def measure(nbytes: int, repeats: int) -> dict:
    """Counted bytes per op on this rank: {"connected": [at init, after warm-up],
    op: [sent, ...], op + ":retrans": [...], op + ":received": [...]}.

    Each op is warmed up once (not counted, so a pair gloo opens lazily for it
    does not add its handshake), then counted ``repeats`` times; a barrier between
    repeats keeps the ranks in step.
    """
    at_init = _connected()
    dist.all_reduce(torch.ones(1))  # opens gloo's pairs if they are opened lazily
    out = {"connected": [at_init, _connected()]}
    for name in OPS:
        run = _op(name, nbytes)
        run()
        dist.barrier()
        sent, retrans, received = [], [], []
        for _ in range(repeats):
            with WireCounter() as wire:
                run()
            sent.append(wire.sent)
            retrans.append(wire.retrans)
            received.append(wire.received)
            dist.barrier()
        out[name] = sent
        out[name + ":retrans"] = retrans
        out[name + ":received"] = received
    return out


def measure_new_group(nbytes: int) -> list:
    """All-reduce on a gloo group created inside the counted interval, so its
    sockets appear mid-interval (they count from 0: their handshake is included).
    Returns [(sent, connected sockets seen, sockets seen)] for two rounds; the
    second round's group replaces the first, destroyed, whose sockets may close
    during the interval (they keep their last reading)."""
    x = torch.ones(nbytes // 4)
    dist.all_reduce(x)
    out, group = [], None
    for _ in range(2):
        with WireCounter() as wire:
            if group is not None:
                dist.destroy_process_group(group)
            group = dist.new_group(backend="gloo")
            dist.all_reduce(x, group=group)
        out.append((wire.sent, _connected(), wire.sockets))
    dist.destroy_process_group(group)
    return out
