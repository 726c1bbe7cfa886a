"""Chapter 1, "Data parallelism": the map of its code.

=================================  =====================================================
``labs/data_parallel.py``          the lab: one replica per rank, gradients averaged by
                                   ``naive``, ``bucketed`` or torch's ``ddp``
``utils/data_parallel/ddp``        the from-scratch wrappers ``NaiveDDP`` and
                                   ``BucketedDDP`` (any ``nn.Module``; ``no_sync()``
                                   and ``set_requires_gradient_sync()``)
``utils/data_parallel/demos``      small measured demonstrations run in ranks: the
                                   token-mean loss, DDP's bucket rebuild, bf16 reduction
``utils/data_parallel/figures``    memory per rank against the world size, per-rank
                                   compute/communication timelines, the DP memory
                                   limit, the ring's bus bandwidth
``utils/data_parallel/exercises``  checks for the chapter's exercises
``tests/test_data_parallel.py``    wrappers and lab against one process and torch's DDP
``bench/data_parallel.py``         naive against bucketed step time; ring against gloo
=================================  =====================================================

The ring all-reduce itself is shared (``utils.comm.ring_all_reduce``): chapter 0's
collectives and the later chapters use it too.
"""
