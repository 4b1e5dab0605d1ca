"""Ray Job entry points, one per training stage: ``python -m jobs.train_<stage> ...``.

Each is a thin wrapper over :mod:`dalle2.train` (the same as ``dalle2 train <stage>``), so that
``ray job submit --working-dir . -- python -m jobs.train_decoder --config ...`` runs on a cluster.
Configs for the tiny CPU preset and for GPU clusters are in ``jobs/configs``.
"""
