"""r1zero: R1-Zero-style reasoning training (MoE pretraining -> GRPO) as a Kubeflow pipeline.

The core library imports neither ``kfp`` nor ``kubernetes``; only :mod:`r1zero.cluster` talks to
a cluster. See README.md for ``make run`` and ``make test``.
"""

__version__ = "0.1.0"
