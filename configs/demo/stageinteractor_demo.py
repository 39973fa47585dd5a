# StageInteractor on the synthetic CPU demo dataset (5 shape classes, 128-192 px images).
# Not a paper setting: a tiny from-scratch backbone and a small decoder with the SAME stage
# structure and switches as the paper model (grouped sampler, filter reuse from stage 2,
# adapters + static channel-spatial mixing, CSLA). Requirement: AP50 >= 50 on the val split
# within 15 min (training + evaluation) on 2 idle CPU cores. Measured (tools/run_demo.py, one
# torch thread, 2500 iterations, fresh clone, quiet machine): `make demo` 4 min 39 s in all
# (4.2 min of training), AP 67.5 / AP50 86.7 on the 100 val images.
#
#   python tools/run_demo.py            # = make demo: train, evaluate, draw (recommended)
#   OMP_NUM_THREADS=1 python tools/train_net.py --config-file configs/demo/stageinteractor_demo.py
#
# Tuning knobs (all plain overrides): train.max_iter, optimizer.lr,
# dataloader.train.total_batch_size, model.decoder.num_queries / num_stages / query_dim,
# model.backbone.widths / depth.
from detectron2.config import LazyCall as L

from stageinteractor.d2.backbone.tiny import TinyBackbone

from ..common.data.demo import dataloader
from ..common.models.stageinteractor_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_demo as lr_multiplier  # fractions of max_iter
from ..common.train import train

# ---- model: tiny backbone (strides 4..32), 64-d decoder, 4 stages, 20 queries, 5 classes.
# Sized for 2 CPU cores: ~0.11 CPU-seconds per iteration (batch 8, short side 96-128) with ONE
# torch thread (tools/run_demo.py --threads 1; two threads are slower on a shared machine).
model.backbone = L(TinyBackbone)(widths=(16, 32, 64, 128), depth=1, gn_groups=8)
model.neck.in_channels = (16, 32, 64, 128)
model.neck.out_channels = 64
model.neck.num_groups = 8
model.decoder.num_classes = 5
model.decoder.num_queries = 20  # at most 4 objects per image
model.decoder.num_stages = 4  # stages 2 and 3 reuse filters (reuse_start = 2)
model.decoder.query_dim = 64
model.decoder.num_heads = 4
model.decoder.num_groups = 4  # 16 channels per group
model.decoder.ffn_dim = 256
model.decoder.first_stage_points = 32  # the smallest allowed P_in of stage 0 (Tab. 18)
model.decoder.num_points = 8
model.decoder.out_points = 16
model.max_detections_per_image = 20

# ---- data: the demo images (128-192 px) shrunk to short side 96-128 for training, 112 at test
dataloader.train.mapper.augmentations.ms_short_edges = (96, 112, 128)
dataloader.train.mapper.augmentations.max_size = 192
dataloader.train.total_batch_size = 8
dataloader.test.mapper.augmentations.short_edge = 112
dataloader.test.mapper.augmentations.max_size = 192

# ---- optimisation: from scratch, so a larger lr than the paper's 2.5e-5 (ImageNet init);
# schedule in fractions of max_iter: 5% linear warm-up, x0.1 at 80% and 95%
optimizer.lr = 5e-4
train.max_iter = 2500  # 20k images = 33 epochs of the 600 train images
train.device = "cpu"
train.init_checkpoint = ""
train.output_dir = "./output/demo/stageinteractor"
train.eval_period = 2500  # evaluate once, at the end (evaluation is part of the time budget)
train.checkpointer.period = 1250
train.log_period = 20
train.seed = 42
dataloader.evaluator.output_dir = train.output_dir
