"""Collect the evidence runs into docs/evidence/results.json and a markdown table on stdout.

    PYTHONPATH=. python docs/evidence/collect.py runs/evidence > docs/evidence/results.md

Per run: each stage's avg@16 [95% CI], greedy, pass@16, tokens per step, the paired RL − SFT
difference, the stage seconds and the wall/CPU seconds of ``times.txt``. Across the seeds
``seed0..seed4``: the mean RL − SFT with an interval resampling seeds and problems
(:func:`dirl_min.evaluation.stats.seeds_problems_bootstrap_ci`). Against ``seed0``: how far each spread run
(the same run again, AVX2, 2 threads and 2 threads again) moved, and whether its final weights are bit-identical.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dirl_min.evaluation.stats import bootstrap_ci, seeds_problems_bootstrap_ci

SEEDS = [f"seed{s}" for s in range(5)]
SPREAD = ["seed0-again", "seed0-avx2", "seed0-threads2", "seed0-threads2-again"]


def _times(root: Path) -> dict:
    out = {}
    if (root / "times.txt").exists():
        for line in (root / "times.txt").read_text().splitlines():
            m = re.match(r"(\S+) wall ([\d.]+) user ([\d.]+) sys ([\d.]+)", line)
            if m:
                out[m[1]] = {"wall": float(m[2]), "cpu": float(m[3]) + float(m[4])}
    return out


def _weights(run: Path, stage: str) -> dict:
    files = sorted((run / "checkpoints" / f"{stage}-final").rglob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _max_diff(a: Path, b: Path, stage: str) -> float:
    wa, wb = _weights(a, stage), _weights(b, stage)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def run_row(run: Path, times: dict) -> dict:
    s = json.loads((run / "summary.json").read_text())
    row = {"run": run.name, "seed": s["seed"], **times.get(run.name, {}),
           "sft_seconds": s["sft_seconds"], "rl_seconds": s["rl_seconds"], "wall_seconds": s["wall_seconds"],
           "rl_minus_sft": s["rl_minus_sft"]["mean"], "rl_minus_sft_ci": s["rl_minus_sft"]["ci"]}
    for st in ("base", "sft", "rl"):
        e = s[st]
        row[st] = {"avg16": e["accuracy"], "ci": e["accuracy_ci"], "greedy": e["greedy_accuracy"],
                   "pass16": e["pass@16"], "tokens_per_step": e["tokens_per_step"]}
    return row


def main(root: Path) -> None:
    times = _times(root)
    rows = {r: run_row(root / r, times) for r in SEEDS + SPREAD if (root / r / "summary.json").exists()}
    diffs = [[b - a for a, b in zip(*(json.loads((root / r / "summary.json").read_text())[st]["per_problem"]
                                     for st in ("sft", "rl")))] for r in SEEDS if r in rows]
    out = {"runs": rows}
    if diffs:
        flat = [x for d in diffs for x in d]
        out["across_seeds"] = {"seeds": len(diffs), "rl_minus_sft": sum(flat) / len(flat),
                               "ci_seeds_and_problems": list(seeds_problems_bootstrap_ci(diffs)),
                               "ci_problems_only": list(bootstrap_ci(flat))}
    if "seed0" in rows:
        ref = rows["seed0"]
        out["spread"] = {r: {"sft_avg16": rows[r]["sft"]["avg16"] - ref["sft"]["avg16"],
                             "rl_avg16": rows[r]["rl"]["avg16"] - ref["rl"]["avg16"],
                             "rl_minus_sft": rows[r]["rl_minus_sft"] - ref["rl_minus_sft"],
                             "sft_weights_max_abs_diff": _max_diff(root / "seed0", root / r, "sft"),
                             "rl_weights_max_abs_diff": _max_diff(root / "seed0", root / r, "rl")}
                         for r in SPREAD if r in rows}
    Path("docs/evidence/results.json").write_text(json.dumps(out, indent=1))
    print(markdown(out))


def _p(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(c) -> str:
    return f"[{_p(c[0])}, {_p(c[1])}]"


def _d(x: float) -> str:
    return f"{100 * x:+.1f}"


def markdown(out: dict) -> str:
    lines = ["| run | SFT avg@16 [95% CI] | RL avg@16 [95% CI] | RL − SFT [95% CI] | greedy SFT → RL | "
             "pass@16 SFT → RL | tok/step SFT → RL | wall s (SFT / RL) | CPU s |", "|---" * 9 + "|"]
    for r in out["runs"].values():
        s, l = r["sft"], r["rl"]
        lo, hi = r["rl_minus_sft_ci"]
        lines.append(f"| {r['run']} | {_p(s['avg16'])} {_ci(s['ci'])} | {_p(l['avg16'])} {_ci(l['ci'])} | "
                     f"{_d(r['rl_minus_sft'])} [{_d(lo)}, {_d(hi)}] | {_p(s['greedy'])} → {_p(l['greedy'])} | "
                     f"{_p(s['pass16'])} → {_p(l['pass16'])} | {s['tokens_per_step']:.2f} → {l['tokens_per_step']:.2f} | "
                     f"{r.get('wall', r['wall_seconds']):.0f} ({r['sft_seconds']:.0f} / {r['rl_seconds']:.0f}) | "
                     f"{r.get('cpu', float('nan')):.0f} |")
    if "across_seeds" in out:
        a = out["across_seeds"]
        lo, hi = a["ci_seeds_and_problems"]
        plo, phi = a["ci_problems_only"]
        lines.append(f"\nAcross {a['seeds']} seeds: RL − SFT {_d(a['rl_minus_sft'])} [{_d(lo)}, {_d(hi)}] "
                     f"(seeds and problems resampled; problems only: [{_d(plo)}, {_d(phi)}])")
    for r, v in out.get("spread", {}).items():
        lines.append(f"\n{r} vs seed0: SFT avg@16 {_d(v['sft_avg16'])}, RL avg@16 {_d(v['rl_avg16'])}, "
                     f"RL − SFT {_d(v['rl_minus_sft'])}; max |Δ weight| SFT {v['sft_weights_max_abs_diff']:.2g}, "
                     f"RL {v['rl_weights_max_abs_diff']:.2g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
