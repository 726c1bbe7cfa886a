"""The trivial job that bench/launch.py times: one all_reduce per rank.

Also what torchrun runs for the comparison::

    python -m torch.distributed.run --nproc-per-node 4 -m bench._launch_worker
"""

import torch
import torch.distributed as dist


def all_reduce_once() -> float:
    """Sum of the ranks, by one all_reduce (so the ranks really talk)."""
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    all_reduce_once()
    dist.destroy_process_group()
