"""
Every documented switch does what METHOD.md says, or is refused with a one-line config error.

Each test below takes one switch outside the toy defaults and checks the reading METHOD.md states,
against a reference built in the test (a count by hand, a binomial bound, a second run with the
switch off). Each test of a fix failed on the code before it (the docstrings say how); the cases that
accept a configuration and test_dropout_would_break_rho_one (why the fix is needed) pass on both.

  KL ablation       rl.triplets keeps every group member when rl.kl_coef > 0 (METHOD.md §4)
  tree search       rollout.parse_tree_tasks: text-only tasks take only H / Ht rounds (§6)
  shared_t          one t1 per RL step, over micro-batches and epochs (§7)
  difficulty draws  realised level shares, clipped sets, a split with no level of a family (§8)
  CFG in RL         the rollouts sample the unguided policy (§3)
  dropout           the RL update scores the policy in eval mode, as it sampled (§4)
  users' data       word answers score; held-out rows that repeat training rows are dropped (§8)
(the ELBO weight of full-mask SFT rows is checked in test_diffusion.py::test_sft_loss_full_mask_frac)

    python -m pytest tests/test_switches.py -q
"""
import copy
import json
import math
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
import config as C
import diffusion as D
import likelihood as LK
import rewards as RW
import rl
import rollout as RO
import tokens as T
import user_data as U
import world as W
import world_extras as WX
from test_distributed import make_bundle, rl_context, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny config, its bundle (fake VQ) and a 1-layer model."""
    d = tmp_path_factory.mktemp("switches")
    cfg = tiny_config(str(d / "run"), str(d / "cache"))
    bundle = make_bundle(cfg)
    torch.manual_seed(0)
    model = common.build_model(cfg, bundle.tok, "cpu")
    return SimpleNamespace(cfg=cfg, bundle=bundle, model=model)


def one_process():
    return common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, "unused")


def groups_of(bundle, task: str, rewards: torch.Tensor) -> RO.Groups:
    """Groups of `task` with the given (G, n) rewards; every slot holds the prompt's own SFT response
    (the tokens do not matter to which rows are kept, only to the loss)."""
    G, n = rewards.shape
    ts = bundle.sets[task]["sft"]
    full = T.collate({task: ts}, [(task, i) for i in range(G)], bundle.tok)
    base = T.collate({task: ts}, [(task, i) for i in range(G)], bundle.tok, responses=False)
    toks = full.tokens[:, None].expand(G, n, -1).clone()
    return RO.Groups(task, [ts.examples[i] for i in range(G)], ts.layout, base, toks, rewards,
                     torch.ones(G, n, dtype=torch.bool), torch.zeros(G, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# 1. GRPO + KL: the KL covers every sampled row


def test_the_kl_ablation_keeps_every_group_member(tiny):
    """3 prompts x 8 samples, one group all equal at 0.5: under the paper's objective the 7 rows of
    that group with A = 0 are not run (17 rows, N = 24); under the KL ablation all 24 are, and the KL
    term of the update covers all 24. Before the fix the ablation kept the same 17 rows."""
    cfg = copy.deepcopy(tiny.cfg)
    cfg.rl.sft_rows, cfg.rl.likelihood, cfg.rl.gamma = 0, "one_step", 0.5
    r = torch.tensor([[0, 1, 0, 1, 1, 0, 0, 1], [0.5] * 8, [0.2, 0.9, 0.4, 0.4, 0.1, 0.3, 0.8, 0.6]])
    g = groups_of(tiny.bundle, "vqa", r.float())
    advs = [rl.group_advantages(g, cfg.rl)]
    ro = rl_context(tiny.model, tiny.bundle, cfg, one_process(), torch.Generator().manual_seed(0))
    paper = rl.triplets([g], advs, ro, None)
    assert (paper.n, len(paper.adv)) == (24, 17)
    cfg.rl.kl_coef = 0.1
    trip = rl.triplets([g], advs, ro, None)
    assert (trip.n, len(trip.adv)) == (24, 24)
    assert torch.equal(trip.adv, advs[0].reshape(-1))          # the zero rows keep A = 0 (no J term)
    model = copy.deepcopy(tiny.model)
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    upd = rl.policy_update(rl_context(model, tiny.bundle, cfg, one_process(), torch.Generator().manual_seed(0)),
                           opt, trip, one_process(), ref)
    assert sum(kl.shape[1] for _, kl, _, _ in upd.parts) == 24


# ----------------------------------------------------------------------------------------------
# 2. tree search on a text-only task


@pytest.mark.parametrize("tasks,schedule,ok", [
    ("edit", "0,2", ("edit",)),
    ("edit, ground", "0,H", ("edit", "ground")),       # a space: before, "ground" was silently dropped
    (" vqa ,edit", "0,Ht", ("vqa", "edit")),
    ("ground", "0,2", None),                           # before: N copies of the parent
    ("vqa", "0,Hi", None),                             # the same, through the image-only letter
    ("edit,vqa", "0,H,3", None),
    ("edt", "0,2", None),                              # a typo: before, tree search silently off
    ("t2i", "0,2", None),                              # not an RL task
])
def test_tree_tasks_are_parsed_strictly(tasks, schedule, ok):
    if ok is not None:
        assert RO.parse_tree_tasks(tasks, schedule) == ok
        C.validate(C.make_config("toy", {"rl.tree_tasks": tasks, "rl.tree_schedule": schedule}))
        return
    with pytest.raises(ValueError, match="tree_tasks"):
        RO.parse_tree_tasks(tasks, schedule)
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.make_config("toy", {"rl.tree_tasks": tasks, "rl.tree_schedule": schedule}))
    assert "\n" not in str(e.value) and "--rl.tree_tasks" in str(e.value)


# ----------------------------------------------------------------------------------------------
# 3. shared_t: one t1 per step


def test_shared_t_is_one_t1_for_the_whole_step(tiny, monkeypatch):
    """6 rows, micro-batches of 2, mu = 2: 3 micro-batches x (1 old-policy pass + 2 epochs) = 9
    estimates, all at one masking rate, the same for every row. Before, each micro-batch drew its own."""
    cfg = copy.deepcopy(tiny.cfg)
    cfg.rl.shared_t, cfg.rl.ppo_epochs, cfg.train.micro_batch = True, 2, 2
    seen = []
    real = LK.complementary

    def spy(model, batch, tok, generator=None, norm="sum", shared_t=False, t1=None):
        out = real(model, batch, tok, generator, norm, shared_t, t1)
        seen.append(None if t1 is None else t1.tolist())
        return out

    monkeypatch.setattr(LK, "complementary", spy)
    batch = T.collate({"vqa": tiny.bundle.sets["vqa"]["sft"]}, [("vqa", i) for i in range(6)], tiny.bundle.tok)
    trip = rl.Triplets(batch, torch.tensor([1.0, -1.0, 0.5, 1.0, -0.5, 0.25]), 8)
    model = copy.deepcopy(tiny.model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rl.policy_update(rl_context(model, tiny.bundle, cfg, one_process(), torch.Generator().manual_seed(3)),
                     opt, trip, one_process())
    assert len(seen) == 9 and None not in seen
    rates = {v for rows in seen for v in rows}
    assert len(rates) == 1 and 0 <= rates.pop() <= 1


# ----------------------------------------------------------------------------------------------
# 4. difficulty draws


def test_realised_level_shares_are_the_drawn_ones():
    """Grounding's SFT split at levels 1,2 draws level 2 with probability hard_frac = 0.4; a scene
    that cannot pose level 2 is redrawn at level 2, so the realised share is 0.4 within 4 sigma of
    the binomial. Before, the redraw also redrew the level and level 2 came out near 30 %."""
    d = C.make_config("toy", {"data.n_sft": 1500, "data.n_rl": 1, "data.n_eval": 1, "data.n_val": 1}).data
    pools = W.build_pools(d, WX.world_for(d))
    levels = Counter(e.level for e in pools["ground"]["sft"])
    n, p = 1500, d.hard_frac
    assert abs(levels[2] - n * p) < 4 * math.sqrt(n * p * (1 - p)), levels


def test_rl_levels_of_grounding_are_uniform():
    """Grounding's RL split at levels 1,2,3: a third each within 4 sigma (before: 48 / 29 / 23 %)."""
    d = C.make_config("toy", {"data.n_sft": 1, "data.n_rl": 1500, "data.n_eval": 1, "data.n_val": 1}).data
    levels = Counter(e.level for e in W.build_pools(d, WX.world_for(d))["ground"]["rl"])
    n, p = 1500, 1 / 3
    for lv in (1, 2, 3):
        assert abs(levels[lv] - n * p) < 4 * math.sqrt(n * p * (1 - p)), levels


def test_a_set_clipped_to_one_two_is_drawn_uniformly():
    """eval levels 1,2,3 for a family whose levels stop at 2 (edit with --data.edit_max_level=2):
    levels 1 and 2 half each, not the hard_frac rule of a split configured as 1,2 (before: 60 / 40)."""
    rng = np.random.default_rng(0)
    n = 4000
    twos = sum(W.draw_level(rng, (1, 2, 3), 0.4, 2) == 2 for _ in range(n))
    assert abs(twos - n / 2) < 4 * math.sqrt(n / 4)
    twos = sum(W.draw_level(rng, (1, 2), 0.4, 3) == 2 for _ in range(n))          # configured 1,2
    assert abs(twos - 0.4 * n) < 4 * math.sqrt(n * 0.24)


@pytest.mark.parametrize("flags,ok", [
    ({"data.eval_levels": "4"}, False),                 # grounding has 1-3: before, level 3 was swapped in
    ({"data.eval_levels": "3,4"}, True),                # grounding keeps 3, vqa gets 3 and 4
    ({"data.rl_levels": "3"}, True),                    # edit has one level: it poses it everywhere
    ({"data.rl_levels": "3", "data.edit_max_level": 2}, False),    # edit 1-2, none asked for
])
def test_a_split_that_names_none_of_a_familys_levels_is_refused(flags, ok):
    cfg = C.make_config("toy", flags)
    if ok:
        C.validate(cfg)
        return
    with pytest.raises(C.ConfigError) as e:
        C.validate(cfg)
    assert "\n" not in str(e.value) and "levels" in str(e.value)


# ----------------------------------------------------------------------------------------------
# 5. CFG inside RL


def test_rollouts_sample_the_unguided_policy(tiny):
    """With --diffusion.cfg_scale=3 the edit rollouts equal those of cfg_scale=0 draw for draw (the
    policy log pi scores); guidance itself changes the samples (the control), so before, the
    rollouts came from another distribution than the one the update scored."""
    ts = tiny.bundle.sets["edit"]["rl"]
    base = T.collate({"edit": ts}, [("edit", 0), ("edit", 1)], tiny.bundle.tok, responses=False)
    out = {}
    for g in (0.0, 3.0):
        cfg = copy.deepcopy(tiny.cfg)
        cfg.diffusion.cfg_scale = g
        ro = rl_context(tiny.model, tiny.bundle, cfg, one_process(), torch.Generator().manual_seed(5))
        out[g] = RO.policy_sample(ro, base.repeat(3))[0]
    assert torch.equal(out[0.0], out[3.0])
    guided = D.sample(tiny.model, base.repeat(3), tiny.bundle.tok, RO.rollout_diffusion(tiny.cfg), temperature=1.0,
                      image_temperature=1.0, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))[0]
    assert not torch.equal(guided, out[0.0])


# ----------------------------------------------------------------------------------------------
# 7. dropout: the update scores the policy in eval mode, as it sampled


def test_with_dropout_rho_starts_at_one_and_the_kl_at_zero(tiny):
    """--model.dropout=0.3, mu = 2 with a clip band of 0.001, the KL ablation, and a learning rate of 0
    so that the weights never move: the second epoch's ratio is exactly 1 (no term clipped) and every
    KL term is 0, as for a model without dropout. Before, the update ran in train mode: the old
    policy, the new one and the reference each saw other dropout masks (rho != 1, KL > 0)."""
    cfg = copy.deepcopy(tiny.cfg)
    cfg.model.dropout = 0.3
    cfg.rl.likelihood, cfg.rl.ppo_epochs, cfg.rl.clip_eps, cfg.rl.kl_coef = "complementary", 2, 1e-3, 0.1
    torch.manual_seed(0)
    model = common.build_model(cfg, tiny.bundle.tok, "cpu")
    ref = copy.deepcopy(model).eval()
    model.train()                                     # as a caller may hand it over
    batch = T.collate({"vqa": tiny.bundle.sets["vqa"]["sft"]}, [("vqa", i) for i in range(4)], tiny.bundle.tok)
    trip = rl.Triplets(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), 4)
    upd = rl.policy_update(rl_context(model, tiny.bundle, cfg, one_process(), torch.Generator().manual_seed(1)),
                           torch.optim.SGD(model.parameters(), lr=0.0), trip, one_process(), ref)
    assert upd.skipped is None and upd.parts
    for terms, kl, clipped, _ in upd.parts:
        assert clipped is not None and not clipped.any()
        assert torch.equal(kl, torch.zeros_like(kl))


def test_dropout_would_break_rho_one(tiny):
    """Why eval mode: under dropout the policy in train mode scores the same rows on the same masks
    differently from one pass to the next; in eval mode the two passes agree."""
    cfg = copy.deepcopy(tiny.cfg)
    cfg.model.dropout, cfg.rl.likelihood = 0.3, "one_step"
    torch.manual_seed(0)
    model = common.build_model(cfg, tiny.bundle.tok, "cpu")
    batch = T.collate({"vqa": tiny.bundle.sets["vqa"]["sft"]}, [("vqa", i) for i in range(3)], tiny.bundle.tok)
    twice = lambda: [rl.token_terms(model, batch, tiny.bundle.tok, cfg.rl, seed=7).seq() for _ in range(2)]
    with torch.no_grad():
        model.train()
        a, b = twice()
        assert not torch.allclose(a, b)
        model.eval()
        a, b = twice()
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# 8. users' data


SCENE = (None, W.Shape("circle", "red", "large"), None, None) + (None,) * 12


def write_rows(folder, rows) -> str:
    Image.fromarray(W.render(SCENE, 4, 32)).save(os.path.join(folder, "pic.png"))
    Image.fromarray(W.render(SCENE[::-1], 4, 32)).save(os.path.join(folder, "other.png"))
    path = os.path.join(folder, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_a_word_answer_scores_when_the_model_writes_it(tmp_path):
    """A user's vqa row answered "Red": the model's "<answer> red </answer>" scores 1 (before: 0,
    as "garbage"), another word scores 0, and a number truth still compares by value."""
    rows = [{"task": "vqa", "image": "pic.png", "prompt": "what colour is the circle ?", "answer": "Red"}]
    (ex,), _ = U.load_jsonl(write_rows(tmp_path, rows), C.make_config("toy").data)
    assert RW.vqa_reward("<think> r0c1 . </think> <answer> red </answer>", ex.answer) == (1.0, "ok")
    assert RW.vqa_reward("<answer>  RED </answer>", ex.answer)[0] == 1.0
    assert RW.vqa_reward("<answer> blue </answer>", ex.answer)[0] == 0.0
    assert RW.vqa_reward("<answer> 3.0 </answer>", "3") == (1.0, "ok")
    assert RW.vqa_reward("<answer> red </answer>", "3") == (0.0, "garbage")


def test_held_out_rows_that_repeat_training_rows_are_dropped(tmp_path):
    """An eval row with the picture and prompt of an sft row, and a val row repeating that eval row,
    are dropped and counted; a row with another picture stays (before: all kept, silently)."""
    resp = "<think> r0c1 . </think> <answer> 1 </answer>"
    rows = [{"task": "vqa", "image": "pic.png", "prompt": "how many circles ?", "response": resp},
            {"task": "vqa", "image": "pic.png", "prompt": "how many  circles ?", "answer": "1", "split": "eval"},
            {"task": "vqa", "image": "other.png", "prompt": "how many circles ?", "answer": "1", "split": "eval"},
            {"task": "vqa", "image": "other.png", "prompt": "how many circles ?", "answer": "1", "split": "val"},
            {"task": "vqa", "image": "pic.png", "prompt": "how many circles ?", "answer": "1"}]   # rl: may repeat sft
    exs, skipped = U.load_jsonl(write_rows(tmp_path, rows), C.make_config("toy").data)
    assert [e.key for e in exs] == ["user|1", "user|3", "user|5"]
    assert len(skipped) == 2 and ":2: eval row repeats line 1" in skipped[0] and ":4: val row repeats line 3" in skipped[1]


@pytest.mark.parametrize("answer", ["", "  ", "<answer> 3 </answer>"])
def test_a_vqa_answer_that_cannot_be_matched_is_refused(tmp_path, answer):
    """An empty answer, or one holding a tag, could never be written back inside one answer block:
    the row is an error naming its line (skipped in lenient mode) instead of a prompt that scores 0."""
    rows = [{"task": "vqa", "image": "pic.png", "prompt": "what colour ?", "answer": answer}]
    path = write_rows(tmp_path, rows)
    with pytest.raises(U.JSONLError, match=r"rows.jsonl:1: the vqa answer"):
        U.load_jsonl(path, C.make_config("toy").data, strict=True)
    exs, skipped = U.load_jsonl(path, C.make_config("toy").data, strict=False)
    assert exs == [] and len(skipped) == 1
