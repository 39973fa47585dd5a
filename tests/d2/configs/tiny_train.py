# A tiny detector config for the train_net tests: the real data pipeline (the demo dataset, or
# the COCO json given by $TINY_JSON / $TINY_IMAGES), the real common train/optim/schedule
# configs, and a ~2k-parameter model that speaks the detectron2 model interface.
import os
import time

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.structures import Boxes, Instances
from torch import nn

from stageinteractor.d2.data import register_coco_json

_COMMON = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "common")


class TinyDetector(nn.Module):
    """Predicts one box (normalised cxcywh of the mean gt box) and class scores from an
    8x8-pooled image. Training: L1 box loss + cross-entropy of the classes present; a dropout
    layer makes training depend on the torch RNG."""

    def __init__(self, num_classes=5, step_sleep=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.step_sleep = step_sleep
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(),
                                  nn.Dropout(0.2))
        self.box = nn.Linear(16, 4)
        self.cls = nn.Linear(16, num_classes)
        self.norm = nn.LayerNorm(16)

    def _features(self, batched_inputs):
        x = torch.stack([nn.functional.adaptive_avg_pool2d(d["image"].float()[None] / 255.0,
                                                           (8, 8))[0] for d in batched_inputs])
        return self.norm(self.body(x))

    def forward(self, batched_inputs):
        if self.step_sleep and self.training:
            time.sleep(self.step_sleep)
        f = self._features(batched_inputs)
        boxes, logits = self.box(f).sigmoid(), self.cls(f)
        if self.training:
            tgt_box, tgt_cls = [], []
            for d in batched_inputs:
                inst = d["instances"]
                h, w = inst.image_size
                b = inst.gt_boxes.tensor
                if len(b) == 0:
                    tgt_box.append(torch.tensor([0.5, 0.5, 0.5, 0.5]))
                    tgt_cls.append(torch.zeros(self.num_classes))
                    continue
                b = b / torch.tensor([w, h, w, h], dtype=b.dtype)
                cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                                      b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
                tgt_box.append(cxcywh.mean(0))
                t = torch.zeros(self.num_classes)
                t[inst.gt_classes] = 1.0
                tgt_cls.append(t)
            tgt_box, tgt_cls = torch.stack(tgt_box), torch.stack(tgt_cls)
            return {"loss_box": (boxes - tgt_box).abs().mean(),
                    "loss_cls": nn.functional.binary_cross_entropy_with_logits(logits, tgt_cls)}
        out = []
        for d, b, s in zip(batched_inputs, boxes, logits.sigmoid()):
            H, W = d["height"], d["width"]
            cx, cy, bw, bh = b[0] * W, b[1] * H, b[2] * W, b[3] * H
            inst = Instances((H, W))
            box = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            inst.pred_boxes = Boxes(box[None].repeat(self.num_classes, 1))
            inst.scores = s
            inst.pred_classes = torch.arange(self.num_classes)
            out.append({"instances": inst})
        return out


model = L(TinyDetector)(num_classes=5, step_sleep=0.0)

dataloader = LazyConfig.load(os.path.join(_COMMON, "data", "demo.py")).dataloader
if os.environ.get("TINY_JSON"):
    dataloader.train.dataset.names = register_coco_json(
        "tiny_custom_train", os.environ["TINY_JSON"], os.environ["TINY_IMAGES"])
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = int(os.environ.get("TINY_WORKERS", "0"))
dataloader.evaluator.output_dir = None

optimizer = LazyConfig.load(os.path.join(_COMMON, "optim.py")).AdamW
optimizer.lr = 1e-2
lr_multiplier = LazyConfig.load(os.path.join(_COMMON, "schedule.py")).lr_multiplier_1x

train = LazyConfig.load(os.path.join(_COMMON, "train.py")).train
train.device = "cpu"
train.max_iter = 12
train.checkpointer.period = 4
train.eval_period = 0
train.log_period = 1
train.seed = 7
