"""The library's shape: stage packages whose imports go one way (scripts -> stages -> registries)."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "alpaca_cot"
# A stage may import the registries at the top and the stages ranked below it, never one above or beside it.
STAGE_RANK = {"data": 1, "infer": 2, "train": 3, "serve": 3, "eval": 4}
# Top-level modules read no stage, with two exceptions: the flag checks read the source-format registry, which
# lives with the data it describes, and a kept entry point runs the study.
TOP_READS_STAGE = {("alpaca_cot.checks", "alpaca_cot.data.formats"), ("alpaca_cot.study", "alpaca_cot.eval.study")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGE_RANK else None


def _imports(path: Path) -> set[str]:
    """Every alpaca_cot module ``path`` imports, at the top or inside a function."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("alpaca_cot"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alpaca_cot.")}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_go_one_way(path):
    importer = _module_name(path)
    own = _stage(importer)
    for target in _imports(path):
        stage = _stage(target)
        if stage is None or stage == own:
            continue
        if own is None:
            assert (importer, target) in TOP_READS_STAGE, f"{importer} (top level) imports the stage {target}"
        else:
            assert STAGE_RANK[stage] < STAGE_RANK[own], f"{importer} imports {target}, a stage not below it"


@pytest.mark.parametrize("package", sorted(p.parent for p in PACKAGE.glob("*/__init__.py")), ids=lambda p: p.name)
def test_every_package_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc) > 40, f"{package.name}/__init__.py needs a docstring saying what the package owns"


def test_tests_mirror_the_stage_packages():
    for stage in STAGE_RANK:
        assert list((ROOT / "tests" / stage).glob("test_*.py")), f"tests/{stage}/ has no tests"
