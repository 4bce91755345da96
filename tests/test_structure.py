"""The shape of the code a newcomer relies on: no import loop among the package's modules, imports inside
functions only for optional dependencies, no file outside the repository named, files of readable size,
and a configuration reference that is the one the fields generate."""
import ast
from pathlib import Path

from ple_fast.config import reference_document

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ple_fast"
OPTIONAL = {"peft", "matplotlib", "torch.utils.tensorboard", "wandb", "flash_attn", "liger_kernel", "jinja2"}
# the command lines load their run (and torch) only once the command line parsed: --help answers at once
DEFERRED = {("ple_fast.train", "ple_fast.run"), ("ple_fast.reward_train", "ple_fast.reward_run"),
            ("ple_fast.sweep", "ple_fast.run")}      # the command lines load torch only once they run
MAX_LINES = 600


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(node: ast.AST, module: str) -> list[str]:
    """Every module an import statement names (a from-import also names module.name)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")[:-node.level] if not module.endswith("__init__") else module.split(".")
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imports(path: Path, module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(package modules imported at module level, (line, name) of every import inside a def)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    known = modules()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top |= {name for name in imported_names(node, module) if name in known}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner_node in ast.walk(node):
                if isinstance(inner_node, (ast.Import, ast.ImportFrom)):
                    inner += [(inner_node.lineno, name) for name in imported_names(inner_node, module)[:1]]
    return top - {module}, inner


def test_no_import_loop_among_the_package_modules():
    graph = {name: imports(path, name)[0] for name, path in modules().items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import loop: " + " -> ".join(trail + [name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])


def test_imports_inside_functions_are_optional_dependencies_only():
    bad = []
    for name, path in modules().items():
        for line, imported in imports(path, name)[1]:
            if not any(imported == opt or imported.startswith(opt + ".") for opt in OPTIONAL) \
                    and (name, imported) not in DEFERRED:
                bad.append(f"{path.relative_to(REPO)}:{line}: {imported}")
    assert not bad, "imports inside functions of non-optional modules:\n" + "\n".join(bad)


def test_no_product_file_names_a_file_outside_the_repository():
    for path in list(PACKAGE.rglob("*.py")) + list((REPO / "csrc").iterdir()) + [REPO / "CMakeLists.txt"]:
        text = path.read_text()
        for outside in ("../shared", "DESIGN.md", "/work/", "seed/000_"):
            assert outside not in text, f"{path.relative_to(REPO)} names {outside!r}"


def test_files_stay_readable():
    long = [f"{p.relative_to(REPO)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"product files over {MAX_LINES} lines: {long}"
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_config_reference_is_the_generated_one():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == reference_document(), \
        "docs/config.md differs from the fields: python -m ple_fast.config > docs/config.md"
