# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · DiPO: policy optimisation on denoising steps
#
# DiPO (SPEC §4) is GRPO/DAPO-style RL for a block-diffusion policy: sample `G` responses per prompt,
# reward them, normalise the rewards inside each group, and raise the log-probability of the tokens of
# above-average responses. The diffusion-specific part is *which* log-probability: a token was
# committed at some denoising step, seeing its block partly masked. DiPO scores each token **in that
# very context**, reconstructed from the rollout's `step_map`, so the trainer's `ℓ_j` equals the
# decoder's recorded `logp[j]` (the "unbiased" consistency invariant, checked live at the end).

# %%
import time

import matplotlib.pyplot as plt
import torch

from dirl_min.tutorial import setup

# one torch thread, tqdm's ipywidgets warning off, and the repository on sys.path for `reference/`
ROOT, T_START = setup()

# %%
from dirl_min.model import chat_prompt_ids
from dirl_min.tutorial import DEMO_QUESTIONS, glyphs, in_blocks, trained_tiny

# glyphs(tok, ids): one character per token (⟨ ⟩ = <|im_start|> <|im_end|>, ∎ = <|endoftext|>, █ = mask,
# ⏎ = newline); in_blocks(text, B) puts a bar at every block boundary

# as in notebook 02: the tiny model after a 150-step SFT (cached), confident about the answer format
# and mostly wrong about the arithmetic, so one step can commit several tokens
model, tok = trained_tiny()
B, M = model.config.block_size, model.config.mask_token_id
STOP = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
PROMPTS = [chat_prompt_ids(tok, q) for q in DEMO_QUESTIONS]
print("prompt lengths:", [len(p) for p in PROMPTS], "→ P mod B:", [len(p) % B for p in PROMPTS])

# %% [markdown]
# ## From `step_map` to step rounds
#
# In block `k` let `s_k(ρ)` be its `ρ`-th smallest distinct step. **Round** `ρ` shows every block as it
# was just *before* its `ρ`-th step — positions with `step ≥ s_k(ρ)` are `M` — and its **targets** are
# the tokens that step committed. All blocks share a round: a noisy block sees only itself and earlier
# *clean* blocks, so the blocks of one round do not interact. Rounds per response = the most distinct
# steps in any block (≤ `B`). In code, over a whole sequence's `step_map` (0 = prompt):

# %%
def step_rounds_by_hand(full_steps, B):
    """bool [R, L] noisy (masked) and targets (read) of every round, block by block."""
    L = len(full_steps)
    blocks = [full_steps[s:s + B] for s in range(0, L, B)]
    distinct = [sorted(set(b[b > 0].tolist())) for b in blocks]  # s_k(1) < s_k(2) < … per block
    R = max(len(d) for d in distinct)
    noisy, targets = torch.zeros(R, L, dtype=torch.bool), torch.zeros(R, L, dtype=torch.bool)
    for k, (b, steps_k) in enumerate(zip(blocks, distinct)):
        for rho, s in enumerate(steps_k):
            noisy[rho, k * B:k * B + len(b)] = b >= s  # not yet committed just before step s (prompt: 0 < s)
            targets[rho, k * B:k * B + len(b)] = b == s  # committed by step s
    return noisy, targets


# %% [markdown]
# A sampled rollout (temperature 1, top-k 10, DiRL's threshold 0.9) and its rounds, by hand and by
# the library (`dirl_min.core.rounds.step_rounds`, vectorised):

# %%
from dirl_min.core.rounds import step_rounds
from dirl_min.engine.decode import generate
from dirl_min.tutorial import rounds_picture

THRESHOLD = 0.9
roll = generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_k=10, threshold=THRESHOLD,
                stop_token_ids=STOP, seeds=list(range(100, 100 + len(PROMPTS))))
i = max(range(len(roll)), key=lambda k: len(set(roll.step_map[k])) / len(roll.step_map[k]))  # the most rounds per token
p, resp, smap = roll.prompt_ids[i], roll.response_ids[i], roll.step_map[i]
full_steps = torch.tensor([0] * len(p) + smap)  # 0 = given (prompt)
noisy, targets = step_rounds(full_steps, B)
by_hand_matches = all(torch.equal(a, b) for a, b in zip(step_rounds_by_hand(full_steps, B), (noisy, targets)))
print("step_rounds == step_rounds_by_hand:", by_hand_matches)
R = noisy.shape[0]
x0 = torch.tensor(p + resp)
start = (len(p) // B) * B  # show from the first generated block on
print(f"{len(resp)} tokens, {roll.num_steps(i)} steps, {R} rounds; step_map: {smap}\n")
print(f"{'x_0':<10}", in_blocks(glyphs(tok, x0[start:]), B, start))
for r in range(R):
    xt = torch.where(noisy[r], M, x0)
    print(f"{f'x_t^{r + 1}':<10}", in_blocks(glyphs(tok, xt[start:]), B, start))
    print(f"{'  targets':<10}", in_blocks("".join("^" if t else " " for t in targets[r, start:].tolist()), B, start))

rounds_picture(noisy, targets, full_steps, B, start)
plt.show()

every_token_once = bool((targets.sum(0) == (full_steps > 0).int()).all())
print("every generated token is a target exactly once:", every_token_once)

# %% [markdown]
# The rounds of one response share `x_0`, so they are packed into **one** forward,
# `[x_t^1; …; x_t^R; x_0]`: each noisy copy sees its own block and earlier clean blocks, never another
# noisy copy (`dirl_min.core.masks.packed_rounds_mask`, compared with the reference in notebook 01):

# %%
from dirl_min.core.masks import packed_rounds_mask
from dirl_min.tutorial import draw_mask

Rs, Ls = 3, 8
fig, ax = plt.subplots(figsize=(5.5, 5.5))
draw_mask(ax, packed_rounds_mask(Rs, Ls, B), B, Ls, f"packed_rounds_mask(R={Rs}, L={Ls}, B={B})", copies=Rs + 1)
plt.show()

# %% [markdown]
# ## Group advantages and dynamic sampling
#
# Per prompt, `G` responses; `A_i = (r_i − mean_G) / (std_G + δ)` with the population std, and `A = 0`
# when the group's rewards are all equal. A group that is all-correct or all-wrong therefore has zero
# advantage everywhere: its tokens add nothing to the gradient's sum, but they still count in the
# token mean's denominator `N_tok` (below), so keeping them *dilutes* every other token's gradient —
# and their rollouts cost compute. Dynamic sampling (DAPO) drops such groups and samples more prompts,
# at most `rl.sampling_rounds` times (a cap: peers without one loop forever when the model solves
# everything or nothing). A toy batch of 4 groups, `G = 4`, accuracy rewards:

# %%
import reference.dipo as ref
from dirl_min.core.objectives import filter_groups, group_advantages

G = 4
correct = torch.tensor([1., 0., 0., 0.,   1., 1., 0., 1.,   1., 1., 1., 1.,   0., 0., 0., 0.])
adv = group_advantages(correct, G)
keep = filter_groups(correct, G)
for g in range(len(correct) // G):
    sl = slice(g * G, (g + 1) * G)
    print(f"group {g}: rewards {correct[sl].tolist()}  advantages {[round(a, 3) for a in adv[sl].tolist()]}"
          f"  sum {float(adv[sl].sum()):+.1e}  keep {bool(keep[g])}")

adv_match = torch.allclose(adv, torch.tensor(ref.group_advantages(correct.tolist(), G)), atol=1e-6)
keep_match = keep.tolist() == ref.filter_groups(correct.tolist(), G)
print("advantages and filter == reference:", adv_match, keep_match)

# %% [markdown]
# A single correct answer out of four (group 0) earns a large positive advantage; the three wrong ones
# share the negative mass. Groups 2 and 3 are dropped.
#
# ## The loss and its gradient
#
# Per target token `j` of response `i`: `ratio_j = exp(clamp(ℓ_j − ℓ_j^old, −10, 10))` (the clamp only
# keeps `exp` finite),
# `surr_j = min(ratio_j·A_i, clip(ratio_j, 1−ε_low, 1+ε_high)·A_i)`, and `L = −(1/N_tok) Σ surr_j`
# (token mean over the batch, DAPO style). DiRL does one optimisation pass per batch, so
# `ℓ^old = stopgrad(ℓ)`, the ratio is exactly 1 and the clip is inactive; the gradient is then
# `∂L/∂ℓ_j = −A_i / N_tok` on every target and 0 elsewhere — REINFORCE with a group baseline,
# evaluated at the decoding contexts. Autograd confirms it:

# %%
from dirl_min.core.objectives import dipo_loss

g = torch.Generator().manual_seed(0)
logp = (-torch.rand(2, 6, generator=g) * 3).requires_grad_()  # ℓ for 2 responses × 6 positions
target_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
advantages = torch.tensor([1.5, -0.5])
loss, stats = dipo_loss(logp, logp.detach(), advantages, target_mask)
loss.backward()
n_tok = int(target_mask.sum())
expected_grad = torch.where(target_mask, -advantages[:, None] / n_tok, torch.zeros(()))
print(f"loss {float(loss.detach()):+.4f} (= −Σ A / N_tok = {float(-(advantages[:, None] * target_mask).sum() / n_tok):+.4f}),",
      f"stats {stats}")
print("grad:\n", logp.grad)
grad_is_minus_A_over_N = torch.allclose(logp.grad, expected_grad)
print("grad == −A/N_tok on targets, 0 elsewhere:", grad_is_minus_A_over_N)

ref_loss, _ = ref.dipo_loss(logp.tolist(), logp.tolist(), advantages.tolist(), target_mask.tolist())
loss_matches_reference = abs(ref_loss - float(loss.detach())) < 1e-6
print("loss == reference.dipo.dipo_loss:", loss_matches_reference)

# the dilution: a third, zero-advantage response kept in the batch adds 4 tokens to N_tok and nothing
# to the sum, so every other token's gradient shrinks by N_tok / (N_tok + 4)
logp3 = torch.cat([logp.detach(), -torch.rand(1, 6, generator=g)]).requires_grad_()
mask3 = torch.cat([target_mask, torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)])
loss3, _ = dipo_loss(logp3, logp3.detach(), torch.cat([advantages, torch.zeros(1)]), mask3)
loss3.backward()
dilution = float(logp3.grad[0, 1] / logp.grad[0, 1])
print(f"gradient on a token with a zero-advantage response kept: × {dilution:.3f} (= {n_tok}/{n_tok + 4})")

# %% [markdown]
# ## Clipping
#
# With more than one pass per batch (`rl.num_iterations > 1`) the ratio moves away from 1 and the clip
# matters. The curves are `dipo_loss` itself on one token (`ℓ^old = 0`, `ℓ = log ratio`), plotted as
# the surrogate `−L`, with its slope from autograd. For `A > 0` raising the ratio beyond `1 + ε_high`
# gains nothing (zero gradient); for `A < 0` lowering it below `1 − ε_low` gains nothing. The upper
# bound is the looser one (DAPO's "clip-higher", 0.28 vs 0.2): it leaves more room to raise
# the probability of unlikely tokens, which DAPO found keeps the policy's entropy from collapsing.

# %%
EPS_LOW, EPS_HIGH = 0.2, 0.28
ratios = torch.linspace(0.5, 1.6, 221)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
clip_zero_grad = True
for ax, A in zip(axes, (1.0, -1.0)):
    surr, slope = [], []
    for r in ratios:
        l = torch.log(r).clone().requires_grad_()
        loss_1, _ = dipo_loss(l.view(1, 1), torch.zeros(1, 1), torch.tensor([A]), torch.ones(1, 1, dtype=torch.bool),
                              eps_low=EPS_LOW, eps_high=EPS_HIGH)
        (g_l,) = torch.autograd.grad(-loss_1, l)
        surr.append(-float(loss_1.detach()))
        slope.append(float(g_l / r))  # d surr / d ratio = (d surr / d ℓ) / ratio
    surr, slope = torch.tensor(surr), torch.tensor(slope)
    ax.plot(ratios, surr, label="surrogate  min(r·A, clip(r)·A)")
    ax.plot(ratios, ratios * A, ":", color="0.5", label="unclipped  r·A")
    ax.plot(ratios, slope, "--", label="d surrogate / d ratio")
    for x, name in ((1 - EPS_LOW, "1 − ε_low"), (1 + EPS_HIGH, "1 + ε_high")):
        ax.axvline(x, color="crimson", lw=0.8)
        ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", color="crimson", fontsize=8)
    ax.set_title(f"A = {A:+.0f}")
    ax.set_xlabel("ratio")
    ax.set_ylabel("surrogate (−loss) and its slope")
    ax.legend(fontsize=8)
    flat = ratios > 1 + EPS_HIGH if A > 0 else ratios < 1 - EPS_LOW
    edge = ((ratios - (1 - EPS_LOW)).abs() < 1e-3) | ((ratios - (1 + EPS_HIGH)).abs() < 1e-3)  # ties: skip
    clip_zero_grad &= bool((slope[flat & ~edge] == 0).all() and (slope[~flat & ~edge].abs() > 0).all())
fig.tight_layout()
plt.show()
print("zero gradient exactly in the clipped region:", clip_zero_grad)

# %% [markdown]
# ## The consistency invariant, checked live
#
# `dipo.rescore(model, rollout)` rebuilds every round from `step_map`, runs the packed layout and
# returns each generated token's log-probability. With the decoder's weights it must equal the
# `logp` recorded during decoding (untempered, untruncated softmax — the policy being trained), up to
# floating-point noise. Any mismatch of mask, positions, block grid or padding breaks it.
#
# Note what "the policy" means here. The rollouts were *sampled* with top-k 10 (and, in general, a
# temperature), but the recorded and rescored `logp` is the untruncated softmax: the behaviour policy
# that produced the tokens differs from the policy whose log-probability is trained, as in DiRL (and in
# most LLM RL with top-k/top-p sampling). Nothing corrects for this; the invariant checked here is that
# the trainer scores exactly what the decoder recorded, not that sampling was untruncated.

# %%
from dirl_min.engine.score import rescore

with torch.no_grad():
    packed = rescore(model, roll)                 # one [x_t^1; …; x_t^R; x_0] row per response
    per_round = rescore(model, roll, packed=False)  # one [x_t^ρ ; x_0] row per round
max_abs_diff = max(float((packed[k] - torch.tensor(roll.logp[k])).abs().max()) for k in range(len(roll)))
packed_vs_rounds = max(float((packed[k] - per_round[k]).abs().max()) for k in range(len(roll)))
n_scored = sum(len(x) for x in packed)
print(f"{len(roll)} responses, {n_scored} tokens: max |rescore − recorded logp| = {max_abs_diff:.2e}; "
      f"packed vs per-round = {packed_vs_rounds:.2e}")

# %% [markdown]
# The same numbers from the reference pieces only: `reference.dipo.step_rounds` (loops over blocks),
# `reference.masking.block_diffusion_mask` (loops over query/key pairs) and a plain forward of the
# backbone, one `[x_t^ρ ; x_0]` sequence per round — no `dirl_min` layout code involved.

# %%
import reference.masking as ref_masking
from dirl_min.model.forward import backbone_hidden


def reference_rescore(k):
    p_k, r_k = roll.prompt_ids[k], roll.response_ids[k]
    steps_k = [0] * len(p_k) + roll.step_map[k]
    L = len(steps_k)
    x0_k = torch.tensor(p_k + r_k)
    nz, tg = ref.step_rounds(steps_k, B)
    mask = ref_masking.block_diffusion_mask(L, B)
    out = torch.zeros(L)
    for nz_r, tg_r in zip(nz, tg):
        xt = torch.where(torch.tensor(nz_r), M, x0_k)
        with torch.no_grad():
            h = backbone_hidden(model, torch.cat([xt, x0_k])[None], torch.arange(L).repeat(2)[None], mask[None, None])
            lp = torch.log_softmax(model.lm_head(h[0, :L]).float(), -1)
        for j in range(L):
            if tg_r[j]:
                out[j] = lp[j, x0_k[j]]
    return out[len(p_k):]


ref_diff = max(float((reference_rescore(k) - packed[k]).abs().max()) for k in range(len(roll)))
rounds_match = all(
    [r.tolist() for r in step_rounds(torch.tensor([0] * len(roll.prompt_ids[k]) + roll.step_map[k]), B)]
    == list(ref.step_rounds([0] * len(roll.prompt_ids[k]) + roll.step_map[k], B))
    for k in range(len(roll))
)
print(f"max |reference rescore − dipo.rescore| = {ref_diff:.2e}; step_rounds == reference: {rounds_match}")

# %% [markdown]
# The invariant has teeth: pretend every token of a response was committed in a single step (a wrong
# `step_map`) and the recomputed log-probabilities no longer match the recorded ones.

# %%
import copy

wrong = copy.deepcopy(roll)
wrong.step_map = [[1] * len(s) for s in wrong.step_map]
with torch.no_grad():
    wrong_scores = rescore(model, wrong)
wrong_diff = max(float((wrong_scores[k] - torch.tensor(roll.logp[k])).abs().max()) for k in range(len(roll)))
print(f"with a wrong step_map: max |rescore − recorded logp| = {wrong_diff:.2f}")

# %% tags=["checks"] jupyter={"source_hidden": true}
# Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
CHECKS = {
    "every_token_target_once": every_token_once,
    "step_rounds_by_hand_match": bool(by_hand_matches),
    "zero_advantage_dilution": dilution,
    "dilution_expected": n_tok / (n_tok + 4),
    "step_rounds_match_reference": bool(rounds_match),
    "advantages_match_reference": bool(adv_match),
    "filter_matches_reference": bool(keep_match),
    "kept_groups": keep.tolist(),
    "grad_is_minus_A_over_N": bool(grad_is_minus_A_over_N),
    "loss_matches_reference": bool(loss_matches_reference),
    "clip_zero_grad": bool(clip_zero_grad),
    "max_abs_diff": max_abs_diff,
    "packed_vs_per_round": packed_vs_rounds,
    "reference_rescore_diff": ref_diff,
    "wrong_step_map_diff": wrong_diff,
    "rounds": int(R),
    "seconds": time.perf_counter() - T_START,
}
assert CHECKS["every_token_target_once"] and CHECKS["step_rounds_match_reference"]
assert CHECKS["step_rounds_by_hand_match"]
assert abs(CHECKS["zero_advantage_dilution"] - CHECKS["dilution_expected"]) < 1e-6 < 1 - CHECKS["dilution_expected"]
assert CHECKS["advantages_match_reference"] and CHECKS["filter_matches_reference"]
assert CHECKS["kept_groups"] == [True, True, False, False]
assert CHECKS["grad_is_minus_A_over_N"] and CHECKS["loss_matches_reference"] and CHECKS["clip_zero_grad"]
assert CHECKS["max_abs_diff"] < 1e-4, "the consistency invariant is broken"
assert CHECKS["packed_vs_per_round"] < 1e-5 and CHECKS["reference_rescore_diff"] < 1e-4
assert CHECKS["wrong_step_map_diff"] > 1e-2 and CHECKS["rounds"] > 1
print(CHECKS)
