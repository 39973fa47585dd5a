"""The measuring library behind ``tools/benchmark.py``, ``tools/gpu_check.py``,
``tools/profile_decoder.py`` and ``tools/bench_csla_detrex.py`` (the tools are command lines
over it). Importing this package imports nothing; each module is imported on its own, and
torch / detectron2 / detrex only inside the functions that need them.

* :mod:`.stats`     spread (median, quartiles, ...) and ratios of repeated timings
* :mod:`.load`      machine load during a measurement (load average, other processes' CPU share)
* :mod:`.stress`    CPU-bound stress workers and the slowdown summary
* :mod:`.timing`    interleaved (ABBA) timing of several callables; on/off timing of a switch
* :mod:`.steps`     the timed calls: inference, training step (training's AMP), decoder alone
* :mod:`.models`    LazyConfig models with random weights, synthetic batches, parameter counts
* :mod:`.counts`    FLOPs (fvcore), the decoder's aten calls and host syncs of one call
* :mod:`.roofline`  the in-run sgemm multiply-add rate and achieved fractions
* :mod:`.memory`    peak training memory (fresh CPU processes; CUDA allocator peak)
* :mod:`.report`    derived figures (A/B ratios, vs the authors') and the printed summary
* :mod:`.runner`    the run of ``tools/benchmark.py`` (build, count, time, memory, stress, JSON)
* :mod:`.gpu_check` steps, budget and verdicts of ``tools/gpu_check.py``
* :mod:`.decoder_profile` torch.profiler tables of the decoder (``tools/profile_decoder.py``)
* :mod:`.csla_cost` CSLA's extra cost in detrex's DINO (``tools/bench_csla_detrex.py``)

The client of the authors' reference worker is :mod:`stageinteractor.official.reference_client`.
"""
