# LR schedules (spec §6) in iterations at total batch 16 on COCO train2017:
# 1 epoch = 7330 iterations (117,266 images with annotations / 16, rounded up).
# Step decay x0.1; linear warm-up from 0.001 * lr over 500 iterations (1000 for Swin).
# The multiplier is evaluated at iter / train.max_iter, so shrinking max_iter keeps the steps
# at the same relative position.
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

ITERS_PER_EPOCH = 7330


def _multistep(epochs, steps, warmup_iters=500):
    total = epochs * ITERS_PER_EPOCH
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01],
            milestones=[s * ITERS_PER_EPOCH for s in steps],
            num_updates=total,
        ),
        warmup_length=warmup_iters / total,
        warmup_method="linear",
        warmup_factor=0.001,
    )


# 1x: 12 epochs (87,960 iters), steps at epochs 8 and 11
lr_multiplier_1x = _multistep(12, [8, 11])
# 2x: 24 epochs (175,920 iters), steps [16, 22]
lr_multiplier_2x = _multistep(24, [16, 22])
# 3x mstrain without crop: 36 epochs (263,880 iters), steps [27, 33]
lr_multiplier_3x = _multistep(36, [27, 33])
# 3x 300-query crop-mstrain (Tab. 3 models): 36 epochs, steps [24, 33]
lr_multiplier_3x_crop = _multistep(36, [24, 33])
# Swin-S variant: 1000 warm-up iterations
lr_multiplier_3x_crop_swin = _multistep(36, [24, 33], warmup_iters=1000)

# Demo (synthetic dataset, CPU, a few hundred iterations): the COCO warm-up of 500 iterations
# would shrink to ~3 iterations at max_iter=500 (the multiplier scales with max_iter), so this
# one is written in fractions of the run: 5% linear warm-up, x0.1 at 80% and 95%.
lr_multiplier_demo = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[800, 950], num_updates=1000),
    warmup_length=0.05,
    warmup_method="linear",
    warmup_factor=0.001,
)
