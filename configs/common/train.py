# Common `train` settings (detrex conventions; read by tools/train_net.py).
import torch

train = dict(
    output_dir="./output",
    # "" = random init; ImageNet weights are set per model config
    init_checkpoint="",
    # 1x COCO schedule at total batch 16 (see configs/common/schedule.py: 12 epochs x 7330)
    max_iter=87960,
    # no AMP in the official recipe (FP32); on CUDA: float16 + GradScaler, on CPU: bfloat16
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    # periodic checkpoints model_{iter:07d}.pth (written atomically) + model_final.pth
    checkpointer=dict(period=7330, max_to_keep=100),
    eval_period=7330,
    log_period=20,
    device="cuda" if torch.cuda.is_available() else "cpu",
    # >= 0: deterministic run (data order, augmentation, model RNG per iteration)
    seed=42,
    # spec §6: global L2 gradient norm <= 1.0
    clip_grad=dict(enabled=True, params=dict(max_norm=1.0, norm_type=2)),
    # fast_dev_run: max_iter=20, eval_period=10, log_period=1
    fast_dev_run=dict(enabled=False),
    model_ema=dict(enabled=False, decay=0.999, device="", use_ema_weights_for_eval_only=False),
    wandb=dict(enabled=False, params=dict()),
    # scan the datasets named in `dataloader` before training (tools/train_net.py)
    validate_data=True,
    cudnn_benchmark=False,
)
