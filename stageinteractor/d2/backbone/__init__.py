"""Backbones of StageInteractor (detectron2 ``Backbone`` subclasses).

All of them return ``{"res2", "res3", "res4", "res5"}`` (strides 4/8/16/32):

* :class:`ResNet` (:func:`build_resnet50`, :func:`build_resnet101`,
  :func:`build_resnext101_32x4d_dcn`): channels 256/512/1024/2048;
* :class:`SwinTransformer` (:func:`build_swin_small`): channels 96/192/384/768;
* :class:`TinyBackbone` (``tiny.py``): a small conv net for the CPU demo / fast tests.

ImageNet initialisation: :mod:`stageinteractor.d2.checkpoint`.
"""
from .resnet import (
    BottleneckBlock,
    Conv2dNorm,
    DeformConv2d,
    EvalBatchNorm2d,
    ResNet,
    ResNetStem,
    build_resnet50,
    build_resnet101,
    build_resnext101_32x4d_dcn,
)
from .swin import SwinTransformer, build_swin_small, build_swin_tiny
from .tiny import TinyBackbone

__all__ = [
    "BottleneckBlock",
    "Conv2dNorm",
    "DeformConv2d",
    "EvalBatchNorm2d",
    "ResNet",
    "ResNetStem",
    "SwinTransformer",
    "TinyBackbone",
    "build_resnet50",
    "build_resnet101",
    "build_resnext101_32x4d_dcn",
    "build_swin_small",
    "build_swin_tiny",
]
