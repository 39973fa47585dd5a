# DINO-R50-4scale, 12 epochs, + CSLA + DCA (paper Tab. 4 row 3: 50.0 AP).
#
# The baseline is detrex's own config, loaded unchanged from the detrex checkout:
#   projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py
# Model changes vs the baseline: the criterion's _target_ (use_csla keeps the matcher, the
# expanded weight_dict and every other field), the dual cross-attention decoder, and
# DINO -> DeviceAgnosticDINO.

from stageinteractor.detrex_ext import use_csla, use_dca, use_device_agnostic_dino
from stageinteractor.detrex_ext.detrex_configs import load_detrex_project_config

_base = load_detrex_project_config("projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py")

dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train
model = _base.model

# cross-stage label assignment: scope [i-1, L], IoU >= 0.5, normaliser max(sum T, #pos)
model = use_csla(model, scope=(-1, None), iou_threshold=0.5, cls_norm="max_positives")

# dual cross-attention: two deformable cross-attentions per decoder layer
model = use_dca(model, num_cross_attn=2)

# detrex DINO with device-agnostic denoising queries (identical on CUDA; trains on CPU)
model = use_device_agnostic_dino(model)

# outputs of this run
train.output_dir = "./output/csla/dino_r50_4scale_12ep_csla_dca"
dataloader.evaluator.output_dir = train.output_dir
