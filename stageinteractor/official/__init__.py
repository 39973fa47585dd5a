"""What this project knows of the authors' code (the mmdet 2.12 fork of StageInteractor).

Importing this package imports nothing; each module is imported on its own.

* :mod:`.reference_client` the client side of the reference worker's line protocol (starts the
                           worker in the authors' Python and exchanges one JSON line per call)
"""
