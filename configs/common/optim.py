# Optimisers (spec §6): AdamW lr 2.5e-5, betas (0.9, 0.999), eps 1e-8, weight decay 1e-4 on ALL
# parameters (backbone, norms, biases, embeddings), no lr multipliers. Total batch 16.
# build_adamw = torch.optim.AdamW, fused where the torch version supports it for the device
# (fused="auto"; the same update up to float round-off; fused=False for the per-tensor loop).
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from stageinteractor.d2.engine import build_adamw, swin_optimizer_params

AdamW = L(build_adamw)(
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
    fused="auto",
)

# Swin-S (spec §6 paramwise_cfg): decay_mult 0 for every parameter whose name contains
# "absolute_pos_embed", "relative_position_bias_table" or "norm", matched (as mmcv does) by
# substring of the parameter's name *in the authors' model*. That catches all Swin norms and the
# decoder LayerNorms the authors name attention_norm / ffn_norm / Wv_layer_norm (ours:
# attention_norm, ffn_norm, mixing.out_norm). Decayed as in the authors' run: the decoder
# LayerNorms that we call cls_norm / reg_norm (theirs: cls_fcs.1 / reg_fcs.1, numeric names),
# the neck GroupNorm (gn_out) and iof_tau, whose names do not contain those substrings.
# (stageinteractor.d2.engine.swin_optimizer_params; two param groups, decay / no decay)
AdamW_swin = L(build_adamw)(
    params=L(swin_optimizer_params)(base_lr="${..lr}", weight_decay="${..weight_decay}"),
    lr=2.5e-5,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-4,
    fused="auto",
)
