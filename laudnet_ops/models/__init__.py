"""LAUD models whose backbones load torchvision's weights: ResNet-50/101, RegNetY-400MF/800MF."""

from ._common import load_backbone
from .regnet import LaudRegNetY, laud_regnety_400mf, laud_regnety_800mf
from .resnet import LaudResNet, laud_resnet50, laud_resnet101

__all__ = ["LaudResNet", "LaudRegNetY", "laud_resnet50", "laud_resnet101", "laud_regnety_400mf",
           "laud_regnety_800mf", "load_backbone"]
