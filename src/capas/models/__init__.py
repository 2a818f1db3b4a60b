"""From a spec to a torch.nn.Module, and the Keras-style summary."""

from capas.models.backbones import BACKBONES, build_backbone, preprocess_for
from capas.models.build import CapasNet, build_model
from capas.models.summary import Summary, summarize

__all__ = ["BACKBONES", "CapasNet", "Summary", "build_backbone", "build_model", "preprocess_for", "summarize"]
