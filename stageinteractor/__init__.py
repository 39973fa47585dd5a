"""StageInteractor: query-based detection with cross-stage interaction (ICCV 2023).

Three layers, each importable on its own:

* ``stageinteractor.core``       -- pure PyTorch (+ scipy): decoder, matcher, losses, CSLA.
                                    Never imports detectron2 or detrex.
* ``stageinteractor.d2``         -- detectron2 layer: meta-architecture, backbones, neck, data,
                                    checkpoint conversion helpers.
* ``stageinteractor.detrex_ext`` -- detrex layer: CSLA criteria wrapping detrex's criteria and
                                    the one-line ``use_csla`` config swap.
* ``stageinteractor.official``   -- the authors' code as data: checkpoint key layout and
                                    conversion, parity fixture formula, reference worker.
                                    Depends on the core only.
"""

__version__ = "0.1.0"
