"""aglcl: continual fine-tuning of causal LMs, with attribution-guided protection of old skills.

Run ``aglcl --help``. The importable core is :func:`aglcl.engine.runner.run_train`.
"""

__version__ = "0.1.0"
