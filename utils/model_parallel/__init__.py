"""Chapter 3 (to come), "Tensor parallelism": the map of its code.

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
``tests/test_model_parallel_layers.py``  each layer against ``nn.Linear``, the GPT
                                         against one process (tp 2 and 4, dp x tp
                                         2 x 2, with and without sequence
                                         parallelism), collective counts against
                                         torch's ``parallelize_module``
=======================================  ===============================================

Still to come: the lab ``labs/model_parallel.py``, the chapter
(``chapters/NN-model-parallel.md``), its exercises and figures, ``bench/
model_parallel.py`` and ``tests/test_model_parallel.py``.

Papers: Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", sec. 3 (the layers, ``f`` and ``g``, the
vocabulary-parallel embedding and loss); Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", sec. 4.2.2 (sequence
parallelism).
"""
