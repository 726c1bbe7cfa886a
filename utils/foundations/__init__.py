"""Chapter 0, "Why one device is not enough": the map of its code.

=============================  =========================================================
``labs/foundations.py``        the lab: memory anatomy of a step, the five collectives,
                               the all-reduce bandwidth sweep (what runs in each rank)
``utils/foundations/figures``  the "does it fit" calculator, the anatomy bars, the
                               collective grids, the bus-bandwidth plot with its
                               alpha-beta fit
``utils/foundations/exercises``  checks for the chapter's exercises
``tests/test_foundations.py``  the lab against the formulas; figures; exercise checks
``bench/foundations.py``       the default lab's wall time and the bandwidth sweep
=============================  =========================================================

Shared machinery it introduces lives in ``utils/``: the launcher (``utils.launch``),
the memory ledger (``utils.memory``) and its formulas (``utils.memory_model``), the
collectives and their byte accounting (``utils.comm``), the hardware catalogue
(``utils.hardware``).
"""
