"""The import graph says what docs/architecture.md says: each layer imports only the layers below it.

Read from the source with `ast` (nothing is imported or run), so an import inside a function counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top. A module may import its own layer's package and any layer strictly below its own; layers
# on one row are independent of each other. The foundation modules are leaves every layer may use.
FOUNDATION = {"errors", "io", "dist"}
LAYERS = [
    {"config"},
    {"models", "data"},
    {"checkpoint"},
    {"observe"},
    {"train"},
    {"evaluate", "plan"},
    {"commands"},  # the only importer of launch/
    {"cli"},
]
RANK = {name: i for i, row in enumerate(LAYERS) for name in row}
# Narrower than the ranks alone: what the issue that set these rules names explicitly.
EXTRA_RULES = {
    "config": {"errors", "io"},  # nothing of ours but the leaves that raise and write files
    "models": {"config"},  # the network only: no saved runs, no data
    "launch": {"errors"},  # how processes start, independent of the library
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return "launch" if rel[0] == "launch" else rel[1]


def _imports(source: str) -> set[str]:
    """Our layers that `source` imports: `launch`, or the first component under vit_scale."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "vit_scale"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "launch":
                found.add("launch")
            elif parts[0] == "vit_scale" and len(parts) > 1:
                found.add(parts[1])
    return found


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("vit_scale/**/*.py"), *ROOT.glob("launch/*.py")])


def allowed(layer: str) -> set[str]:
    if layer in EXTRA_RULES:
        return EXTRA_RULES[layer] | {layer}
    if layer in FOUNDATION:
        return FOUNDATION - {"dist"} if layer != "dist" else {"errors"}
    below = {name for name, rank in RANK.items() if rank < RANK[layer]}
    return below | FOUNDATION | {layer} | ({"launch"} if layer == "commands" else set())


def test_every_source_file_belongs_to_a_known_layer():
    known = set(RANK) | FOUNDATION | {"launch", "__init__", "__main__"}
    assert {_layer(p) for p in _sources()} <= known


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layer_imports_only_what_is_below_it(path):
    layer = _layer(path)
    if layer in ("__init__", "__main__"):
        return
    wrong = _imports(path.read_text()) - allowed(layer)
    assert not wrong, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(wrong)}: see docs/architecture.md"


def test_the_rule_catches_forbidden_imports():
    """The checker itself, on imports each rule forbids (inside a function too)."""
    source = "def f():\n    from vit_scale.commands import ranks\n    import launch.env\n    from vit_scale import evaluate\n"
    assert _imports(source) - allowed("train") == {"commands", "launch", "evaluate"}
    assert _imports("from vit_scale.data.tar import tar_members\n") - allowed("models") == {"data"}
    assert _imports("import vit_scale.models.vit\n") - allowed("config") == {"models"}


def test_architecture_doc_draws_the_same_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    picture = doc.split("```")[1]  # the first fenced block is the picture
    lines = [line for line in picture.splitlines() if line.strip()]
    for row in LAYERS:
        for name in row:
            assert any(name in line for line in lines), f"docs/architecture.md's picture lacks {name}"
    top_down = ["commands", "evaluate", "train", "observe", "checkpoint", "config"]
    order = [next(i for i, line in enumerate(lines) if name in line) for name in top_down]
    assert order == sorted(order), "the picture lists the layers top to bottom"
