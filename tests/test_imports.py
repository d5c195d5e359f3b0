"""
The shape of the code base, checked: the top-level modules form a layered import graph.

  * the method's modules (tokens, model, diffusion, likelihood, rewards, rollout, rl) import only each
    other: never the shape world, the data bundle, the plumbing (common.py) or the config parser (a
    config dataclass is passed in), so that one RL update reads in these files alone;
  * no import cycle among the top-level modules;
  * no library module imports an entry script (train.py, eval.py, sample.py, walkthrough.py) or anything in studies/:
    those are programs, the library lives below them (common.py, metrics.py, rl.py, ...); the
    experiment scripts in studies/ may use the entry scripts' functions;
  * no top-level module is much over 600 lines;
  * the experiment scripts (studies/: the claim studies, the estimator study, the benchmarks) sit in
    a folder of their own: no top-level module imports any of them, and their own graph has no cycle;
  * project imports sit at the top of each file, not inside function bodies, unless the import line
    carries a comment that says why.

The graph is read from the source with `ast` (nothing is imported), so a broken module still gets a
clear failure here.

    python -m pytest tests/test_imports.py -q
"""
import ast
import glob
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")
ENTRY = {"train", "eval", "sample", "walkthrough"}   # programs: nothing imports them


def modules(folder: str = "") -> dict[str, ast.Module]:
    """name -> parsed source of every .py file at the top level (folder "") or in `folder`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
        with open(path) as f:
            out[os.path.basename(path)[:-3]] = ast.parse(f.read(), path)
    return out


def test_the_studies_folder_holds_the_experiment_scripts():
    assert {"study", "estimators", "bench"} <= set(modules("studies"))
    assert not {"study", "estimators", "bench"} & set(modules()), "an experiment script is back at the top level"


def imported(node) -> set[str]:
    """Top-level names an Import / ImportFrom node brings in ('import a.b' -> 'a')."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def graph(mods: dict | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports (top level and studies/ together)."""
    mods = mods or {**modules(), **modules("studies")}
    return {m: {d for n in ast.walk(tree) for d in imported(n)} & set(mods) - {m} for m, tree in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of g as a list of nodes (first == last), or None: depth-first search with colours."""
    colour, stack = {m: 0 for m in g}, []          # 0 new, 1 on the stack, 2 done

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if colour[d] == 1:
                return stack[stack.index(d):] + [d]
            if colour[d] == 0 and (c := visit(d)):
                return c
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(g):
        if colour[m] == 0 and (c := visit(m)):
            return c
    return None


def test_cycle_finder_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


METHOD = ("tokens", "model", "diffusion", "likelihood", "rewards", "rollout", "rl")   # in reading order


def test_the_method_modules_import_only_each_other():
    """tokens and model import nothing of the project; every other method module only earlier ones."""
    g = graph()
    for i, m in enumerate(METHOD):
        allowed = set(METHOD[:i]) if m not in ("tokens", "model") else set()
        assert g[m] <= allowed, f"{m}.py imports {sorted(g[m] - allowed)}: a method module imports only {sorted(allowed)}"


def test_the_import_rule_would_catch_a_method_module_importing_the_world():
    """The rule above on a hand-made graph where rewards imports the world: it must fail there."""
    g = {**graph(), "rewards": {"tokens", "world"}}
    assert not g["rewards"] <= set(METHOD[:METHOD.index("rewards")])


def test_no_library_module_imports_an_entry_script():
    lib = set(modules()) - ENTRY
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m in lib for d in deps & ENTRY]
    assert not bad, bad


def test_no_top_level_module_is_much_over_600_lines():
    long = {m: n for m in modules() if (n := len(open(os.path.join(ROOT, m + ".py")).read().splitlines())) > 620}
    assert not long, long


def test_no_top_level_module_imports_the_studies():
    studies, core = set(modules("studies")), set(modules())
    bad = [f"{m}.py imports studies/{d}.py" for m, deps in graph().items() if m in core for d in deps & studies]
    assert not bad, bad


def test_project_imports_at_the_top_unless_a_comment_says_why():
    bad = []
    mods = {**modules(), **modules("studies")}
    where = {**{m: m + ".py" for m in modules()}, **{m: os.path.join("studies", m + ".py") for m in modules("studies")}}
    for m, tree in mods.items():
        with open(os.path.join(ROOT, where[m])) as f:
            lines = f.read().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                if imported(n) & set(mods) and "#" not in lines[n.lineno - 1]:
                    bad.append(f"{m}.py:{n.lineno} {fn.name}: {lines[n.lineno - 1].strip()}")
    assert not bad, bad


def test_rl_step_and_every_function_of_rl_and_rollout_fit_a_screen():
    """rl.rl_step reads as the algorithm on one screen; no function of rl.py or rollout.py is longer
    than 60 lines (counted from `def` to its last line, docstring included)."""
    long = []
    for m in ("rl", "rollout"):
        for fn in ast.walk(modules()[m]):
            if isinstance(fn, ast.FunctionDef) and fn.end_lineno - fn.lineno + 1 > 60:
                long.append(f"{m}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines")
    assert not long, long
    step = next(f for f in ast.walk(modules()["rl"]) if isinstance(f, ast.FunctionDef) and f.name == "rl_step")
    assert step.end_lineno - step.lineno + 1 <= 60
