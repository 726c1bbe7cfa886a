"""One module per parallelism; each runs inside every rank and has a CLI.

Run any lab on CPU processes with ``python -m labs.<name> --world-size 4``, or
on GPUs with ``torchrun --nproc-per-node 8 -m labs.<name>``.
"""
