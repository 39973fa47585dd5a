"""StageInteractor with Swin-S (paper Tab. 3).

Swin-S: embed 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7, drop path 0.2 on the
attention branch only (released mmcv-1.3.3 quirk), a LayerNorm on every output, nothing frozen.
Outputs res2..res5 with 96/192/384/768 channels, so the neck's input channels change.
"""
from detectron2.config import LazyCall as L

from stageinteractor.d2.backbone.swin import SwinTransformer

from .stageinteractor_r50 import model

model.backbone = L(SwinTransformer)(
    embed_dim=96,
    depths=(2, 2, 18, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.2,
    drop_path_on_mlp=False,
    out_indices=(0, 1, 2, 3),
    freeze_at=0,
)
model.neck.in_channels = (96, 192, 384, 768)
