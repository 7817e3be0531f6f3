"""facepipe: face-recognition embeddings for long-tailed identity data."""
from glob import glob

from setuptools import find_packages, setup

setup(
    name="facepipe",
    version="0.1.0",
    description="MTCNN alignment, IR-SE embedding training with imbalance-aware losses, "
    "FAISS cluster search and LFW/YTF/MegaFace-style evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["facepipe", "facepipe.*"]),
    # The YAML configs live at the top level (configs/); installed copies go to
    # <prefix>/share/facepipe/configs so `facepipe demo` finds them without the repository.
    data_files=[("share/facepipe/configs", sorted(glob("configs/*.yaml")))],
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        # The image reader of every stage (facepipe.data.image_io): header first, then pixels.
        "Pillow>=10.0",
        "albumentations>=2.0",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "imbalanced-learn>=0.12",
        "faiss-cpu>=1.7.4",
        # Only for its pretrained MTCNN weight files; facepipe never imports it.
        "facenet-pytorch>=2.5.3",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "omegaconf>=2.3",
        "pydantic>=2.5",
        "PyYAML>=6.0",
        # Output locks (align): the operating system's lock, released when a holder is killed.
        "filelock>=3.12",
    ],
    extras_require={
        # ONNX out (`facepipe export`: onnx, and onnxscript for torch's exporter) and in (ONNX Runtime
        # behind every --checkpoint); `gpu` adds onnxruntime-gpu for CUDA.
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
        "gpu": ["faiss-gpu-cu12", "onnxruntime-gpu>=1.18"],
        # The tests check the ONNX parity on CPU, so they need the onnx extra too.
        "dev": ["pytest>=8", "tensorboard", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
    },
    entry_points={"console_scripts": ["facepipe=facepipe.cli:main"]},
)
