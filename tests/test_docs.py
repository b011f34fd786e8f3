"""The docs name only what exists: README.md and docs/*.md checked against the code at test time.

What a doc names: files (`flowserve/rtc.py`, a bare `engine.py`, the README's layout tree),
names (`path.py: Name`, `Class.member`, identifier-like names in backticks, `test_x.py::test_y`),
flags (each against the command it follows: `deepflow.py SUB` from its own --help, our scripts
from their add_argument calls), `make` targets, and "section N" of docs/BENCHMARKS.md. Names
come from our Python parsed with ast: nothing of ours is imported.
"""
import ast
import re
import subprocess
import sys
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUR_DIRS = ("flowserve", "scaling", "scheduler", "bench", "tests", "docs")
PY_FILES = [ROOT / "deepflow.py", *sorted(p for d in OUR_DIRS for p in (ROOT / d).rglob("*.py"))]

# What the docs may name that is not ours, each with why.
OUTSIDE = {
    "--cont-batching": "llama-server's flag (BENCHMARKS 9, the peer's command line)",
    "--node-ip-address": "Ray's `ray start` flag (DEPLOY, hosts as namespaces)",
    "BlockMask": "torch's FlexAttention block mask (BENCHMARKS 9, tried and dropped)",
    "ActorDiedError": "Ray's exception for a dead actor (RELIABILITY, node agent lost)",
    "bench/results/": "gitignored output folder of the benchmarks",
    "flowserve/_build/": "gitignored build folder of the CPU kernels",
}
OUTSIDE_PROGRAMS = {"ray", "pip", "curl", "cmake", "llama-server", "llama_cpp.server"}  # the flags after them are theirs
PATH = re.compile(r"(?<![\w./-])(?:deepflow\.py|(?:%s)/[\w./*-]*[\w*/])" % "|".join(OUR_DIRS))
# A backticked word that can only be code: snake_case, _private, CamelCase, UPPER_CASE (not `fork`, `unix`).
CODE_LIKE = re.compile(r"_?[a-z0-9]+(_[a-z0-9]+)+_?|_\w+|[A-Z][a-z0-9]+[A-Z]\w*|[A-Z0-9]+(_[A-Z0-9]+)+")


@cache
def code() -> tuple[dict, dict, dict, set]:
    """Module-level names per file; members per class name (methods, fields, self.x) and its
    bases; every identifier and every one-word string constant anywhere in our code."""
    top, members, bases, vocab = {}, defaultdict(set), defaultdict(set), set()
    for path in PY_FILES:
        tree = ast.parse(path.read_text())
        top[str(path.relative_to(ROOT))] = {
            n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        } | {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in getattr(n, "targets", [getattr(n, "target", None)]) if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            for field in ("name", "id", "attr", "arg", "value"):
                if isinstance(v := getattr(node, field, None), str) and " " not in v:
                    vocab.add(v)
            if isinstance(node, ast.ClassDef):
                bases[node.name] |= {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        members[node.name].add(sub.name)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        members[node.name].add(sub.id)  # class fields and constants
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                            and getattr(sub.value, "id", None) == "self":
                        members[node.name].add(sub.attr)
    return top, members, bases, vocab


def has_member(cls: str, name: str, seen: tuple = ()) -> bool:
    _, members, bases, _ = code()
    return name in members[cls] or any(has_member(b, name, seen + (cls,)) for b in bases[cls]
                                       if b in members and b not in seen)


@cache
def deepflow_flags() -> dict[str | None, set[str]]:
    """Each subcommand's flags (None: all of them), from its --help: however the parser is built."""
    flags = {}
    for sub in ("serve", "generate", "profile-pd", "--log-level=info"):  # the last: the global flags
        run = subprocess.run([sys.executable, "deepflow.py", sub, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        flags[sub] = set(re.findall(r"--[a-z][\w-]*", run.stdout))
    return {**flags, None: set().union(*flags.values())}


def script_flags(script: str | None) -> set[str]:
    """A script's flags: a .py's add_argument calls, its own and those of the bench modules it
    imports (a shared parser's); a .sh's own and those of the programs it runs (its arguments
    go through to them). A missing script is reported as a path."""
    path = ROOT / (script or "-")
    if not path.is_file():
        return set()
    if path.suffix == ".sh":
        text = path.read_text()
        return set(re.findall(r"--[\w-]+", text)).union(*map(script_flags, re.findall(r"bench/\w+\.py", text)),
                                                         deepflow_flags()["serve"] if "deepflow.py serve" in text else ())
    nodes = list(ast.walk(ast.parse(path.read_text())))
    shared = [f"bench/{n.module.removeprefix('bench.')}.py" for n in nodes
              if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("bench.")]
    return {a.value for n in nodes if getattr(getattr(n, "func", None), "attr", "") == "add_argument"
            for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}.union(
        *map(script_flags, shared))


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
            yield from ((span, "span") for span in re.findall(r"`([^`]+)`", prose))
            yield re.sub(r"`[^`]+`", " ", prose), "prose"
            para = []
        prev_blank = not line.strip()


def bad_flags(scope: str, last_script: str | None) -> list[str]:
    """Each --flag against the command it follows in the scope; after none, against deepflow.py's
    and those of the script the doc named last (prose about that run)."""
    bad, program, flags = [], None, deepflow_flags()
    tokens = [t.strip("()[],;:\"'") for t in scope.split()]
    for i, tok in enumerate(tokens):
        if tok in ("serve", "generate", "profile-pd") and (i == 0 or tokens[i - 1].endswith("deepflow.py")):
            program = tok
        elif Path(tok).name in OUTSIDE_PROGRAMS or tok.endswith("deepflow.py") \
                or re.fullmatch(r"(bench|tests)/\w+\.(py|sh)", tok):
            program = Path(tok).name if not tok.startswith(("bench/", "tests/")) else tok
        elif re.fullmatch(r"--[a-z][\w-]*(=.*)?", tok) and program not in OUTSIDE_PROGRAMS:  # not an --arrow->
            if program is None:
                known = flags[None] | script_flags(last_script)
            elif program.startswith(("bench/", "tests/")):
                known = script_flags(program)
            else:  # a deepflow.py subcommand, or deepflow.py before one
                known = flags.get(program, flags[None])
            if tok.split("=")[0] not in known | OUTSIDE.keys():
                bad.append(f"{tok.split('=')[0]} (for {program or 'deepflow.py'})")
    return bad


def name_exists(name: str, file: str | None) -> bool:
    top, members, _, vocab = code()
    head, _, attr = name.partition(".")
    if file:  # `path.py: Name` or `path.py: Class.member`: defined right there
        return head in top.get(file, ()) and (not attr or has_member(head, attr))
    if head in members:  # `Class.member` of one of our classes
        return not attr or has_member(head, attr)
    # another dotted name (`task.placement`, `hmac.compare_digest`) is not checked; a bare one if it looks like code
    return bool(attr) or not CODE_LIKE.fullmatch(head) or head in vocab | OUTSIDE.keys()


def problems(doc: Path) -> list[str]:
    text, bad = doc.read_text(), []
    top = code()[0]
    sections = re.findall(r"^## (\d+)\.", (ROOT / "docs/BENCHMARKS.md").read_text(), re.M)
    bad += [f"section {n} of BENCHMARKS.md" for n in re.findall(r"section (\d+)", text) if n not in sections]
    bad += [link for link in re.findall(r"\]\(([\w./-]+)\)", text) if not (doc.parent / link).exists()]
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    tree_dir = last_script = None
    for scope, kind in scopes(text):
        refs = PATH.findall(scope)
        if kind == "line" and re.match(r"(\w+)/\s", scope) and scope.split("/")[0] in OUR_DIRS:
            tree_dir = scope.split("/")[0]  # the README's layout: bare file names under their folder
        elif kind != "line" or not scope.startswith(" "):
            tree_dir = None
        if tree_dir:
            refs += [f"{tree_dir}/{n}" for n in re.findall(r"(?<![\w/.])\w+\.(?:py|sh|md)\b", scope)]
        bad += [r for r in refs if not any(r.startswith(o) for o in OUTSIDE) and not list(ROOT.glob(r.rstrip("/")))]
        bad += bad_flags(scope, last_script)
        last_script = ([None] + re.findall(r"(?:bench|tests)/\w+\.(?:py|sh)\b", scope))[-1] or last_script
        if kind != "span":
            continue
        if scope.startswith("make ") and scope.split()[1] not in targets:
            bad.append(scope)
        if m := re.fullmatch(r"(?:tests/)?(test_\w+\.py)::(\w+)(?:\[.*\])?", scope):
            bad += [scope] if m[2] not in top.get(f"tests/{m[1]}", ()) else []
        elif re.fullmatch(r"\w+\.py", scope):
            bad += [scope] if scope not in {p.name for p in PY_FILES} else []
        elif m := re.fullmatch(r"(?:([\w/]+\.py): )?([\w.]+?)(?:\(\))?(?:\[.*\])?(?:=\w+)?", scope):
            bad += [scope] if not name_exists(m[2], m[1]) else []
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_docs_name_only_what_exists(doc: Path):
    bad = sorted(set(problems(doc)))
    assert not bad, f"{doc.name} names what does not exist: " + ", ".join(bad)
