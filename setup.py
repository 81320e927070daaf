"""fdh_jax: FDH-MFE fine-grained deep hashing in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="fdh_jax",
    version="0.1.0",
    description="FDH-MFE fine-grained image retrieval with compact binary hash codes, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fdh_jax", "fdh_jax.*"]),
    package_data={"fdh_jax.serving": ["page.html"]},
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12",
        "optax>=0.2.4",
        "jraph>=0.0.6.dev0",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # undeclared dependency of tensorflow-datasets 4.9.x
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "tflite>=2.10",
        "scipy>=1.11",
        "numba>=0.61",  # CPU search kernels: fdh_jax/search/
        "tensorboard>=2.15",  # event files only (no TensorFlow): fdh_jax/training/summaries.py
    ],
    extras_require={
        # `--mode=serve`: the web service (fdh_jax/serving/service.py).
        "serve": ["fastapi>=0.110", "uvicorn[standard]>=0.29", "python-multipart>=0.0.9"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on two workers (pyproject.toml's addopts)
            "ruff>=0.6",
            "faiss-cpu>=1.8",
            "huggingface_hub>=0.20",
            "fastapi>=0.110",
            "uvicorn[standard]>=0.29",
            "python-multipart>=0.0.9",
            "httpx>=0.27",
            "psutil>=5.9",  # tests/test_service.py waits until the server holds a request
            "selenium>=4.20",  # drives Debian's chromium + chromium-driver (.ci/run installs them)
        ],
        # TensorFlow is only needed to *build* TFDS datasets, never at run time.
        "tfds-build": ["tensorflow"],
        # `--config.model.pretrained=hf://...` (the dataset configs' default ImageNet ResNet-50).
        "hf": ["huggingface_hub>=0.20"],
    },
)
