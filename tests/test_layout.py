"""The shape of the code: the modelled hardware apart from the hypervisor,
and the MMU modes asked for by their objects, never by name."""
import ast
from pathlib import Path

import hv
from hv.vmm.modes import MODES

ROOT = Path(hv.__file__).resolve().parent


def _modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST, module: str) -> set[str]:
    """Absolute names of what module `module` imports."""
    package = module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_hardware_imports_nothing_of_the_hypervisor():
    for path, tree in _modules(ROOT / "hw"):
        bad = {m for m in _imports(tree, "hv.hw." + path.stem)
               if m.startswith(("hv.vmm", "hv.api", "hv.cli", "hv.compare"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_mode_name_is_compared_outside_the_mode_table():
    names = set(MODES)
    for path, tree in _modules(ROOT):
        if path == ROOT / "vmm" / "modes.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in names:
                        raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} "
                                             f"compares with the mode name {side.value!r}")
