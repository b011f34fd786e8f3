"""The platform's layers import one way: flowserve < scaling < scheduler < deepflow.py, and no
module imports itself back through others. Read from the source with `ast`: every import of
ours counts, at module level or inside a function, type-only (`if TYPE_CHECKING:`) included."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["flowserve", "scaling", "scheduler", "deepflow"]  # each may import only those before it


def modules() -> dict[str, Path]:
    files = [ROOT / "deepflow.py", *(p for pkg in LAYERS[:3] for p in sorted((ROOT / pkg).glob("*.py")))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports(path: Path, ours: set[str]) -> set[str]:
    """The modules of ours that `path` imports (`from pkg import mod` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in ours}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    g = graph()  # a parser that found nothing would pass the tests below
    assert "scheduler.cluster" in g["deepflow"] and "flowserve.protocol" in g["scheduler.te"]
    assert {layer(m) for m in g} == {0, 1, 2, 3}


def test_no_upward_imports():
    upward = sorted(f"{m} -> {d}" for m, deps in graph().items() for d in deps if layer(d) > layer(m))
    assert upward == []


def test_no_import_cycles():
    assert cycles(graph()) == []
