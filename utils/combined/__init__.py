"""Chapter 7, "DP x TP x PP, and planning a run" (``chapters/07-combined.md``): the
map of its code.

=====================================  ==============================================
``utils/combined/parallelize``         the composition, torchtitan's shape:
                                       ``apply_tp`` (chapter 4), ``apply_pp``
                                       (chapter 5's chunks), ``apply_dp`` (chapter
                                       2's ZeRO 0-2 over the dp group),
                                       ``loss_fn`` (vocabulary-parallel with tp),
                                       ``full_parameters``
``labs/combined.py``                   the lab: ``--dp-size --tp-size --pp-size
                                       --zero-stage --schedule --micro-batches``;
                                       ``Config`` (with ``plan()``: the planner's
                                       estimate of the layout), ``CombinedData``,
                                       ``worker``, ``run``
``utils/planner.py`` (shared)          the planner: ``ModelSpec``, ``estimate``
                                       (per stage in ``Estimate.stages``),
                                       ``search``, ``PRESETS``
``utils/combined/figures``             the chapter's figures: which ranks form each
                                       group, measured memory per rank against the
                                       planner, bytes per axis
``tests/test_combined.py``             the lab at 2 x 2 x 2 (and others) against one
                                       process; memory per rank against the
                                       planner, category by category; bad layouts
                                       refused before any process starts
``tests/test_planner.py``              the planner against the published tables
``tests/test_multinode.py``            two torchrun "nodes" on loopback
``bench/combined.py``                  the default lab's wall time
=====================================  ==============================================

Papers: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
GPU Clusters Using Megatron-LM" (the 3-D layout, its takeaways, eq. 2);
Rajbhandari et al. 2020 (ZeRO); Korthikanti et al. 2022 (activations).
"""
