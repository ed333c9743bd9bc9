"""Build script for aropd-kernels.

torch is a runtime dependency only: it is never imported here and is not a build requirement, so
`pip install .` never downloads or rebuilds torch.
"""

from setuptools import find_packages, setup

setup(
    name="aropd-kernels",
    version="0.1.0",
    description="Fused anchored-residual divergence kernels for privileged on-policy distillation (AR-OPD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["aropd_kernels", "aropd_kernels.*"]),
    install_requires=[
        "torch>=2.13",  # tested: 2.13.0 (custom_op, register_autograd, torch.compile of the op)
        "numpy>=1.24",
        "triton>=3.9; platform_system == 'Linux'",  # tested: 3.9.0 (kernels, interpreter, AOT compile)
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60"],
        "examples": ["transformers>=4.50", "accelerate>=1.0"],  # tested: 5.24.0, 1.15.0 (Trainer needs accelerate)
    },
)
