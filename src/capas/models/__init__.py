"""From a spec to a torch.nn.Module, and the Keras-style summary."""

from capas.models.build import CapasNet, build_model
from capas.models.summary import Summary, summarize

__all__ = ["CapasNet", "Summary", "build_model", "summarize"]
