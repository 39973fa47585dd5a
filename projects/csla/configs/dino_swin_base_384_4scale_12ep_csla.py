# DINO-Swin-B-384-4scale, 12 epochs, + CSLA (paper Tab. 5: 56.2 AP; detrex baseline 55.8).
#
# The baseline is detrex's own config, loaded unchanged from the detrex checkout:
#   projects/dino/configs/dino-swin/dino_swin_base_384_4scale_12ep.py
# Model changes vs the baseline: the criterion's _target_ (use_csla keeps the matcher, the
# expanded weight_dict and every other field), and DINO -> DeviceAgnosticDINO.

from stageinteractor.detrex_ext import use_csla, use_device_agnostic_dino
from stageinteractor.detrex_ext.detrex_configs import load_detrex_project_config

_base = load_detrex_project_config(
    "projects/dino/configs/dino-swin/dino_swin_base_384_4scale_12ep.py"
)

dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train
model = _base.model

# cross-stage label assignment: scope [i-1, L], IoU >= 0.5, normaliser max(sum T, #pos)
model = use_csla(model, scope=(-1, None), iou_threshold=0.5, cls_norm="max_positives")

# detrex DINO with device-agnostic denoising queries (identical on CUDA; trains on CPU)
model = use_device_agnostic_dino(model)

# outputs of this run
train.output_dir = "./output/csla/dino_swin_base_384_4scale_12ep_csla"
dataloader.evaluator.output_dir = train.output_dir
