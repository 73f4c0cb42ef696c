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
# # 05 · Four ways to read a diffusion LM's likelihood
#
# A policy gradient needs `∇ log π(token | the state it was sampled in)`. An autoregressive model has
# one obvious state per token (its prefix); a diffusion LM does not: a token was committed at some
# denoising step, seeing its block partly masked, and the model can be asked for that token's
# probability in any other masking. Every RL method for diffusion LMs therefore starts by choosing
# **which masked copies of a response to feed the model** and which token to read in which copy.
# `rl.objective` selects one of four choices (`dirl_min/core/estimates.py`), all scored by the same
# code (`engine.score.rounds_logp`) and trained with the same clipped loss:
#
# | `rl.objective` | from | copies per response | context of a token |
# |---|---|---|---|
# | `dipo` | DiRL | `R` = most distinct steps in a block | exactly the decoding state |
# | `tracerl` | TraceRL §3, shrinkage `s` | `⌈R/s⌉` | the state up to `s − 1` steps earlier |
# | `diffu_grpo_masked_context` | d1 §3.2 as first ported (an ablation) | 1 | partly masked prompt, no response token |
# | `coupled_grpo` | DiffuCoder §4, coupled sampling | 2 | its block with a random share (`t` or `1 − t`) masked |
#
# This notebook draws the four sets of copies for one response, scores the same responses with each,
# and measures how far each token's log-probability lands from the exact one.

# %%
import time

import matplotlib.pyplot as plt
import torch

from dirl_min.tutorial import setup

# one torch thread, tqdm's ipywidgets warning off, and the repository on sys.path for `reference/`
ROOT, T_START = setup()

# %% [markdown]
# ## Responses with their step maps
#
# The same model and decoding as notebook 03: the tiny model after a 150-step SFT (the answer format
# learned, the arithmetic mostly not), sampled block by block with DiRL's confidence threshold 0.9, so
# some steps commit several tokens. Each response comes with its `step_map` (the step that committed
# each token) and the decoder's `logp` of each token, read in the very state it was committed from.
# All the numbers below are this small model's: they show how the four objectives differ in kind, not
# how large the differences are for a real model.

# %%
from dirl_min.engine.decode import generate
from dirl_min.model import chat_prompt_ids
from dirl_min.tutorial import DEMO_QUESTIONS, trained_tiny

model, tok = trained_tiny()  # as in notebooks 02 and 03
B, M = model.config.block_size, model.config.mask_token_id
STOP = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
PROMPTS = [chat_prompt_ids(tok, q) for q in DEMO_QUESTIONS]
roll = generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_k=10, threshold=0.9,
                stop_token_ids=STOP, seeds=list(range(100, 100 + len(PROMPTS))))
for i in range(len(roll)):
    print(f"response {i}: prompt {len(roll.prompt_ids[i])} tokens, step_map {roll.step_map[i]}")

# %% [markdown]
# ## The copies each objective feeds the model
#
# `engine.score.rollout_views(rollout, i, spec)` gives the views of response `i` exactly as
# `trainer.policy_step` builds them: a **context row** and `R` **noisy copies**, each with the positions
# it masks and the positions read in it. How the model sees them (SPEC §4.5): a block of a noisy copy
# attends to its own cells in that copy and, for everything before it, to the **context row** — never to
# another block of the copy. So read each copy block by block, with the context row as the past.
#
# * **dipo** — copy `ρ` shows each block just before its `ρ`-th decoding step and reads the tokens that
#   step committed: every token in the state it was decoded from. The context row is the clean response.
# * **tracerl** (`s = 2` here) — TraceRL's shrinkage merges `s` consecutive steps of a block into one
#   copy, read from the state before the first of them: half the copies, and the token of the second
#   step no longer sees what the first step committed.
# * **diffu_grpo_masked_context** — d1's one-step estimate as first ported, now an ablation: a single
#   copy with the whole response masked. The context
#   row masks the response as well (otherwise later blocks would see earlier response tokens through
#   it) and each prompt token with probability `p = 0.15`, drawn afresh for every optimisation pass.
# * **coupled_grpo** — DiffuCoder's coupled sampling: draw `t ~ U[0.2, 0.8]`, mask each response token
#   with probability `t` in the first copy and the rest in the second. The masks are complementary, so
#   every token is read once, with a random part of its block visible — which may include tokens that
#   were decoded *after* it.

# %%
from dirl_min.core.estimates import ObjectiveSpec, record
from dirl_min.engine.score import rollout_views
from dirl_min.tutorial import objective_views_figure

SPECS = {"dipo": ObjectiveSpec("dipo"), "tracerl": ObjectiveSpec("tracerl", shrinkage=2),
         "diffu_grpo_masked_context": ObjectiveSpec("diffu_grpo_masked_context", prompt_mask_prob=0.15),
         "coupled_grpo": ObjectiveSpec("coupled_grpo")}
# d1 on a block model (rl.objective diffu_grpo) reads tracerl's view with every step of a block merged:
# each block fully masked given the clean past (docs/method.md §4.7). Drawn here is the first port, which
# also masks the clean stream, kept as the ablation diffu_grpo_masked_context.
OBJECTIVES = tuple(SPECS)
VIEWS = {name: [rollout_views(roll, i, spec)[0] for i in range(len(roll))] for name, spec in SPECS.items()}


def first_shown(i, prompt_blocks=4):
    """The prompt is long: draw only its last ``prompt_blocks`` blocks, next to the response."""
    return max(0, (len(roll.prompt_ids[i]) // B - prompt_blocks) * B)


# the response drawn: the first whose d1 draw masks a prompt token in the part drawn
I = next(i for i in range(len(roll))
         if (VIEWS["diffu_grpo_masked_context"][i].context[first_shown(i):len(roll.prompt_ids[i])] == M).any())
objective_views_figure({n: VIEWS[n][I] for n in OBJECTIVES}, [0] * len(roll.prompt_ids[I]) + roll.step_map[I],
                       len(roll.prompt_ids[I]), first_shown(I), B, M)
plt.show()

# %% [markdown]
# What the pictures claim, checked on all eight responses: every generated token is read exactly once
# by every objective; `tracerl` with `s = 1` is `dipo`, and with `s = 2` it matches the loop-by-loop
# `reference/objectives.py` and never shows a token more than its decoding state did; the d1 context
# row hides the whole response; the coupled masks are complementary over the response.

# %%
import math

import reference.objectives as ref
from dirl_min.core.rounds import step_rounds

N = len(roll)
full_steps = [torch.tensor([0] * len(roll.prompt_ids[i]) + roll.step_map[i]) for i in range(N)]
generated = [s > 0 for s in full_steps]
read_once = {n: all(torch.equal(VIEWS[n][i].targets.sum(0), generated[i].long()) for i in range(N))
             for n in OBJECTIVES}
s1_views = [rollout_views(roll, i, ObjectiveSpec("tracerl", shrinkage=1))[0] for i in range(N)]
tracerl_s1_is_dipo = all(torch.equal(a.noisy, b.noisy) and torch.equal(a.targets, b.targets)
                         for a, b in zip(s1_views, VIEWS["dipo"]))
tracerl_matches_reference = all(
    [VIEWS["tracerl"][i].noisy.tolist(), VIEWS["tracerl"][i].targets.tolist()]
    == list(ref.merge_rounds(full_steps[i].tolist(), B, 2)) for i in range(N))


def hides_at_least_the_decoding_state(i):
    """tracerl masks, for each token it reads, everything dipo masks for it (no look-ahead)."""
    exact, merged = VIEWS["dipo"][i], VIEWS["tracerl"][i]
    return all(bool((merged.noisy[int(merged.targets[:, j].nonzero()[0])] >= exact.noisy[r]).all())
               for r in range(len(exact.noisy)) for j in exact.targets[r].nonzero().flatten().tolist())


tracerl_no_lookahead = all(hides_at_least_the_decoding_state(i) for i in range(N))
d1_hides_response = all(bool((VIEWS["diffu_grpo_masked_context"][i].context[generated[i]] == M).all()) for i in range(N))
d1_prompt_masked = sum(int((VIEWS["diffu_grpo_masked_context"][i].context[~generated[i]] == M).sum()) for i in range(N))
coupled_complementary = all(
    torch.equal(v.noisy[0] | v.noisy[1], generated[i]) and not bool((v.noisy[0] & v.noisy[1]).any())
    for i, v in enumerate(VIEWS["coupled_grpo"]))
rounds = [step_rounds(full_steps[i], B)[0].shape[0] for i in range(N)]
expected_copies = {"dipo": sum(rounds), "tracerl": sum(math.ceil(r / 2) for r in rounds),
                   "diffu_grpo_masked_context": N, "coupled_grpo": 2 * N}
print("every token read once:", read_once)
print(f"tracerl s=1 == dipo: {tracerl_s1_is_dipo}; tracerl s=2 == reference: {tracerl_matches_reference}; "
      f"never shows more than the decoding state: {tracerl_no_lookahead}")
print(f"d1: response hidden in the context row: {d1_hides_response}; prompt tokens masked: {d1_prompt_masked} "
      f"of {sum(len(p) for p in roll.prompt_ids)}")
print("coupled masks complementary:", coupled_complementary)

# %% [markdown]
# ## Scoring the same responses four ways
#
# Each objective's views of all eight responses go through `trainer.policy_step` (what the trainer
# runs: one call of the model for all of them) and through `engine.score.rounds_logp` directly, which
# also says which position each log-probability belongs to. The decoder recorded every token's log-probability in
# its decoding state; DiPO's copies rebuild exactly those states, so its numbers must equal the
# recorded ones (the consistency invariant of notebook 03). The others read other contexts, and the
# distance from the recorded `logp` is what their shortcut changes in what is differentiated.

# %%
from dirl_min.engine.score import rounds_logp
from dirl_min.loops.policy import MicroBatch, PolicySettings, StepTotals, policy_step

recorded = [torch.tensor(lp) for lp in roll.logp]
n_tokens = sum(len(r) for r in roll.response_ids)
SCORES, COPIES, SAME_AS_TRAINER = {}, {}, {}
with torch.no_grad():
    for name, spec in SPECS.items():
        views, labels = zip(*(rollout_views(roll, i, spec) for i in range(N)))
        context, noisy, targets = zip(*views)
        out = rounds_logp(model, context, noisy, targets, M, B, labels=labels)
        _, stats, trainer_logp = policy_step(model, MicroBatch(roll, list(range(N)), torch.zeros(N)),
                                             StepTotals(n_tokens, N), PolicySettings(eps_low=0.2, eps_high=0.28, spec=spec))
        SAME_AS_TRAINER[name] = torch.equal(trainer_logp, out.logp)
        COPIES[name] = int(stats["copies"])
        per_response = [torch.full((len(r),), float("nan")) for r in roll.response_ids]
        for lp, i, pos in zip(out.logp.tolist(), out.resp.tolist(), out.position.tolist()):
            per_response[i][pos - len(roll.prompt_ids[i])] = lp
        SCORES[name] = torch.cat(per_response)
exact = torch.cat(recorded)
DIFF = {n: (SCORES[n] - exact).abs() for n in OBJECTIVES}

print(f"{'objective':<14}{'loss mean':>10}{'copies':>8}{'per resp.':>10}{'tokens':>8}"
      f"{'mean |Δ|':>10}{'max |Δ|':>9}{'exact (<1e-4)':>15}")
for n in OBJECTIVES:
    d = DIFF[n]
    print(f"{n:<14}{record(n).loss_mean:>10}{COPIES[n]:>8}{COPIES[n] / N:>10.2f}{int((~SCORES[n].isnan()).sum()):>8}"
          f"{float(d.mean()):>10.3f}{float(d.max()):>9.3f}{float((d < 1e-4).float().mean()):>15.0%}")
print("policy_step's log-probs == rounds_logp's:", SAME_AS_TRAINER)

# %% [markdown]
# Many tokens of this model's answers are format tokens it is sure of in almost any context, so many
# `|Δ|` are tiny; a scatter of read against recorded log-probabilities would pile them up at 0. The
# cumulative distribution of `|Δ|` per objective (log scale; exact values, below `1e-6`, drawn at the
# left edge) shows the spread instead:

# %%
FLOOR = 1e-6
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for n in OBJECTIVES:
    d = DIFF[n].clamp(min=FLOOR).sort().values
    ax.step(d, torch.arange(1, len(d) + 1) / len(d), where="post", label=f"{n} ({COPIES[n]} copies)")
ax.axvline(1e-4, color="0.5", ls=":", lw=1)
ax.annotate("exact (< 1e-4)", (1e-4, 0.02), xytext=(-4, 0), textcoords="offset points", ha="right", fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("|read log-prob − recorded logp| per token")
ax.set_ylabel("fraction of tokens ≤ x")
ax.set_title("how far each objective reads from the decoding state")
ax.legend(fontsize=8, loc="lower right")
plt.show()

# %% [markdown]
# ## What each estimate conditions on, what it gets wrong, what it costs
#
# * **dipo** reads every token in the state it was sampled from, so `∇ℓ_j` is the gradient of the
#   log-probability of the token actually committed, in the state it was committed from: what the
#   decoder recorded, bit for bit (SPEC §4). It is still not the full likelihood of the trajectory:
#   *which* positions a step commits depends on the confidences, and that choice is not scored; and the
#   tokens were sampled with top-k while `ℓ` is the untruncated softmax (notebook 03). It pays with `R`
#   copies per response (at most the block size; the table above gives the count here), scored in one
#   call together with the clean row.
# * **tracerl** with shrinkage `s` (TraceRL, Wang et al. 2025, §3) trades exactness for `⌈R/s⌉`
#   copies. A token committed at the first step of a merged group is still read exactly (its curve
#   starts high at the left edge); one committed later loses sight of what the earlier steps of its
#   group committed, so its log-probability is taken in a context with less information than it had —
#   a biased estimate, never one that peeks ahead. `s = 1` is `dipo`, bit for bit.
# * **diffu_grpo_masked_context** (d1, Zhao et al. 2025, §3.2, as first ported: an ablation) reads every token in one copy, seeing only the prompt
#   (a random 15% of it masked) and mask tokens: a mean-field estimate that ignores the rest of the
#   response entirely, so it is far from the decoding state (the largest mean `|Δ|` above). It is the
#   cheapest (one copy), and because the prompt mask is redrawn every pass, several passes over one
#   batch (`rl.num_iterations > 1`) see perturbed views, which d1 uses as a regulariser.
# * **coupled_grpo** (DiffuCoder, Gong et al. 2025, §4) reads each token with a random share of its
#   block-mates visible: two copies, complementary so every token is read exactly once — which,
#   DiffuCoder argues, lowers the variance of the estimate compared with independent random masks. The
#   context ignores the decoding order — a token may see block-mates that were decoded after it and miss
#   ones decoded before — so it estimates a random-masking likelihood, not the sampled trajectory's.
#   DiffuCoder's released code also averages in a fully masked copy and weights by `1/t`; dirl_min
#   keeps the pair only.
#
# On a block model that view is out of distribution: SDAR is trained and decodes with a clean past, and
# here mask tokens sit in it. `diffu_grpo` is therefore d1 ported to blocks: each block fully masked
# given the clean prompt and clean earlier blocks (mean-field inside a block, exact across blocks).
#
# The loss mean is a setting (`rl.loss_mean`, token by default for every objective); the table's
# column is each release's own (`record(n).loss_mean`: TraceRL averages within each response first). Which estimate learns fastest per second or per copy is an empirical
# question: `python -m dirl_min.compare` trains each objective from one SFT checkpoint with the same
# budget and seeds and plots held-out accuracy against wall-clock time and scored copies.

# %% [markdown]
# How often does each view hide tokens the decoder saw, or show tokens it had not yet committed? For
# every read token, compare the block-mates visible in its copy with those visible when it was decoded:

# %%
def context_mismatch(name):
    """(fraction of read tokens that miss a token they saw when decoded, fraction that see one decoded later).

    What a token in copy ``r`` sees: its own block as the copy shows it, earlier blocks as the context
    row shows them. When it was decoded it saw every earlier block and its block's earlier steps."""
    missing = future = total = 0
    for i in range(N):
        v, steps = VIEWS[name][i], full_steps[i]
        for r in range(len(v.noisy)):
            row = v.context.masked_fill(v.noisy[r], M)
            for j in v.targets[r].nonzero().flatten().tolist():
                start, end = (j // B) * B, min((j // B + 1) * B, len(steps))
                shown = torch.cat([v.context[:start] != M, row[start:end] != M])
                seen = torch.cat([torch.ones(start, dtype=torch.bool), steps[start:end] < steps[j]])
                missing += bool((seen & ~shown).any())
                future += bool((shown & (steps[:end] > steps[j])).any())
                total += 1
    return missing / total, future / total


MISMATCH = {n: context_mismatch(n) for n in OBJECTIVES}
for n, (missing, future) in MISMATCH.items():
    print(f"{n:<14} tokens missing part of their decoding context: {missing:5.0%}   "
          f"seeing a later token: {future:5.0%}")

# %% [markdown]
# ## How far each estimate is from the exact likelihood, and where its gradient points
#
# Because `dipo`'s log-probabilities are exact, every other estimate's bias can be measured on the same
# responses. `dirl_min.comparison.diagnose.diagnose` scores the batch with each objective (and the named
# ablations: TraceRL's shrinkage `s = 2`, the old d1 port with and without prompt masking) and reports
# the mean `|log-prob − exact|` overall and by position in the block, the cosine between the objective's
# policy gradient and the exact one, and for random views the spread of that cosine over independent
# draws. Both gradients use the same advantages and the same token-mean weighting, so only the
# likelihood estimate differs. Any advantages serve for that; here they alternate `+1, −1` over the
# eight responses. `python -m dirl_min.compare --diagnose --model CKPT` runs the same function on a
# checkpoint's own RL batch, with group advantages; the README has its table for the main job's SFT model.

# %%
from dirl_min.comparison.diagnose import diagnose, text_table

ADV = torch.tensor([1.0, -1.0] * (len(roll) // 2))
DIAG, DIAG_INFO = diagnose(model, roll, ADV, draws=4)
print(text_table(DIAG))
print(f"{DIAG_INFO['tokens']} response tokens; the exact reference agrees with the decoder's recorded "
      f"log-probs to {DIAG_INFO['decoder_gap']:.1e}")

# %% [markdown]
# `dipo` and `tracerl` at `s = 1` sit on the exact values (gap at rounding, cosine 1). Every other
# estimate pays for its fewer or cheaper copies with a bias, and the old d1 port, which puts mask tokens
# into the clean past that a block model never sees, is by far the largest: its gradient barely points
# the way the exact one does. On this small model the numbers show the kinds of error, not their sizes for
# a real model.

# %% tags=["checks"] jupyter={"source_hidden": true}
# Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
CHECKS = {
    "read_once": all(read_once.values()),
    "tracerl_s1_is_dipo": bool(tracerl_s1_is_dipo),
    "tracerl_matches_reference": bool(tracerl_matches_reference),
    "tracerl_no_lookahead": bool(tracerl_no_lookahead),
    "d1_hides_response": bool(d1_hides_response),
    "d1_prompt_masked": d1_prompt_masked,
    "coupled_complementary": bool(coupled_complementary),
    "copies": COPIES,
    "expected_copies": expected_copies,
    "same_as_trainer": all(SAME_AS_TRAINER.values()),
    "scored_every_token": all(int((~SCORES[n].isnan()).sum()) == n_tokens for n in OBJECTIVES),
    "max_diff": {n: float(DIFF[n].max()) for n in OBJECTIVES},
    "mean_diff": {n: float(DIFF[n].mean()) for n in OBJECTIVES},
    "tracerl_s2_exact_fraction": float((DIFF["tracerl"] < 1e-4).float().mean()),
    "mismatch": MISMATCH,
    "diagnosis": {n: {"logp_gap": r["logp_gap"], "grad_cosine": r["grad_cosine"]} for n, r in DIAG.items()},
    "seconds": time.perf_counter() - T_START,
}
assert CHECKS["read_once"] and CHECKS["scored_every_token"] and CHECKS["same_as_trainer"]
assert CHECKS["tracerl_s1_is_dipo"] and CHECKS["tracerl_matches_reference"] and CHECKS["tracerl_no_lookahead"]
assert CHECKS["d1_hides_response"] and CHECKS["d1_prompt_masked"] > 0 and CHECKS["coupled_complementary"]
assert CHECKS["copies"] == CHECKS["expected_copies"]
assert CHECKS["max_diff"]["dipo"] < 1e-4, "the consistency invariant is broken"
assert all(CHECKS["max_diff"][n] > 1e-2 for n in ("tracerl", "diffu_grpo_masked_context", "coupled_grpo"))
assert 0 < CHECKS["tracerl_s2_exact_fraction"] < 1
assert max(CHECKS["mean_diff"], key=CHECKS["mean_diff"].get) == "diffu_grpo_masked_context"
assert CHECKS["mismatch"]["dipo"] == (0.0, 0.0) and CHECKS["mismatch"]["tracerl"][1] == 0.0
assert CHECKS["diagnosis"]["dipo"]["logp_gap"] <= 1e-5 and CHECKS["diagnosis"]["dipo"]["grad_cosine"] >= 0.9999
assert CHECKS["diagnosis"]["tracerl"] == CHECKS["diagnosis"]["dipo"], "tracerl at s = 1 is dipo"
assert max(CHECKS["diagnosis"], key=lambda n: CHECKS["diagnosis"][n]["logp_gap"]).startswith("diffu_grpo_masked_context")
assert CHECKS["mismatch"]["coupled_grpo"][1] > 0 and CHECKS["mismatch"]["diffu_grpo_masked_context"][0] > 0
print(CHECKS)
