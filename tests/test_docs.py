"""The docs name only what exists: README.md and docs/*.md against the code, read at test time.

Files (`flowserve/rtc.py`, bare `engine.py`, the README's layout tree), names (`path.py: Name`,
`Class.member`, identifier-like names in backticks), flags (per command: `deepflow.py SUB` from its
own --help, our scripts from their add_argument calls), `make` targets and "section N" of
BENCHMARKS.md. Names come from our Python parsed with ast; nothing of ours is imported.
"""
import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PY_FILES = [ROOT / "deepflow.py", *sorted(p for d in ("flowserve", "scaling", "scheduler", "bench", "tests")
                                          for p in (ROOT / d).rglob("*.py"))]
OUR_DIRS = ("flowserve", "scaling", "scheduler", "bench", "tests", "docs")

# What the docs may name that is not ours, each with why.
OUTSIDE = {
    "--cont-batching": "llama-server's flag (BENCHMARKS 9, the peer's command line)",
    "--node-ip-address": "Ray's `ray start` flag (DEPLOY, hosts as namespaces)",
    "BlockMask": "torch's FlexAttention block mask (BENCHMARKS 9, tried and dropped)",
    "ActorDiedError": "Ray's exception for a dead actor (RELIABILITY, node agent lost)",
    "bench/results/": "gitignored output folder of the benchmarks",
    "flowserve/_build/": "gitignored build folder of the CPU kernels",
}
OUTSIDE_PROGRAMS = {"ray", "pip", "curl", "cmake", "llama-server", "llama_cpp.server"}  # their flags are theirs
PATH = re.compile(r"(?<![\w./-])(?:deepflow\.py|(?:%s)/[\w./*-]*[\w*/])" % "|".join(OUR_DIRS))
CODE_LIKE = re.compile(r"^_?[a-z0-9]+(_[a-z0-9]+)+_?$|^_\w+$|^[A-Z][a-z0-9]+[A-Z]\w*$|^[A-Z0-9]+(_[A-Z0-9]+)+$")


def index_code():
    """Module-level names per file, members per class name (with bases), every identifier in the code."""
    top, members, bases, vocab = {}, defaultdict(set), defaultdict(set), set()
    for path in PY_FILES:
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(ROOT))
        top[rel] = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        top[rel] |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            name = getattr(node, "name", None) or getattr(node, "id", None) or getattr(node, "attr", None) \
                or getattr(node, "arg", None)
            if isinstance(name, str):
                vocab.add(name)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
                vocab.add(node.value)
            if isinstance(node, ast.ClassDef):
                bases[node.name] |= {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        members[node.name].add(sub.name)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        members[node.name].add(sub.target.id)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        members[node.name].add(sub.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                            and getattr(sub.value, "id", None) == "self":
                        members[node.name].add(sub.attr)
    return top, members, bases, vocab


def has_member(cls: str, name: str, members, bases, seen=()) -> bool:
    return name in members[cls] or any(has_member(b, name, members, bases, seen + (cls,))
                                       for b in bases[cls] if b in members and b not in seen)


def script_flags(path: Path) -> set[str]:
    """Flags a script of ours accepts: deepflow.py's from its --help, a .py's add_argument calls,
    a .sh's: those of the scripts it runs (its arguments go through to them)."""
    if path.name == "deepflow.py" or not path.exists():
        return set()  # deepflow.py: per subcommand, below; a missing script is reported as a path
    if path.suffix == ".sh":
        text = path.read_text()
        return set(re.findall(r"--[\w-]+", text)) | {f for s in re.findall(r"bench/\w+\.py", text)
                                                      for f in script_flags(ROOT / s)} \
            | (deepflow_flags()["serve"] if "deepflow.py serve" in text else set())
    return {a.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
            and getattr(n.func, "attr", "") == "add_argument" for a in n.args
            if isinstance(a, ast.Constant) and str(a.value).startswith("--")}


_DEEPFLOW = {}


def deepflow_flags() -> dict[str, set[str]]:
    if not _DEEPFLOW:
        for sub in ("serve", "generate", "profile-pd", "--log-level=info"):  # the last: the global flags
            out = subprocess.run([sys.executable, "deepflow.py", *sub.split(), "--help"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            _DEEPFLOW[sub] = set(re.findall(r"--[a-z][\w-]*", out))
        _DEEPFLOW[None] = set().union(*_DEEPFLOW.values())
    return _DEEPFLOW


def scopes(text: str):
    """(scope, kind): each line of a code block ("line", continuations joined), each inline code
    span ("span") and the prose around the spans ("prose"), paragraph by paragraph."""
    fence, prev_blank, para = False, True, []
    for line in text.replace("\\\n", " ").splitlines() + [""]:
        if line.startswith("```"):
            fence = not fence
        elif fence or (line.startswith("    ") and prev_blank and not para):
            yield line, "line"
            continue
        elif line.strip():
            para.append(line)
        elif para:
            prose = " ".join(" ".join(para).split())
            for span in re.findall(r"`([^`]+)`", prose):
                yield span, "span"
            yield re.sub(r"`[^`]+`", " ", prose), "prose"
            para = []
        prev_blank = not line.strip()


def check_flags(scope: str, flags, last: str | None) -> list[str]:
    """Each --flag against the command it follows in the scope; with none, against deepflow.py's
    and those of the script the doc named last (prose about its run)."""
    bad, program = [], None
    tokens = [t.strip("()[],;:\"'") for t in scope.split()]
    for i, tok in enumerate(tokens):
        if tok in ("serve", "generate", "profile-pd") and (i == 0 or tokens[i - 1].endswith("deepflow.py")):
            program = tok
        elif Path(tok).name in OUTSIDE_PROGRAMS or tok.endswith("deepflow.py"):
            program = Path(tok).name
        elif re.fullmatch(r"(bench|tests)/\w+\.(py|sh)", tok):
            program = tok
        elif tok.startswith("--") and len(tok) > 2 and program not in OUTSIDE_PROGRAMS:
            flag = tok.split("=")[0]
            if program in (None, "deepflow.py"):
                known = flags[None] | (script_flags(ROOT / last) if program is None and last else set())
            else:
                known = flags[program] if program in flags else script_flags(ROOT / program)
            if flag not in known and flag not in OUTSIDE:
                bad.append(f"{flag} (for {program or 'deepflow.py'})")
    return bad


def check_name(ref: str, file: str | None, top, members, bases, vocab) -> bool:
    head, _, attr = ref.partition(".")
    if file:
        return head in top.get(file, ()) and (not attr or has_member(head, attr, members, bases))
    if head in members:
        return not attr or has_member(head, attr, members, bases)
    return bool(attr) or not CODE_LIKE.match(head) or head in vocab or head in OUTSIDE


def problems(doc: Path) -> list[str]:
    top, members, bases, vocab = index_code()
    flags, targets = deepflow_flags(), set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    text, bad = doc.read_text(), []
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs/BENCHMARKS.md").read_text(), re.M))
    bad += [f"section {n} of BENCHMARKS.md" for n in re.findall(r"section (\d+)", text) if n not in sections]
    bad += [link for link in re.findall(r"\]\(([\w./-]+)\)", text) if not (doc.parent / link).exists()]
    tree_dir, last = None, None
    for scope, kind in scopes(text):
        code = kind == "line"
        refs = PATH.findall(scope)
        if code and re.match(r"(\w+)/\s", scope) and scope.split("/")[0] in OUR_DIRS:
            tree_dir = scope.split("/")[0]  # the README's layout: bare names under a folder
        elif code and not scope.startswith(" "):
            tree_dir = None
        if code and tree_dir:
            refs += [f"{tree_dir}/{n}" for n in re.findall(r"(?<![\w/.])\w+\.(?:py|sh|md)\b", scope)]
        for ref in refs:
            if not any(ref.startswith(o) for o in OUTSIDE) and not list(ROOT.glob(ref.rstrip("/"))):
                bad.append(ref)
        bad += check_flags(scope, flags, last)
        last = ([None] + re.findall(r"(?:bench|tests)/\w+\.(?:py|sh)\b", scope))[-1] or last
        if kind != "span":
            continue
        if scope.startswith("make ") and scope.split()[1] not in targets:
            bad.append(scope)
        m = re.fullmatch(r"(?:([\w/]+\.py): )?([\w.]+?)(?:\(\))?(?:\[.*\])?(?:=\w+)?", scope) or \
            re.fullmatch(r"(?:tests/)?(test_\w+\.py)::(\w+)(?:\[.*\])?", scope)
        if scope.endswith(".py") and "/" not in scope and not list(ROOT.rglob(scope)):
            bad.append(scope)
        elif m and "::" in scope:
            if m[2] not in top.get(f"tests/{m[1]}", ()):
                bad.append(scope)
        elif m and not m[2].endswith(".py"):
            if not check_name(m[2], m[1] or None, top, members, bases, vocab):
                bad.append(scope)
    return bad


def test_docs_name_only_what_exists():
    bad = {doc.name: problems(doc) for doc in DOCS}
    assert not any(bad.values()), "\n".join(f"{d}: {', '.join(sorted(set(b)))}" for d, b in bad.items() if b)
