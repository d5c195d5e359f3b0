"""
The reading path of one RL update: every project definition that one `rl.rl_step` runs under the toy
defaults, in the order a reader meets them following the calls depth-first (METHOD.md §4 lists it).

    python studies/reading_path.py                 # a randomly initialised toy model, 6 RL steps
    python studies/reading_path.py --steps=5 --ckpt=runs/toy/ckpt_sft.pt
    python studies/reading_path.py --static        # every definition reachable by name, every branch
    python studies/reading_path.py --static --open_all   # ... following into the network and the plumbing too

How it counts: a profiler hook records each function or method of a top-level module the first time
it runs (a dataclass counts once, when it is first built; a function's inner helpers and
comprehensions count with it), in call order, which is depth-first. Calls made inside the network
(model.py), the picture decoder (vq.py), the scene reader (world.py) and the plumbing (common.py: the
run's device and ranks; data.py: the SFT-row sampler) are not followed: each definition called there
from the method counts as one that a reader need not open. Several steps are run (union), so that answer-forcing, which fires on a coin, is met too. The
static upper bound over every branch is --static: every top-level definition reachable from
rl.rl_step by name (a call, a type hint, an attribute of an imported module, or a method name only one
project class defines), ablations included; it runs nothing. The toy config is fixed (no config
keys); --steps and --ckpt with --static, or --open_all without it, are one-line errors.
"""
from __future__ import annotations

import ast
import glob
import inspect
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402
import config as C  # noqa: E402
import data  # noqa: E402
import rl  # noqa: E402
import train  # noqa: E402   (the RL stage's prompts per task)
import vq as VQ  # noqa: E402
from rollout import RolloutContext  # noqa: E402
from study import parse_options  # noqa: E402
from tokens import parse_mix  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# modules whose definitions count once each and are not followed: the network (model.py knows nothing of
# the method: token ids in, logits out), the picture decoder, the scene reader, and the plumbing (the run's
# device and ranks, the SFT-row sampler)
SEALED = {"model", "vq", "world", "common", "data"}


def project_module(filename: str) -> str | None:
    """The top-level project module a code object belongs to, or None (torch, studies/, tests/)."""
    path = os.path.abspath(filename)
    if os.path.dirname(path) == ROOT and path.endswith(".py"):
        return os.path.basename(path)[:-3]
    return None


class PathRecorder:
    """sys.setprofile hook: the project definitions in the order they first run, not descending into
    SEALED modules. seen: "module.qualname" -> (module, first line)."""

    def __init__(self):
        self.seen: dict[str, tuple[str, int]] = {}
        self.sealed_depth = 0                    # > 0 while inside a sealed definition

    def __call__(self, frame, event, arg):
        code = frame.f_code
        mod = project_module(code.co_filename)
        if mod is None and code.co_name == "__init__" and "self" in frame.f_locals:   # a generated dataclass __init__
            cls = type(frame.f_locals["self"])
            if project_module(sys.modules[cls.__module__].__file__ or "") and event == "call" and not self.sealed_depth:
                key = f"{cls.__module__}.{cls.__qualname__}"
                if key not in self.seen:
                    self.seen[key] = (cls.__module__, inspect.getsourcelines(cls)[1])
            return
        if mod is None:
            return
        if event == "call":
            if not self.sealed_depth:
                self.seen.setdefault(f"{mod}.{code.co_qualname}", (mod, code.co_firstlineno))
            if mod in SEALED:
                self.sealed_depth += 1
        elif event == "return" and mod in SEALED:
            self.sealed_depth -= 1


def static_reach(entry: str = "rl.rl_step", sealed=SEALED) -> list[tuple[str, int, int]]:
    """(module.qualname, first line, lines) of every definition reachable from `entry` by name, in
    depth-first order, over the top-level modules (read with ast; nothing is imported). A definition of
    a SEALED module is listed but not followed, as in the traced count."""
    trees = {os.path.basename(p)[:-3]: ast.parse(open(p).read()) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    defs, methods, alias = {}, {}, {}
    for m, tree in trees.items():
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                defs[f"{m}.{n.name}"] = n
                for k in (n.body if isinstance(n, ast.ClassDef) else []):
                    if isinstance(k, ast.FunctionDef):
                        defs[f"{m}.{n.name}.{k.name}"] = k
                        methods.setdefault(k.name, []).append(f"{m}.{n.name}.{k.name}")
        alias[m] = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                alias[m].update({a.asname or a.name: a.name for a in n.names if a.name in trees})
            elif isinstance(n, ast.ImportFrom) and n.module in trees:
                alias[m].update({a.asname or a.name: f"{n.module}.{a.name}" for a in n.names})

    def callees(key):
        m, node = key.split(".")[0], defs[key]
        cls = key.split(".")[1] if key.count(".") == 2 else None
        body = [node] if isinstance(node, ast.FunctionDef) else \
            [k for k in node.body if not isinstance(k, ast.FunctionDef) or k.name in ("__init__", "__post_init__", "forward")]
        for b in body:
            for n in ast.walk(b):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                    t = f"{m}.{n.id}" if f"{m}.{n.id}" in defs else alias[m].get(n.id)
                elif isinstance(n, ast.Attribute):
                    v, t = n.value, None
                    if isinstance(v, ast.Name) and alias[m].get(v.id) in trees:
                        t = f"{alias[m][v.id]}.{n.attr}"
                    elif isinstance(v, ast.Name) and v.id == "self" and cls:
                        t = f"{m}.{cls}.{n.attr}"
                    elif len(methods.get(n.attr, [])) == 1:
                        t = methods[n.attr][0]
                else:
                    continue
                if t in defs and t != key:
                    yield t

    order, seen = [], set()

    def visit(k):
        if k not in seen:
            seen.add(k)
            order.append(k)
            if k.split(".")[0] not in sealed:        # the network, the decoder, the reader, the plumbing
                for c in callees(k):
                    visit(c)
    visit(entry)
    opened_classes = {k for k in order if isinstance(defs[k], ast.ClassDef)}
    return [(k, defs[k].lineno, defs[k].end_lineno - defs[k].lineno + 1) for k in order
            if k.rsplit(".", 1)[0] not in opened_classes]         # a method inside a listed class counts once


def setup(opts: dict):
    """(RolloutContext, optimizer, ctx, draws, sft sampler, prompt picker) of a small toy run: the toy
    config with small pools in a scratch cache, an untrained VQ (the decoder is a black box here), and
    --ckpt's model or a randomly initialised one."""
    cfg = C.make_config("toy", {"data.n_sft": 200, "data.n_rl": 200, "data.n_eval": 20, "data.n_val": 20,
                                "data.cache_dir": os.path.join("runs", "reading_path", "cache")})
    ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, os.path.join("runs", "reading_path"))
    os.makedirs(ctx.out_dir, exist_ok=True)
    torch.manual_seed(0)
    vq = VQ.VQVAE(cfg.vq, cfg.data.image_size).eval()
    bundle = data.get_bundle(cfg, vq, ctx)
    model = common.build_model(cfg, bundle.tok, "cpu")
    if opts["ckpt"]:
        model = data.load_run(opts["ckpt"], ctx.out_dir, "reading_path")[2]
    opt = common.make_optimizer(model, cfg.rl.lr, cfg.train.weight_decay, "cpu")
    gen = torch.Generator().manual_seed(11)
    ro = RolloutContext(model, bundle.tok, bundle.sets, data.picture_judge(cfg, vq), cfg, "cpu", ctx.autocast, gen)
    sft = data.TaskSampler(bundle.sets, "sft", parse_mix(cfg.train.task_mix), 7)
    return ro, opt, ctx, train.prompt_draws(cfg.rl), sft, torch.Generator().manual_seed(13)


OPTIONS = {"steps": 6, "ckpt": "", "static": False, "open_all": False}


def options(argv: list[str]) -> dict:
    """The options (OPTIONS; the toy config is fixed: no config keys), with one-line errors for those
    the chosen mode does not read: --static runs nothing (--steps, --ckpt), --open_all is --static's."""
    _, opts, given = parse_options("reading_path.py", argv, OPTIONS, __doc__.strip())
    if opts["static"] and given & {"steps", "ckpt"}:
        k = sorted(given & {"steps", "ckpt"})[0]
        raise SystemExit(f"reading_path.py: --{k}={opts[k]}: --static runs nothing, so it would change nothing; "
                         f"drop --{k} or --static")
    if opts["open_all"] and not opts["static"]:
        raise SystemExit("reading_path.py: --open_all: only --static follows every definition; add --static "
                         "(the traced path always marks the calls not opened)")
    if opts["steps"] < 1:
        raise SystemExit(f"reading_path.py: --steps={opts['steps']}: must be >= 1")
    return opts


def main(argv: list[str]):
    opts = options(argv)
    if opts["static"]:
        rows = static_reach(sealed=set() if opts["open_all"] else SEALED)
        files = [k.split(".")[0] for k, _, _ in rows]
        for k, line, n in rows:
            print(f"{k.split('.')[0]}.py:{line} {k.split('.', 1)[1]} ({n} lines)" + ("   (not opened)" if k.split(".")[0] in SEALED else ""))
        opened = [(f, n) for f, (_, _, n) in zip(files, rows) if f not in SEALED or opts["open_all"]]
        of = [f for f, _ in opened]
        print(f"static reach of rl.rl_step: {len(rows)} definitions ({len(opened)} opened, {sum(n for _, n in opened)} "
              f"lines) in {len(set(of))} files opened, {sum(a != b for a, b in zip(of, of[1:]))} file switches between "
              f"opened definitions")
        return
    torch.set_num_threads(1)
    ro, opt, ctx, draws, sft, pick = setup(opts)
    rec = PathRecorder()
    forced = 0
    for _ in range(opts["steps"]):
        sys.setprofile(rec)
        try:
            st = rl.rl_step(ro, opt, ctx, draws, sft, pick)
        finally:
            sys.setprofile(None)
        forced += sum(int(g.forced.sum()) for g in st.groups)
    keys = [k for k in rec.seen if "<" not in k]        # <locals>, <lambda>, <listcomp>: part of their def
    files = [rec.seen[k][0] for k in keys]
    switches = sum(a != b for a, b in zip(files, files[1:]))
    opened = [k for k, f in zip(keys, files) if f not in SEALED]
    for k, f in zip(keys, files):
        print(f"{f}.py:{rec.seen[k][1]} {k.split('.', 1)[1]}" + ("   (not opened)" if f in SEALED else ""))
    per = Counter(files)
    print("per file: " + ", ".join(f"{f} {n}" for f, n in per.most_common()))
    of = [f for f in files if f not in SEALED]
    print(f"reading path of rl.rl_step ({opts['steps']} steps, {forced} answer-forced samples): {len(keys)} definitions "
          f"({len(opened)} opened, {len(keys) - len(opened)} not opened: {', '.join(sorted(SEALED & set(files)))}) "
          f"in {len(set(of))} files opened, {sum(a != b for a, b in zip(of, of[1:]))} file switches between opened "
          f"definitions ({switches} counting the calls not opened)")


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
