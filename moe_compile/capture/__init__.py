"""Make the model traceable (experts as one custom op) and capture the decoder step."""

from .experts_op import traceable
from .trace import Captured, capture

__all__ = ["Captured", "capture", "traceable"]
