"""What this project knows of the authors' code (the mmdet 2.12 fork of StageInteractor).

Depends on :mod:`stageinteractor.core` only (never on detectron2 or detrex), so the key layout,
the checkpoint conversion and the parity fixture's formula work in a core-only install, and
the reference worker runs in the authors' environment. Importing this package imports nothing
(each module is imported on its own; the worker's environment has no scipy, for instance).

* :mod:`.layout`           the authors' decoder key layout <-> ours (fused generator blocks)
* :mod:`.checkpoint`       whole checkpoints (all backbones, neck, decoder) <-> ours, files
* :mod:`.fixture`          the parity fixture's weight/input formula and its loader
* :mod:`.reference_worker` the authors' model as a same-run timing reference: the worker that
                           runs in their environment and its line protocol
* :mod:`.reference_client` the client side of that protocol (starts the worker in the
                           authors' Python and exchanges one JSON line per call)

Their environment: ``python scripts/build_official_env.py VENV`` (docs/OFFICIAL.md).
"""
