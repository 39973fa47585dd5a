"""What this project knows of the authors' code (the mmdet 2.12 fork of StageInteractor).

Depends on :mod:`stageinteractor.core` only (never on detectron2 or detrex), so the key layout,
the checkpoint conversion and the parity fixture's formula work in a core-only install, and
the workers run in the authors' environment (standard library only at their top; the training
worker also reads /proc through :mod:`stageinteractor.process_memory`, standard library too).
Importing this package imports nothing (each module is imported on its own; the workers'
environment has no scipy, for instance).

* :mod:`.layout`           the authors' decoder key layout <-> ours (fused generator blocks)
* :mod:`.checkpoint`       whole checkpoints (all backbones, neck, decoder) <-> ours, files
* :mod:`.fixture`          the parity fixture's weight/input formula and its loader
* :mod:`.reference_worker` the authors' model as a same-run timing reference: the worker that
                           runs in their environment and its line protocol
* :mod:`.reference_client` the client side of that protocol (starts the worker in the
                           authors' Python and exchanges one JSON line per call)
* :mod:`.train_worker`     their training step as a same-run timing reference (and its peak
                           memory): the second worker of ``tools/benchmark.py --train``
* :mod:`.gradient_fixture` the gradient parity fixture: its summary formula and loader
* :mod:`.gradient_worker`  one training + optimizer step of their decoder, recorded as that
                           fixture (``tools/make_official_gradient_fixture.py``)
* :mod:`.authors_model`    what the three workers share: their environment's imports (a one-line
                           exit naming the environment builder without them), their R50-100q
                           detector, the head perturbation, ``img_metas``, the JSON-line loop

Their environment: ``python scripts/build_official_env.py VENV`` (docs/OFFICIAL.md).
"""
