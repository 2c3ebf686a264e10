from pathlib import Path
import re

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("loralib/__init__.py").read_text()).group(1)

setup(
    name="loralib",
    version=version,
    description="LoRA layers for PyTorch: a drop-in, bug-fixed Microsoft loralib with adapters and injection",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["loralib", "loralib.*"]),
    python_requires=">=3.9",
    # torch is the only runtime dependency; a range so an installed CPU build is kept, never replaced.
    install_requires=["torch>=2.0"],
    license="MIT",
)
