"""loralib: LoRA layers for PyTorch, a drop-in for Microsoft's ``loralib==0.1.2`` with its known bugs fixed."""
name = "lora"
__version__ = "0.2.0"

from .layers import *  # noqa: F401,F403
from .utils import *  # noqa: F401,F403
