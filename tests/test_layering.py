"""msn_ds's imports point downward, so a piece can be understood, tested and reused without
the pieces above it: the AST of every module (function-level imports included) is checked
against the ordered layers below, and msn_ds never imports eval, scripts or train."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "msn_ds"

# Bottom to top; a module may import its own layer or a lower one. Names are modules or
# packages under msn_ds, the longest that matches classifies (io.safe_load before io); a
# name absent from the tree is not checked. config sits above models: it checks the crops
# against the model's patch (models.resolve_arch).
LAYERS = (
    ("seeding", "masking", "distributed", "schedules", "io.safe_load", "io.atomic"),
    ("models", "loss", "data"),
    ("config", "io", "ema", "deepspeed_config", "monitor", "run_folder"),
    ("engine",),
    ("trainer", "accumulate"),
)
APART = {("models", "data"), ("data", "models")}  # same layer, yet neither imports the other
OUTSIDE = ("eval", "scripts", "train")  # the programs built on msn_ds


def layer_of(name: str):
    """``(key, layer index)`` of a dotted name under msn_ds (without the prefix), or None."""
    best = None
    for i, keys in enumerate(LAYERS):
        for key in keys:
            if (name == key or name.startswith(key + ".")) and (best is None
                                                                or len(key) > len(best[0])):
                best = (key, i)
    return best


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The dotted modules an import statement names (``from a import b``: ``a.b`` if that is
    a module, else ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module
    return [f"{stem}.{a.name}" if is_module(f"{stem}.{a.name}") else stem for a in node.names]


def check_source(module: str, source: str, path: str, is_package: bool = False) -> list[str]:
    """Every import of ``source`` (module ``module``) that breaks the layering, as
    ``path:line: statement: why``."""
    own = layer_of(module[len(PACKAGE) + 1:])
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target in imported(module, is_package, node):
            top = target.split(".")[0]
            why = None
            if top in OUTSIDE:
                why = f"msn_ds never imports {top}"
            elif top == PACKAGE and target != PACKAGE and own is not None:
                dst = layer_of(target[len(PACKAGE) + 1:])
                if dst is None:
                    why = f"{target} is in no layer of tests/test_layering.py"
                elif dst[1] > own[1]:
                    why = f"{own[0]} (layer {own[1]}) imports upward: {dst[0]} (layer {dst[1]})"
                elif (own[0], dst[0]) in APART:
                    why = f"{own[0]} never imports {dst[0]}"
            if why:
                problems.append(f"{path}:{node.lineno}: {ast.unparse(node)}: {why}")
    return problems


def package_modules():
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        parts = rel.parent.parts if is_package else rel.with_suffix("").parts
        yield ".".join(parts), is_package, path


def test_every_module_is_in_a_layer():
    unplaced = [str(path.relative_to(ROOT)) for module, _, path in package_modules()
                if module != PACKAGE and layer_of(module[len(PACKAGE) + 1:]) is None]
    assert not unplaced, f"modules in no layer of tests/test_layering.py: {unplaced}"


def test_imports_point_downward():
    problems = []
    for module, is_package, path in package_modules():
        problems += check_source(module, path.read_text(), str(path.relative_to(ROOT)),
                                 is_package)
    assert not problems, "\n".join(problems)


def test_the_checker_reports_what_breaks_the_layering():
    assert check_source("msn_ds.models.vit", "import torch\n\n\ndef f():\n"
                        "    from ..engine import MSNTrainer\n", "msn_ds/models/vit.py") == [
        "msn_ds/models/vit.py:5: from ..engine import MSNTrainer: "
        "models (layer 1) imports upward: engine (layer 3)"]
    assert check_source("msn_ds.data.loader", "from msn_ds.models import vit\n", "x.py") == [
        "x.py:1: from msn_ds.models import vit: data never imports models"]
    assert check_source("msn_ds.monitor", "from eval.knn import run_knn\n", "x.py",
                        is_package=True) == [
        "x.py:1: from eval.knn import run_knn: msn_ds never imports eval"]
    assert check_source("msn_ds.masking", "import msn_ds.nowhere\n", "x.py") == [
        "x.py:1: import msn_ds.nowhere: msn_ds.nowhere is in no layer of "
        "tests/test_layering.py"]
    assert check_source("msn_ds.engine", "from . import distributed as D\n"
                        "from .models.vit import resolve_arch\nimport torch\n", "x.py") == []
    assert check_source("msn_ds.monitor.views_grid", "from ..data.dataset import collate_views\n"
                        "from ..masking import keep_indices\n", "x.py") == []
