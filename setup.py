from pathlib import Path
import re

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("loralib/version.py").read_text()).group(1)

setup(
    name="loralib",
    version=version,
    description="LoRA layers for PyTorch: a drop-in, bug-fixed Microsoft loralib with adapters and injection",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["loralib", "loralib.*"]),
    python_requires=">=3.9",
    # torch is the only runtime dependency; a range so an installed CPU build is kept, never replaced.
    # 2.5 is the oldest on which the library's tests pass (tests/test_*.py and tests/reliability, run on torch 2.5.0
    # and 2.5.1 with transformers 4.57.6 / peft 0.21.2: transformers 5 needs torch 2.6). The layers use
    # nn.Module.register_state_dict_post_hook and register_load_state_dict_pre_hook, public from 2.5: on 2.4.1 building
    # any LoRA layer raises AttributeError.
    install_requires=["torch>=2.5"],
    license="MIT",
)
