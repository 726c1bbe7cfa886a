"""Chapter 4, "Model parallelism: layers and tensors"
(``chapters/04-model-parallel.md``): the map of its code.

=======================================  ===============================================
``utils/model_parallel/comm``            the conjugate operators as autograd Functions:
                                         ``CopyToTP`` (Megatron-LM's ``f``),
                                         ``ReduceFromTP`` (``g``), and sequence
                                         parallelism's ``GatherFromSequence`` and
                                         ``ScatterToSequence``
``utils/model_parallel/layers``          ``ColumnParallelLinear``,
                                         ``RowParallelLinear`` (each
                                         ``from_linear(linear, group)``),
                                         ``VocabParallelEmbedding``,
                                         ``vocab_parallel_cross_entropy``
``utils/model_parallel/apply``           ``apply_tensor_parallel(model, mesh_or_group,
                                         sequence_parallel=)``: the course GPT
                                         rewritten from a table of (path, style) rows;
                                         ``sync_sequence_parallel_grads``,
                                         ``full_parameters``
``utils/model_parallel/layer_split``     the split across layers: ``split_layers``,
                                         ``LayerGroup`` (any list of modules, one
                                         group per rank, blocking send/recv,
                                         counted and timed), ``gpt_groups`` (the
                                         course GPT's embedding, blocks and head
                                         assigned to groups)
``utils/model_parallel/torch_impl``      torch's own: ``torch_tp`` / ``torch_tp_plan``
                                         (``parallelize_module`` plan),
                                         ``parallel_cross_entropy``
                                         (``loss_parallel``), ``full_state``,
                                         ``TorchLayerGroup`` (pipelining with one
                                         micro-batch), ``TPCollectiveCounter``
                                         (counts DTensor's functional collectives)
``labs/model_parallel.py``               the lab: ``--mode layers|tensor``,
                                         ``--tp-size``, ``--dp-size``,
                                         ``--sequence-parallel``, ``--impl``;
                                         ``Config``, ``ModelParallelData``,
                                         ``worker``, ``run``, ``run_many``,
                                         ``reference`` (one process), and the
                                         analytic model (``param_split``,
                                         ``activation_bytes_per_layer``,
                                         ``predicted``)
``tests/test_model_parallel.py``         the lab: both modes and impls against one
                                         process, collective counts against torch's
                                         and CommDebugMode, model-state and
                                         activation bytes against the model, bytes
                                         per layer counted on the sockets, the
                                         layers timeline, bad layouts
``bench/model_parallel.py``              scratch against torch tensor parallelism
                                         (step time), the default lab's wall time
``utils/model_parallel/figures``         the chapter's figures and widgets, pure
                                         functions of the lab's reports: the shards
                                         each rank holds, the layer split's
                                         per-rank timeline (idle shaded), memory per
                                         rank against the number of ranks, bytes per
                                         layer and step against t, activations per
                                         layer with and without SP, why TP stays in
                                         a node (modelled), runs against one process
``utils/model_parallel/exercises``       checks of exercises 4.1 (the row-parallel
                                         forward, 2 ranks against ``nn.Linear``),
                                         4.2 (``g`` as an autograd Function), 4.3
                                         (parameter and wire bytes per rank,
                                         counted on real models) and 4.4 (the
                                         layer-norm gradient bug of a
                                         sequence-parallel step); each passes on
                                         the chapter's solution and fails on
                                         plausible wrong answers, in tests/
                                         ``test_model_parallel_exercises.py``
``tests/test_model_parallel_layers.py``  each layer against ``nn.Linear``, the GPT
                                         against one process (tp 2 and 4, dp x tp
                                         2 x 2, with and without sequence
                                         parallelism), collective counts against
                                         torch's ``parallelize_module``
=======================================  ===============================================

Papers: Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", sec. 3 (the layers, ``f`` and ``g``, the
vocabulary-parallel embedding and loss); Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", sec. 4.2.2 (sequence
parallelism).
"""
