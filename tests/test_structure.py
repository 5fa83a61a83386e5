"""The package's module structure: no import cycle inside ``demjax`` (counting
imports inside functions too) and no private name imported across modules."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(REPO, "demjax")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _graph():
    mods = _modules()
    graph, private = {m: set() for m in mods}, []
    for m, path in mods.items():
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "demjax"
            ):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[m].add(sub if sub in mods else node.module)
                    if alias.name.startswith("_") and node.module != m:
                        private.append((m, node.module, alias.name))
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    return graph, private


def _cycles(graph):
    found = []
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if n not in graph:
                continue
            if state[n] == 1:
                found.append(stack[stack.index(n):] + [n])
            elif state[n] == 0:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            visit(m, [m])
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_demjax():
    graph, _ = _graph()
    assert "demjax.train" in graph and graph["demjax.train"]
    assert _cycles(graph) == []


def test_no_private_name_imported_across_modules():
    _, private = _graph()
    assert private == []
