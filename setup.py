from setuptools import find_packages, setup

setup(
    name="msn_ds",
    version="0.1.0",
    description="Masked Siamese Networks (MSN) pretraining at scale with DeepSpeed",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["msn_ds", "msn_ds.*", "eval", "eval.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.16",
        "timm>=1.0",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "numpy",
        "pillow",
    ],
    extras_require={
        # DALI's CUDA major must match torch's: the pinned torch 2.14.1 (and torch 2.11 on the
        # GPU nodes) are cu13 builds, so nvidia-dali-cuda130 (for a cu12 torch: -cuda120)
        "dali": ["nvidia-dali-cuda130"],
        "eval": ["cyanure"],
        "demo": ["mlxtend>=0.23"],
        # ViTMSNModel for scripts/export_hf.py folders; 4.45 is the first to resample position
        # embeddings as msn_ds does (size=, bicubic); 4.45.2 and 5.24 checked
        "hf": ["transformers>=4.45"],
        # DALI runs its tests in CPU mode (device_id=None); the CUDA 13 wheel works without a GPU
        # cyanure: the reference's solver, for the solver-equivalence test
        # transformers: tests/test_hf.py (export/import round trips, no download)
        # pytest-xdist: make test-fast runs its in-process tests on 2 workers
        # webdataset: shards written by its ShardWriter read as ours (tests/test_shards.py)
        "test": ["pytest>=7", "pytest-xdist>=3", "mlxtend>=0.23", "nvidia-dali-cuda130",
                 "cyanure", "transformers>=4.45", "webdataset>=0.2"],
    },
)
