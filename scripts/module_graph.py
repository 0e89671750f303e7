#!/usr/bin/env python3
"""The crate's module graph from its `crate::` and `super::` paths, and its import cycles.

Usage: scripts/module_graph.py [--edges] [--tests]

A module A depends on a sibling module B (same parent) when code anywhere under A names a
path under B. Cycles are looked for among the siblings of every parent (the crate's top-level
modules, the files of one directory). `mod` declarations are not imports; `#[cfg(test)]`
modules are left out unless --tests is given (test code may reach anywhere). Exit 1 on a cycle.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> tuple:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod" or parts in (["lib"], ["main"]):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def drop_test_modules(text: str) -> str:
    """Remove `#[cfg(test)] mod x { ... }` blocks (brace-matched)."""
    out, i = [], 0
    pat = re.compile(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = pat.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j


def expand_use(body: str) -> list:
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e'] (self and globs kept as the prefix)."""
    body = re.sub(r"\s+", "", body)
    m = re.match(r"^(.*?)\{(.*)\}$", body)
    if not m:
        return [re.sub(r"(::self|::\*)$", "", body.split(" as ")[0].replace("as", " as ").split(" as ")[0])]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    items.append(cur)
    out = []
    for it in filter(None, items):
        for e in expand_use(it):
            out.append((prefix + e) if e != "self" else prefix.rstrip(":"))
    return out


def references(text: str, me: tuple, is_dir_module: bool) -> list:
    """Absolute module paths (as tuples) named in `text`."""
    refs = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        for p in expand_use(m.group(1)):
            refs.append(p)
    for m in re.finditer(r"(?<![\w:])((?:crate|super)(?:::\w+)+)", text):
        refs.append(m.group(1))
    out = []
    for p in refs:
        segs = [s for s in p.split("::") if s]
        if not segs:
            continue
        if segs[0] == "crate":
            out.append(tuple(segs[1:]))
        elif segs[0] == "super":
            # `super` of a file module is its parent; of mod.rs, the directory's parent.
            base = list(me)
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            out.append(tuple(base + segs))
        elif segs[0] == "self":
            out.append(tuple(list(me) + segs[1:]))
    return out


def test_only_files(files: list) -> set:
    """Modules declared `#[cfg(test)] mod x;` in their parent: test code in a file of its own."""
    out = set()
    for f in files:
        text = f.read_text()
        for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+(\w+)\s*;", text):
            out.add(module_of(f) + (m.group(1),))
    return out


def main() -> int:
    with_tests = "--tests" in sys.argv
    files = sorted(SRC.rglob("*.rs"))
    # The library; the binary (main.rs, cli/) is checked as its own crate below.
    lib = [f for f in files if f.name != "main.rs" and "cli" not in f.relative_to(SRC).parts]
    bin_files = [f for f in files if f.name == "main.rs" or "cli" in f.relative_to(SRC).parts]
    failed = check(lib, with_tests, "library")
    failed |= check(bin_files, with_tests, "binary")
    return 1 if failed else 0


def check(files: list, with_tests: bool, what: str) -> bool:
    skip = set() if with_tests else test_only_files(files)
    modules = {module_of(f): f for f in files}
    modules = {m: f for m, f in modules.items() if m not in skip}
    deps = {}
    for mod, f in modules.items():
        text = strip_comments(f.read_text())
        if not with_tests:
            text = drop_test_modules(text)
        targets = set()
        for ref in references(text, mod, f.name == "mod.rs"):
            # the longest prefix of ref that is a module
            for k in range(len(ref), 0, -1):
                if ref[:k] in modules:
                    if ref[:k] != mod:
                        targets.add(ref[:k])
                    break
        deps[mod] = targets

    if "--edges" in sys.argv:
        for mod in sorted(deps):
            print("::".join(mod) or "crate", "->", ", ".join(sorted("::".join(t) for t in deps[mod])))

    # sibling graphs: for each parent, edges between its children
    parents = {m[:-1] for m in modules if m}
    cycles = []
    for parent in sorted(parents):
        children = sorted({m[: len(parent) + 1] for m in modules if len(m) > len(parent) and m[: len(parent)] == parent})
        graph = {c: set() for c in children}
        for mod, targets in deps.items():
            if mod[: len(parent)] != parent or len(mod) <= len(parent):
                continue
            a = mod[: len(parent) + 1]
            for t in targets:
                if t[: len(parent)] == parent and len(t) > len(parent):
                    b = t[: len(parent) + 1]
                    if b != a:
                        graph[a].add(b)
        cycles += find_cycles(graph)
    for c in cycles:
        print(f"{what}: cycle among", ", ".join("::".join(m) for m in c))
    if not cycles:
        print(f"{what}: no import cycles among {len(modules)} modules ({'with' if with_tests else 'without'} test modules)")
    return bool(cycles)


def find_cycles(graph: dict) -> list:
    """The strongly connected components with more than one node (Tarjan): each holds a cycle."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
