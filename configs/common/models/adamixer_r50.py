"""AdaMixer baseline, ResNet-50, 100 queries: paper Tab. 6 first row (42.6 AP at 1x).

Not a separate code path: the SAME classes as StageInteractor with the baseline setting
(``stageinteractor.core.switches.ADAMIXER_BASELINE``):

* AdaMixer's 3-D sampler (one (dx, dy, dz) per point) and 2^z box refinement;
* no filter reuse (no adapters, no static mixing), no dynamic biases;
* 64 sampling points at the first stage, 32 afterwards (Tab. 18 "baseline 64");
* CSLA off: one-hot targets of each stage's own Hungarian matches.
"""
from .stageinteractor_r50 import model

model.decoder.sampler = "3d"
model.decoder.refine_mode = "2z"
model.decoder.dynamic_bias = False
model.decoder.first_stage_points = 64
model.decoder.reuse = False

model.criterion.assigner.enabled = False
