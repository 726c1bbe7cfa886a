"""Chapter 5 (``chapters/05-pipeline-parallel.md``), "Pipeline parallelism": the
map of its code.

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
``utils/pipeline_parallel/stage``   ``PipelineStage`` from any list of modules
                                    (first takes the input, last the loss, scaled
                                    1/m once): ``forward``, ``backward`` and the
                                    zero-bubble split ``backward(split=True)`` (B)
                                    + ``backward_weight`` (W); ``send``/``irecv``/
                                    ``recv`` of agreed shapes; ``partition``
``utils/pipeline_parallel/``        ``run_step``: any program of actions and p2p
``executor``                        ops, timed (each action's start and end, each
                                    wait), sends counted; ``UniformCompute`` pads;
                                    ``timed_program``, ``add_comm``
``utils/pipeline_parallel/``        the chapter's figures: a Gantt chart per rank
``figures``                         (F, B, W coloured, idle hatched) from
                                    ``simulate`` or the lab's recorded actions,
                                    measured above modelled; the (schedule, p, m)
                                    widget over recorded runs, prerendered; the
                                    measured bubble against the formula as m
                                    grows; peak activations per rank; p2p bytes
``utils/pipeline_parallel/``        checks of exercises 5.1 (write 1F1B: valid,
``exercises``                       deadlock-free, the course's), 5.2 (the bubble
                                    of any action lists) and 5.3 (the fewest m
                                    for a bubble under a target)
``labs/pipeline_parallel.py``       the lab: the GPT cut into p x v chunks
                                    (chapter 4's ``gpt_groups``), any schedule
                                    through the executor or torch's
                                    ``PipelineStage`` and
                                    schedules, pp x dp; ``Config``,
                                    ``PipelineData``, ``run``, ``run_many``
``tests/test_pipeline_schedules``   every schedule valid, deadlock-free and on its
                                    formula; interleaved and ZB-H1 against torch's
                                    own orders
``tests/test_pipeline_parallel``    every schedule and impl against one process
                                    (p = 2, 4; pp x dp), measured bubble against
                                    the formulas, peak activations, the hung
                                    schedule named, bad options refused
``tests/test_pipeline_parallel_``   each exercise check passes on the solution and
``exercises``                       fails on plausible wrong answers
``tests/test_pipeline_parallel_``   the figures from simulated and hand-made
``figures``                         recorded data
``bench/pipeline_parallel.py``      scratch 1F1B against torch's Schedule1F1B;
                                    the default lab's wall time
==================================  ====================================================

Papers: GPipe (Huang et al. 2019), PipeDream-Flush and interleaving (Narayanan et al.
2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", section 2.2), zero bubble (Qi et al. 2024, "Zero Bubble Pipeline
Parallelism", section 2.1).
"""
