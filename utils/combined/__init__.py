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
``utils/combined/figures``             the chapter's figures and tables: which
                                       ranks form each group (``draw_groups``) and
                                       which links they use (``link_rows``);
                                       measured memory per rank against the
                                       planner; bytes per axis against the papers'
                                       formulas (``axis_model``); ZeRO 0-2 bytes;
                                       the bubble; published configurations
                                       recomputed (``paper_rows``); step time per
                                       axis; the cost of each lab (``cost_rows``)
``utils/combined/reference``           the single-process reference the lab must
                                       equal (``reference``, ``differences``)
``utils/combined/exercises``           checks of exercises 7.1-7.3: a rank's groups,
                                       the fewest stages that fit, ZeRO-1 optimizer
                                       bytes against a measured run
``tests/test_combined.py``             the lab at 2 x 2 x 2 (and others) against one
                                       process; memory per rank against the
                                       planner, category by category; bad layouts
                                       refused before any process starts
``tests/test_planner.py``              the planner against the published tables
``tests/test_combined_figures.py``     the figures draw what they are given; the
                                       papers' formulas against a real run's bytes;
                                       the exercise checks
``tests/test_multinode.py``            two torchrun "nodes" on loopback
``bench/combined.py``                  the default lab's wall time
=====================================  ==============================================

Papers: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
GPU Clusters Using Megatron-LM" (the 3-D layout, its takeaways, eq. 2);
Rajbhandari et al. 2020 (ZeRO); Korthikanti et al. 2022 (activations).
"""
