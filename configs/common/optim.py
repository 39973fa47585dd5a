# Optimisers (spec §6): AdamW lr 2.5e-5, betas (0.9, 0.999), eps 1e-8, weight decay 1e-4 on ALL
# parameters (backbone, norms, biases, embeddings), no lr multipliers. Total batch 16.
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from stageinteractor.d2.engine import swin_optimizer_params

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # model is set by tools/train_net.py: cfg.optimizer.params.model = model
        base_lr="${..lr}",
        weight_decay_norm="${..weight_decay}",  # norms are decayed too (no exception)
        weight_decay_bias="${..weight_decay}",
    ),
    lr=2.5e-5,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-4,
)

# Swin-S (spec §6 paramwise_cfg): decay_mult 0 for every parameter whose name contains
# "absolute_pos_embed", "relative_position_bias_table" or "norm" (mmcv substring matching,
# which also catches the decoder LayerNorms attention_norm / ffn_norm / Wv_layer_norm). The
# LayerNorms inside cls_fcs/reg_fcs (numeric names), the neck GroupNorm (gn_out) and iof_tau
# keep their decay, because their names do not contain those substrings.
# (stageinteractor.d2.engine.SWIN_NO_DECAY_KEYS; two param groups, decay / no decay)
AdamW_swin = L(torch.optim.AdamW)(
    params=L(swin_optimizer_params)(base_lr="${..lr}", weight_decay="${..weight_decay}"),
    lr=2.5e-5,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-4,
)
