"""Chapter 6, "SIMD and MIMD": the map of its code.

===============================  =======================================================
``labs/simd_mimd.py``            the lab: SIMD throughput (Python loop, one-element
                                 torch ops, one vectorised op), threads against
                                 processes, SPMD against MPMD traced, GPU divergence
``utils/simd_mimd/machine``      this CPU's vector width, clock and cores as read, and
                                 the modelled peak FLOP/s
``utils/simd_mimd/kernels``      the three implementations, their timing (medians),
                                 the GPU divergence kernel and its recorded figures
                                 (``gpu_recorded.json``, written only from a GPU run)
``utils/simd_mimd/amdahl``       Amdahl's and Gustafson's laws; serial fractions
                                 fitted to timings
``utils/simd_mimd/trace``        ``CodePath``: the calls and ops a rank executes;
                                 SPMD or MPMD from the recorded streams
``utils/simd_mimd/steps``        the traced steps: data-parallel, and a pipeline
                                 with one stage per rank
``utils/simd_mimd/taxonomy``     Flynn's classes and the course's parallelisms placed,
                                 as data
``utils/simd_mimd/figures``      throughput bars, speedup with the Amdahl curve, the
                                 2 x 2 taxonomy, the ranks' paths, divergence bars
``utils/simd_mimd/exercises``    checks for the chapter's exercises
``tests/test_simd_mimd.py``      fits, taxonomy, lab reports, exercise checks, the
                                 GPU kernel (skipped without CUDA)
``bench/simd_mimd.py``           the throughputs and speedups, printed
===============================  =======================================================
"""
