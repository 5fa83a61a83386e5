"""Distributed continual learning with data-agnostic consolidation.

Carta, Cossu, Lomonaco, Bacciu, van de Weijer, "Projected Latent Distillation for
Data-Agnostic Consolidation in Distributed Continual Learning" (arXiv 2303.15888).

- ``scenario``: Split (class-incremental) task streams dealt to self-centred agents.
- ``proxy``: the proxy data of consolidation (crops of one image, noise, another
  data set).
- ``consolidate``: DAC (double logit distillation + projected latent distillation).
- ``run``: the task-after-task loop and its baselines; ``config``: fields.

Run: ``python scripts/run.py --config=configs/continual_digits.py``.
"""
