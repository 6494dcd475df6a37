"""Tooling: what runs beside the product, never while a member trains or a sequence is served.

The generator (``synth``), ``ablation``, ``report``, ``realism``, ``results``, ``gpu_check``,
``benchmarks`` with ``bench/``, and ``notebook_export``. ``main.py`` imports each one only inside the
command that runs it (``python main.py synth``, ``report``, ...) and no other top-level module imports
this package, so the exported Kaggle notebook, which carries the top-level modules only, leaves it out.
Importing the package does nothing.
"""
