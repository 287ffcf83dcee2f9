"""Make the model traceable (experts as one custom op) and capture the decoder step."""

from . import gqa  # noqa: F401  (registers the op and the ort form's attention)
from .experts_op import traceable
from .trace import Captured, capture

__all__ = ["Captured", "capture", "traceable"]
