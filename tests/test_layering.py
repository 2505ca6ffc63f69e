"""The package's import graph has no cycle, and the adapter file format imports no model code."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "ivpt"


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Every ivpt module ``name`` imports, at module level or inside functions alike."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target not in (name, "ivpt"):  # the package root only re-exports
                out.add(target)
    return out


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_adapter_format_sits_below_the_models():
    known = modules()
    below = imports("ivpt.adapter_format", known["ivpt.adapter_format"], known)
    assert not below & {"ivpt.encoder", "ivpt.factory", "ivpt.adapter", "ivpt.segmentation", "ivpt.methods"}
    # nothing that builds models imports the loader
    for name in ("ivpt.encoder", "ivpt.factory", "ivpt.segmentation.model", "ivpt.backbone"):
        assert "ivpt.adapter" not in imports(name, known[name], known), name
