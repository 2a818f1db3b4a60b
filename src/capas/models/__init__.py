"""From a spec to a torch.nn.Module: the layers' modules, pretrained backbones, the network."""

from capas.models.backbones import BACKBONES, build_backbone, preprocess_for
from capas.models.build import CapasNet, build_model

__all__ = ["BACKBONES", "CapasNet", "build_backbone", "build_model", "preprocess_for"]
