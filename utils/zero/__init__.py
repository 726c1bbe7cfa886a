"""Chapter 2, "ZeRO: sharding the model states": the map of its code.

=========================  =============================================================
``labs/zero.py``           the lab: stages 0-3, fp32 or mixed precision, the course's
                           pieces (``scratch``) or torch's (``torch``)
``utils/zero/optim``       stages 0-2 as optimizer wrappers over flat buffers
                           (``ReplicatedOptimizer``, ``ShardedOptimizer``,
                           ``ShardedGradOptimizer``): any model, any torch optimizer
``utils/zero/fsdp``        stage 3: ``FullyShardedModule`` gathers each unit's
                           parameters before use and frees them after
``utils/zero/torch_impl``  torch's side: ``full_state`` of DDP, ZeRO-1 and FSDP2 models
``utils/zero/figures``     the paper's Table 1 recomputed, the explorer, the stage-3
                           gather/free timeline, what the formula leaves out
``utils/zero/exercises``   checks for the chapter's exercises
``tests/test_zero.py``     every stage against stage 0, one process and torch; memory
                           against the formulas
``bench/zero.py``          the course's stage 3 against ``fully_shard``
=========================  =============================================================

Flat buffers and their layout (``utils.flat``) are shared: the offload and combined
chapters shard the same way.
"""
