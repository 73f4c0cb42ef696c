"""The project's mutation check: plausible bugs that the test suite must catch.

Each mutant replaces one snippet of one file (``old`` → ``new``) in a temporary copy of
the working tree and runs only the tests that should notice (``tests``, files or node
ids), with ``-x``. A mutant is *caught* when those tests fail. A snippet that is not found
exactly once, or a test node id whose function the file no longer defines, makes the whole
check stop before running anything: a stale mutant (after a refactor or a renamed test) is
visible, never silently skipped — re-point it and run again.

Usage (from the repository root; about 10–20 minutes on 2 cores)::

    python scripts/mutants.py              # every mutant, then a caught/missed table
    python scripts/mutants.py --list       # the mutants and their tests
    python scripts/mutants.py -k stop      # the mutants whose name contains "stop"
    python scripts/mutants.py --baseline   # first check that the selected tests pass unmutated

Exit status: 0 if every selected mutant was caught, 1 if one was missed or errored, 2 if a
snippet is stale. Not part of every CI run: it is a check of the tests, run after changing them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    name: str
    path: str  #: the file, relative to the repository root
    old: str  #: a snippet found exactly once in it
    new: str  #: what replaces it (the plausible bug)
    tests: tuple[str, ...]  #: pytest selections (files or node ids) that must fail


#: the decoder's tests without the flex_attention one (45 s of compiling on CPU, and it tests the attention)
#: (in this order: pytest runs them as given, and -x stops at the first failure)
ENGINE = tuple(f"tests/test_engine.py::test_{t}" for t in (
    "stops_and_retired_rows_equal_the_reference", "stop_keeps_the_block_whole_and_text_is_cut",
    "cached_batched_decoding_equals_uncached_reference", "a_sequence_decodes_the_same_alone_or_in_a_batch",
    "fused_commit_saves_exactly_one_forward_per_block", "consistency_invariant_rescore_equals_recorded_logp"))
OBJ = "tests/test_objectives.py"
#: the RL step's normalisers and means first, then the rest of the file
NORM = (f"{OBJ}::test_the_rl_step_normalises_by_the_kept_responses_tokens_and_count",
        f"{OBJ}::test_each_objective_takes_the_asked_mean_in_the_rl_step", OBJ)
CORE = "tests/test_dipo_core.py"

MUTANTS = [
    # ------------------------------------------------------------ decoder: stop and retire paths
    Mutant("stop counts prompt tokens", "dirl_min/engine/decode.py",
           "torch.isin(g.ids[rows, lo:hi], stop) & new_tok)", "torch.isin(g.ids[rows, lo:hi], stop))", ENGINE),
    Mutant("stop in the last block reported truncated", "dirl_min/engine/decode.py",
           "truncated[r] = not h", "truncated[r] = blk == max_blocks - 1", ENGINE),
    Mutant("stop drops its block", "dirl_min/engine/decode.py", "stopped_at[r] = hi", "stopped_at[r] = lo", ENGINE),
    Mutant("finished rows never retire", "dirl_min/engine/decode.py", "        if done.any():\n",
           "        if False:\n", ENGINE),
    Mutant("retired rows: cache rows by original index", "dirl_min/engine/decode.py",
           "cache.select_rows(keep.nonzero()[:, 0])", "cache.select_rows(rows)", ENGINE),
    Mutant("retired rows keep their cache rows", "dirl_min/engine/decode.py",
           "            cache.select_rows(keep.nonzero()[:, 0])\n", "", ENGINE),
    Mutant("a clean row still counts a step", "dirl_min/engine/decode.py",
           "step_count[rows] += todo.long()", "step_count[rows] += 1", ENGINE),
    Mutant("prompt tokens of the partial block re-decoded", "dirl_min/engine/decode.py",
           "masked = ~given[rows, lo:hi] & (step_at[rows, lo:hi] == 0)", "masked = step_at[rows, lo:hi] == 0",
           ENGINE),
    # ------------------------------------------------------------ unmasking rule
    Mutant("threshold strict", "dirl_min/core/unmask.py", "(conf >= threshold))", "(conf > threshold))",
           ("tests/test_select_unmask.py",)),
    Mutant("threshold compared in float32", "dirl_min/core/unmask.py",
           "conf = confidence.double().masked_fill", "conf = confidence.masked_fill", ("tests/test_select_unmask.py",)),
    Mutant("dynamic: no forced commit", "dirl_min/core/unmask.py", "((rank == 0) | (conf >= threshold))",
           "(conf >= threshold)", ("tests/test_select_unmask.py",)),
    Mutant("static: k + 1 per step", "dirl_min/core/unmask.py", "return is_masked & (rank < k)",
           "return is_masked & (rank <= k)", ("tests/test_select_unmask.py",)),
    Mutant("sequential: skips unmasked ranks wrongly", "dirl_min/core/unmask.py", "return is_masked & (order <= k)",
           "return is_masked & (torch.arange(b) < k)", ("tests/test_select_unmask.py",)),
    Mutant("top-p keeps one token too few", "dirl_min/core/unmask.py", "(torch.cumsum(probs, dim=-1) - probs) >= top_p",
           "torch.cumsum(probs, dim=-1) >= top_p", ("tests/test_select_unmask.py",)),
    # ------------------------------------------------------------ masks
    Mutant("noisy sees its own block clean", "dirl_min/core/masks.py", "k_clean & (k_blk < q_blk)",
           "k_clean & (k_blk <= q_blk)", ("tests/test_masking.py",)),
    Mutant("clean blocks not causal within a block", "dirl_min/core/masks.py", "k_clean & (k_blk <= q_blk)",
           "k_clean & (k_blk < q_blk)", ("tests/test_masking.py",)),
    Mutant("examples of a packed row see each other", "dirl_min/core/masks.py",
           "return (q_seg == k_seg) & (q_seg >= 0) &", "return (q_seg >= 0) & (k_seg >= 0) &", ("tests/test_masking.py",)),
    Mutant("SFT noise on the prompt too", "dirl_min/core/masks.py", "is_masked = (u < p[:, None]) & loss_mask",
           "is_masked = u < p[:, None]", ("tests/test_masking.py",)),
    # ------------------------------------------------------------ step rounds
    Mutant("rounds: targets mask only themselves", "dirl_min/core/rounds.py",
           "noisy = generated[None] & (rank[None] >= rounds)", "noisy = generated[None] & (rank[None] == rounds)",
           (CORE,)),
    Mutant("rounds: ranks count repeated steps", "dirl_min/core/rounds.py",
           "rank = (distinct[:, None, :] & (s[:, None, :] < s[:, :, None])).sum(dim=2)",
           "rank = ((s[:, None, :] > 0) & (s[:, None, :] < s[:, :, None])).sum(dim=2)", (CORE,)),
    # ------------------------------------------------------------ RL loss, normaliser, filters
    Mutant("token mean over the kept responses' count", "dirl_min/loops/rl.py",
           "totals = StepTotals(tokens=float(sum(c[0] for c in counts))",
           "totals = StepTotals(tokens=float(sum(c[2] for c in counts))", NORM),
    Mutant("token mean over every sampled response", "dirl_min/loops/rl.py",
           "counts = all_ranks(accel, (sum(len(roll.response_ids[i]) for roll, idx, _ in micro for i in idx)",
           "counts = all_ranks(accel, (sum(len(r) for roll, _, _ in rolls for r in roll.response_ids)", NORM),
    # the loss mean is the setting rl.loss_mean (default token, DiRL's), not a property of the objective
    Mutant("default loss mean is the sequence mean", "dirl_min/settings/config.py",
           'loss_mean: str = _f("token",', 'loss_mean: str = _f("sequence",',
           ("tests/test_recipes.py::test_the_default_loss_mean_is_the_default_objectives_release_mean",)),
    Mutant("the RL step's mean follows the objective, not rl.loss_mean", "dirl_min/loops/policy.py",
           '    if settings.loss_mean == "token":', '    if settings.spec.name != "tracerl":',
           (f"{OBJ}::test_each_objective_takes_the_asked_mean_in_the_rl_step",)),
    Mutant("the RL loop passes the objective's release mean, not rl.loss_mean", "dirl_min/loops/policy.py",
           "loss_mean=rl.loss_mean, kl_to_old=",
           "loss_mean=__import__('dirl_min.core.estimates', fromlist=['x']).record(rl.objective).loss_mean, kl_to_old=",
           ("tests/test_recipes.py::test_recipe_settings_reach_the_rl_loop",)),
    Mutant("clip range uses eps_low twice", "dirl_min/core/objectives.py",
           "ratio.clamp(1.0 - eps_low, 1.0 + eps_high)", "ratio.clamp(1.0 - eps_low, 1.0 + eps_low)", (CORE,)),
    Mutant("advantages: sample std", "dirl_min/core/objectives.py", "std = r.std(dim=1, keepdim=True, unbiased=False)",
           "std = r.std(dim=1, keepdim=True, unbiased=True)", (CORE,)),
    Mutant("reward_std filter inverted", "dirl_min/core/objectives.py",
           "return ~(r == r[:, :1]).all(dim=1)  #", "return (r == r[:, :1]).all(dim=1)  #", (CORE,)),
    Mutant("accuracy filter keeps all-correct groups", "dirl_min/core/objectives.py", "return (acc > 0) & (acc < 1)",
           "return acc > 0", (CORE,)),
    Mutant("dynamic sampling keeps more than P groups", "dirl_min/loops/rl.py", "if mixed[g % world][g // world]][: P - n_kept]",
           "if mixed[g % world][g // world]]", (f"{OBJ}::test_dynamic_sampling_keeps_exactly_the_first_p_groups_that_pass_the_filter",
            "tests/test_train.py::test_rl_group_filter_setting_picks_the_groups_trained_on")),
    # ------------------------------------------------------------ each objective's views
    Mutant("tracerl reads after the last merged step", "dirl_min/core/estimates.py",
           "return noisy[::shrinkage].clone()", "return noisy[shrinkage - 1::shrinkage].clone()", (OBJ,)),
    # d1 on a block model (diffu_grpo): each block fully masked given the clean prompt and clean earlier blocks
    Mutant("d1 block view masks the response in the clean stream", "dirl_min/core/estimates.py",
           "return block_one_step_views(ids, step_map > 0)",
           "return block_one_step_views(ids.masked_fill(step_map > 0, mask_token_id), step_map > 0)",
           (f"{OBJ}::test_d1_block_view_is_the_merged_trace_with_every_step_of_a_block_in_one_round",
            f"{OBJ}::test_d1_block_tokens_see_clean_earlier_blocks_and_nothing_of_their_own_block", OBJ)),
    Mutant("d1 block view reads step by step, not the whole block masked", "dirl_min/core/estimates.py",
           'Objective("diffu_grpo", _one_step,', 'Objective("diffu_grpo", _exact,',
           (f"{OBJ}::test_d1_block_view_is_the_merged_trace_with_every_step_of_a_block_in_one_round",
            f"{OBJ}::test_d1_block_tokens_see_clean_earlier_blocks_and_nothing_of_their_own_block", OBJ)),
    # the old d1 port, now the ablation diffu_grpo_masked_context: response and drawn prompt masked in the context row
    Mutant("masked-context ablation: context keeps the response", "dirl_min/core/estimates.py",
           "ids.masked_fill(response | drawn, mask_token_id)", "ids.masked_fill(drawn, mask_token_id)",
           (f"{OBJ}::test_the_masked_context_ablation_sees_no_response_token",
            f"{OBJ}::test_d1_view_masks_exactly_the_response_and_the_drawn_prompt_positions", OBJ)),
    Mutant("masked-context ablation: prompt mask not drawn", "dirl_min/core/estimates.py",
           "ids.masked_fill(response | drawn, mask_token_id)", "ids.masked_fill(response, mask_token_id)",
           (f"{OBJ}::test_d1_view_masks_exactly_the_response_and_the_drawn_prompt_positions",
            f"{OBJ}::test_d1_prompt_mask_rate_and_a_fresh_draw_every_pass", OBJ)),
    Mutant("coupled pair overlaps the prompt", "dirl_min/core/estimates.py",
           "pair = torch.stack([first, response & ~first])", "pair = torch.stack([first, ~first])", (OBJ,)),
    Mutant("coupled ratio outside DiffuCoder's range", "dirl_min/core/estimates.py",
           "t = lo + (hi - lo) * float(", "t = (hi - lo) * float(", (OBJ,)),
    Mutant("random views not redrawn per pass", "dirl_min/core/estimates.py", "7_919 * (iteration + 1)", "7_919", (OBJ,)),
]


def check_snippets(mutants: list[Mutant], root: Path) -> list[str]:
    """The problems with ``mutants`` in ``root``: a missing file or test, or an ``old`` not found exactly once."""
    problems = []
    for m in mutants:
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        n = path.read_text(encoding="utf-8").count(m.old)
        if n != 1:
            problems.append(f"{m.name}: {m.path} holds {n} copies of {m.old!r} (need exactly 1)")
        for t in m.tests:
            test_file, *names = t.split("::")
            if not (root / test_file).is_file():
                problems.append(f"{m.name}: test file {test_file} does not exist")
                continue
            func = names[-1].split("[")[0] if names else ""  # a renamed test would select nothing
            if func and not re.search(rf"^\s*def {re.escape(func)}\(", (root / test_file).read_text(encoding="utf-8"),
                                      flags=re.M):
                problems.append(f"{m.name}: {test_file} defines no {func}")
    return problems


def copy_tree(src: Path, dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored files) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (src / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dest / f)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    """``(returncode, first failing test or '', seconds)`` of pytest on ``tests`` in ``tree`` (-1: timed out)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", time.perf_counter() - t
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", p.stdout, flags=re.M)
    return p.returncode, failed[0] if failed else "", time.perf_counter() - t


def verdict(rc: int) -> str:
    """pytest's exit status as the mutant's fate: 1 tests failed, 2 collection/import failed."""
    return {0: "MISSED", 1: "caught", 2: "caught"}.get(rc, "ERROR")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this (case-insensitive)")
    ap.add_argument("--slice", default=":", help="START:END, the mutants by position in the list (to split a run)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--baseline", action="store_true", help="first run the selected tests on the unmutated copy")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    args = ap.parse_args(argv)
    lo, hi = (int(x) if x else None for x in args.slice.split(":"))
    chosen = [m for m in MUTANTS[lo:hi] if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.path}: {m.old!r} -> {m.new!r}\n    tests: {' '.join(m.tests)}")
        return 0
    problems = check_snippets(chosen, ROOT)
    if problems:
        print("stale mutants (re-point them):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed check still removes its copy
    rows = []
    with tempfile.TemporaryDirectory(prefix="dirl_min-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(ROOT, tree)
        if args.baseline:
            union = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            rc, failed, secs = run_tests(tree, union, args.timeout * 2)
            print(f"baseline: pytest exit {rc} in {secs:.0f} s {failed}", flush=True)
            if rc != 0:
                print("the unmutated tests do not pass: fix them first", file=sys.stderr)
                return 1
        for m in chosen:
            path = tree / m.path
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.old, m.new), encoding="utf-8")
            try:
                rc, failed, secs = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            rows.append((m, verdict(rc), failed, secs))
            print(f"{verdict(rc):7s} {secs:6.0f} s  {m.name}  {failed}", flush=True)
    caught = sum(v == "caught" for _, v, _, _ in rows)
    print(f"\n| mutant | file | result | first failing test |\n|---|---|---|---|")
    for m, v, failed, _ in rows:
        print(f"| {m.name} | {m.path} | {v} | {failed.split('::')[-1] if failed else ''} |")
    print(f"\n{caught} of {len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
