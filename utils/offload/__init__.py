"""Chapter 3, CPU offloading: the map of its code.

=============================  ========================================================
``labs/offload.py``            the lab: ``--offload {none, optimizer, optimizer+grads,
                               params, activations, recompute}``, fp32 or mixed
                               precision, the course's pieces or torch's, an optional
                               device budget (``--device-mem-mb``)
``utils/offload/optim``        ``OffloadOptimizer``: ZeRO-Offload over ZeRO-2 (fp32
                               master and states on the host, the step there, 16-bit
                               gradients down and parameters up), any optimizer, the
                               one-step delayed update
``utils/offload/adam``         ``HostAdamW``: the vectorised CPU Adam of the host step
``utils/offload/params``       ``ParamOffload``: the ``offload=`` hook that keeps
                               ``utils.zero.fsdp.FullyShardedModule``'s shards on the
                               host, fetched per unit (ZeRO-Infinity, FSDP2's
                               ``CPUOffloadPolicy``)
``utils/offload/activations``  ``apply_activations``: none / offload (saved-tensor
                               hooks; ``save_on_cpu``) / recompute (``recompute``;
                               ``torch.utils.checkpoint``) on any module's units
``utils/offload/transfer``     ``Transfers``: every host <-> device copy, counted and
                               timed (pinned, side stream on CUDA); ``pcie_seconds``;
                               ``CrossDeviceCopies`` for torch's copies
``utils/offload/accounting``   the formulas: device and host bytes per mode, bytes
                               moved, activations per layer, ZeRO-Offload's Table 1
``utils/offload/figures``      device beside host per mode, the step time split, the
                               fits / does-not-fit sweep with the paper's 13B example
``utils/offload/exercises``    checks for the chapter's exercises
``tests/test_offload.py``      every mode against no offload; bytes against the
                               formulas (measured and counted); the budget; the pools
``bench/offload.py``           ``HostAdamW`` against ``Adam(foreach=True)``; the lab
=============================  ========================================================

The memory ledger's device and host pools and the device budget are shared
(``utils.memory``); the sharding comes from chapter 2 (``utils.zero``,
``utils.flat``).
"""
