"""loralib: LoRA layers for PyTorch, a drop-in for Microsoft's ``loralib==0.1.2`` with its known bugs fixed."""
name = "lora"

from .version import __version__  # noqa: F401
from .layers import *  # noqa: F401,F403
from .utils import *  # noqa: F401,F403
from .adapters import (add_adapter, batch_adapters, delete_adapter, disable_adapters, list_adapters,  # noqa: F401
                       set_adapter)
from .injection import inject, merge_and_unload  # noqa: F401
from .serialization import AdapterError, load_adapter, save_adapter  # noqa: F401
