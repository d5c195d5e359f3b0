# %% [markdown]
# # LaViDa-R1 in one sitting
#
# A walk through the method with the project's own functions (METHOD.md gives the equations):
# the tasks, a masked-diffusion model answering by denoising, the complementary estimate of
# log pi against its exact value, answer-forcing, one tree-search round, and one RL step with
# every intermediate printed. Each cell asserts what it prints.
#
#     python walkthrough.py            # uses runs/toy's checkpoint when the main job has run (81 s on a
#                                      # busy 2-core CPU), else trains a tiny model first
#     python walkthrough.py --tiny     # always the tiny model (what CI runs: 25-60 s on 2 cores)
#
# The file is in percent-cell format: editors that read `# %%` open it as a notebook.

# %%
import copy
import math
import os
import subprocess
import sys
import tempfile

import torch

import common
import likelihood as LK
import rl
import rollout as RO
import tokens as T
from data import TaskSampler, load_run, picture_judge
from diffusion import sample
from rewards import score_rows

torch.manual_seed(0)
torch.set_num_threads(1)
TINY = "--tiny" in sys.argv or not os.path.exists("runs/toy/ckpt_rl.pt")

# %% [markdown]
# ## 1. The model
# The main job's RL checkpoint when there is one; otherwise a 1-layer model trained for a few
# hundred SFT steps on small pools (it reads pictures badly, which is fine here: the point is the
# mechanics, and a model that fails gives answer-forcing something to do).

# %%
if TINY:
    out = tempfile.mkdtemp(prefix="walkthrough_")
    flags = [f"--out_dir={out}", f"--data.cache_dir={out}/cache", "--data.n_sft=200", "--data.n_rl=50",
             "--data.n_eval=20", "--data.n_val=10", "--model.n_layer=1", "--model.d_model=64", "--vq.steps=200",
             "--vq.n_images=500", "--train.max_steps=300", "--train.eval_interval=0", "--train.log_interval=100",
             "--rl.max_steps=0", "--stage=sft"]
    # the same command a user runs (the walkthrough is a reader of the library, not a part of it)
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), *flags],
                   check=True, stdout=subprocess.DEVNULL)
    ckpt = os.path.join(out, "ckpt_sft.pt")
else:
    out, ckpt = "runs/toy", "runs/toy/ckpt_rl.pt"
cfg, bundle, model, vq, _ = load_run(ckpt, tempfile.mkdtemp(prefix="walkthrough_logs_"), "walkthrough")
tok, sets = bundle.tok, bundle.sets
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters from {ckpt}")

# %% [markdown]
# ## 2. The tasks
# Four families over one shape world (METHOD.md §8): vqa and grounding answer in text after a
# reasoning trace, editing and text-to-image answer in VQ image codes.

# %%
for task in T.TASKS:
    ex = sets[task]["sft"].examples[0]
    print(f"[{task}] level {ex.level}: {ex.prompt}")
    print(f"    trace: {ex.trace}")
    print(f"    answer: {ex.answer_text if ex.answer_text else '(a picture)'}")
    assert ex.prompt

# %% [markdown]
# ## 3. Answering by denoising (METHOD.md §3)
# The response starts fully masked; each step reveals the slots the model is most sure of.

# %%
ts = sets["vqa"]["eval"]
base = T.collate({"vqa": ts}, [("vqa", 0)], tok, responses=False)
frames = []
toks, order = sample(model, base, tok, cfg.diffusion, on_step=lambda g, x: frames.append(x[0, base.P:].clone()))
for g in range(0, len(frames), max(1, len(frames) // 4)):
    print(f"step {g:2d}: {tok.decode(frames[g][:ts.layout.R_text])}")
print(f"final  : {tok.decode(toks[0, base.P:base.P + ts.layout.R_text])}")
r, why, _, _ = score_rows("vqa", [ts.examples[0]], toks[:, base.P:base.P + ts.layout.R].cpu(), ts.layout, tok,
                          picture_judge(cfg, vq))
print(f"truth {ts.examples[0].answer!r}: reward {r[0]} ({why[0]})")
assert len(frames) > 1 and r[0] in (0.0, 1.0)

# %% [markdown]
# ## 4. log pi by complementary masking, against the exact value (METHOD.md §7, Eq. C)
# Two complementary masks score every response token once; its expectation over t1 is computed
# exactly by enumerating every mask on a short response (here: a 5-token window of the answer).

# %%
full = T.collate({"vqa": ts}, [("vqa", 0)], tok)
P, L = full.P, 5
keep = full.is_resp.clone()
idx = keep[0].nonzero().squeeze(1)
keep[0, idx[L:]] = False                      # score only the first L response tokens
short = full.with_tokens(full.tokens)
short.is_resp = keep
ex_val = LK.exact(model, short, tok)
g = torch.Generator().manual_seed(0)
draws = torch.stack([LK.complementary(model, short, tok, generator=g).seq() for _ in range(400)]).squeeze(1)
mean, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
print(f"exact E[Eq. C] {ex_val['complementary']:.4f} | Monte Carlo mean of 400 draws {mean:.4f} +- {se:.4f} (1 se)")
print(f"the ELBO {ex_val['elbo']:.4f} <= the any-order log-likelihood {ex_val['any_order']:.4f}")
assert abs(mean - ex_val["complementary"]) < 4 * se + 1e-4

# %% [markdown]
# ## 5. Answer-forcing on a failed prompt (METHOD.md §5)
# When every sample of a group fails, the ground-truth answer is written at the end of the canvas
# and the model inpaints the reasoning before it; that sample joins the group.

# %%
ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, out)
rcfg = copy.deepcopy(cfg)
rcfg.rl.af_prob, rcfg.rl.group_size = 1.0, 4
ro = RO.RolloutContext(model, tok, sets, picture_judge(rcfg, vq), rcfg, "cpu", ctx.autocast,
                       torch.Generator().manual_seed(1))
lay, exs = ts.layout, ts.examples[:1]
fail = torch.zeros(1, rcfg.rl.group_size)                         # suppose all four samples failed
joins, t_f, r_f, _ = RO.answer_forcing(ro, base, exs, fail, lay)
print(f"joined: {bool(joins[0])} | forced sample: {tok.decode(t_f[0, base.P:base.P + lay.R_text])} | reward {r_f[0]:.1f}")
assert bool(joins[0]) and r_f[0] == 1.0                          # the fixed answer is the truth

# %% [markdown]
# ## 6. One tree-search round on an edit (METHOD.md §6)
# Round 0 draws N samples; round 1 rebuilds the best one at image step 2 and branches N more.

# %%
rcfg.rl.tree_schedule, rcfg.rl.group_size = "0,2", 4
ro = RO.RolloutContext(model, tok, sets, picture_judge(rcfg, vq), rcfg, "cpu", ctx.autocast,
                       torch.Generator().manual_seed(2))
g_edit = RO.sample_groups(ro, "edit", [0])
print(f"edit rewards, round 0: {[round(x, 3) for x in g_edit.rewards[0, :4].tolist()]}")
print(f"              round 1: {[round(x, 3) for x in g_edit.rewards[0, 4:].tolist()]}")
assert g_edit.rounds == 2 and g_edit.rewards.shape == (1, 8)

# %% [markdown]
# ## 7. One RL step, every intermediate printed (METHOD.md §4, Eq. G, D, A, U)

# %%
rcfg.rl.af_prob, rcfg.rl.group_size, rcfg.rl.sft_rows, rcfg.rl.lr = 0.5, 4, 4, 1e-3
ro = RO.RolloutContext(model, tok, sets, picture_judge(rcfg, vq), rcfg, "cpu", ctx.autocast,
                       torch.Generator().manual_seed(3))
groups = [RO.sample_groups(ro, t, [0, 1]) for t in ("vqa", "ground")]
advs = [rl.group_advantages(g, rcfg.rl) for g in groups]
for g, a in zip(groups, advs):           # the last slot is the answer-forced one: a member only if it joined
    print(f"[{g.task}] rewards {[[round(x, 2) for x in row] for row in g.rewards.tolist()]}, forced joined: "
          f"{g.forced.tolist()}")
    print(f"       A (Eq. A, gamma {rcfg.rl.gamma}) {[[round(x, 2) for x in row] for row in a.tolist()]}")
sft = TaskSampler(sets, "sft", {"vqa": 1.0, "ground": 1.0}, seed=0)
trip = rl.triplets(groups, advs, ro, sft)
print(f"triplets kept: {len(trip.adv)} (SFT rows {rcfg.rl.sft_rows} with A = 1, then the A != 0 members); N = {trip.n}")


def J(m):                                     # J = (1/N) sum_i A_i log pi(y_i | x_i), on fixed masks
    with torch.no_grad():
        return (trip.adv * rl.token_terms(m.eval(), trip.batch, tok, rcfg.rl, seed=7).seq()).sum().item() / trip.n


policy = copy.deepcopy(model)
before = J(policy)
upd = rl.policy_update(RO.RolloutContext(policy, tok, sets, None, rcfg, "cpu", ctx.autocast, torch.Generator().manual_seed(4)),
                       torch.optim.SGD(policy.parameters(), lr=rcfg.rl.lr), trip, ctx)
after = J(policy)
print(f"-J before {-before:.4f} -> after one step {-after:.4f} (gradient norm {upd.grad:.3f})")
assert trip.n == rcfg.rl.sft_rows + sum(int(g.member.sum()) for g in groups)
assert after > before                         # one small step up the objective
print("walkthrough done")
