"""The pipeline-parallelism chapter: the map of its code (the schedules so far).

==================================  ====================================================
``utils/pipeline_parallel/``        schedules as data: ``Action`` ("0F1" = stage 0,
``schedules``                       forward, micro-batch 1) and one plain function per
                                    schedule, ``gpipe``, ``one_f_one_b``,
                                    ``interleaved``, ``zb1p``, each ``(rank, p, m, v)
                                    -> list[Action]``; the send/recv ops they imply
                                    (``program``, ``comm_ops``) in a deadlock-free
                                    order; ``table``
``utils/pipeline_parallel/check``   ``validate``, ``simulate`` (per-kind durations,
                                    makespan, bubble), ``run_blocking`` and
                                    ``Deadlock``, ``peak_activations``,
                                    ``expected_bubble`` (the papers' formulas),
                                    ``gantt``
``tests/test_pipeline_schedules``   every schedule valid, deadlock-free and on its
                                    formula; interleaved and ZB-H1 against torch's
                                    own orders
==================================  ====================================================

Still to come, under the layout's names: the lab (``labs/pipeline_parallel.py``, an
executor running these lists with blocking send/recv on gloo), the chapter
(``chapters/NN-pipeline-parallel.md``), ``tests/test_pipeline_parallel.py`` and the
bench (``bench/pipeline_parallel.py``).

Papers: GPipe (Huang et al. 2019), PipeDream-Flush and interleaving (Narayanan et al.
2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", section 2.2), zero bubble (Qi et al. 2024, "Zero Bubble Pipeline
Parallelism", section 2.1).
"""
