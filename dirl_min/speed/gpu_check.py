"""The GPU check (``bash scripts/gpu_check.sh``): stages with their own time limits, results kept.

Each stage is one command run in its own process group, with its output in ``OUT/<stage>.log``.
When it ends (done, failed, or killed at its limit) ``OUT/<stage>.json`` is written at once:
status, seconds, limit, command and the stage's own JSON result where it wrote one, so a slot
that ends early keeps every stage already measured. A failed or hung stage is recorded and the
next stage runs. At the end ``OUT/summary.json`` holds every stage and a table is printed.

Sizing (the default shape on one H100 in at most 9 minutes): the stages' limits add up to at
most :data:`BUDGET_S`, and each stage's limit is also cut to what is left of that budget, so
the whole check ends within it whatever a stage does. Inside a stage the work is small next to
its limit: one optimizer step of SDAR-1.7B's shape on 8 x 1,024 tokens is about 0.2 PFLOP
(well under a second at 40% MFU); process start, the random model's build and flex_attention's
compilation dominate and are what the limits are for. None of these limits has been measured
on a GPU yet: the first run's per-stage seconds (in the table) are what to re-size them from.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dirl_min.infra.atomic import atomic_write

#: seconds the whole default check may take on one H100 (a 10-minute slot, one minute spare)
BUDGET_S = 540
#: the shape benchmark's module (moved with the benchmark package if renamed)
SHAPE_MODULE = "dirl_min.bench"  # `python -m dirl_min.bench --shape NAME ...`
#: pytest's "no tests collected/selected" exit code: no gpu-marked test is not a failure
PYTEST_NO_TESTS = 5


@dataclass
class Stage:
    """One command of the check.

    ``result``: a JSON file the command writes (read into the stage's record), or "stdout" for
    a JSON object printed at the end of its output. ``ok_codes``: exit codes that count as done.
    ``skip``: a reason not to run it (recorded as "skipped" with that reason).
    """

    name: str
    argv: list
    limit_s: float
    result: str = ""
    ok_codes: tuple = (0,)
    skip: str = ""
    info: dict = field(default_factory=dict)


def lmdeploy_missing() -> str:
    """Why LMDeploy's stages cannot run here ("" when they can)."""
    import importlib.util

    if importlib.util.find_spec("lmdeploy") is None:
        return ("lmdeploy is not installed: its stages are skipped (bring its wheels, see README "
                "'Running on an offline GPU node')")
    return ""


def plan(out: Path, dry_run: bool, shape: str = "sdar-1.7b") -> list[Stage]:
    """The check's stages in order. ``dry_run``: the toy shape on CPU in float32, every stage."""
    py = sys.executable
    if dry_run:
        shape, dev, dtype, attns = "toy", "cpu", "float32", ["flex_attention", "sdpa"]
        size = ["--responses", "2", "--response-tokens", "16", "--threads", "1"]
        # generous: on CPU a limit only has to catch a hang, on a machine that may be busy
        limits = dict(train=600, rollout=400, save=300, check=400, pytest=600, lmdeploy=120)
        new_tokens = "32"
    else:
        dev, dtype, attns = "cuda", "bfloat16", ["flex_attention", "sdpa"]
        size = ["--responses", "8", "--response-tokens", "1024"]
        # with both LMDeploy stages: 2 x 120 + 45 + 30 + 60 + 45 + 2 x 60 = 540 = BUDGET_S.
        # train: 4 child processes (SFT, DiPO x checkpointing on, off), each building the model
        # and, for flex_attention, compiling its kernels
        limits = dict(train=120, rollout=45, save=30, check=60, pytest=45, lmdeploy=60)
        new_tokens = "256"
    bench = [py, "-m", SHAPE_MODULE, "--shape", shape, "--device", dev, "--dtype", dtype, *size]
    model = str(out / f"random-{shape}")
    check = [py, "-m", "dirl_min.check", "--model", model, "--dtype", dtype, "--max-new-tokens", new_tokens]
    no_lmdeploy = "a dry run on CPU: LMDeploy needs a GPU" if dry_run else lmdeploy_missing()
    stages = [Stage(f"train_{a}", [*bench, "--attn", a, "--stages", "sft,dipo", "--checkpointing", "on,off",
                                   "--json", str(out / f"train_{a}.result.json")],
                    limits["train"], result=str(out / f"train_{a}.result.json"),
                    skip="a dry run on CPU: FlexAttention has no backward on CPU (torch)"
                    if dry_run and a == "flex_attention" else "")
              for a in attns]
    stages += [
        Stage("rollout_native", [*bench, "--stages", "rollout", "--checkpointing", "on",
                                 "--json", str(out / "rollout_native.result.json")],
              limits["rollout"], result=str(out / "rollout_native.result.json")),
        Stage("save", [*bench, "--save", model], limits["save"]),
        Stage("check", check, limits["check"], result="stdout"),
        Stage("pytest_gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], limits["pytest"],
              ok_codes=(0, PYTEST_NO_TESTS)),
        Stage("rollout_lmdeploy", [*bench, "--stages", "rollout", "--checkpointing", "on", "--lmdeploy", model,
                                   "--json", str(out / "rollout_lmdeploy.result.json")],
              limits["lmdeploy"], result=str(out / "rollout_lmdeploy.result.json"), skip=no_lmdeploy),
        Stage("check_lmdeploy", [*check, "--lmdeploy"], limits["lmdeploy"], result="stdout", skip=no_lmdeploy),
    ]
    return stages


def _trailing_json(text: str):
    """The JSON object a command printed last (its lines from the last one that opens with ``{``)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return None


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a stage's whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, out: Path, limit_s: float) -> dict:
    """Run one stage under ``limit_s`` seconds; its record, also written to ``OUT/<name>.json``."""
    log = out / f"{stage.name}.log"
    rec = {"stage": stage.name, "command": shlex.join(map(str, stage.argv)), "limit_s": round(limit_s, 1),
           "log": str(log), **stage.info}
    if stage.skip or limit_s <= 0:
        rec.update(status="skipped", reason=stage.skip or "no time left in the check's budget", seconds=0.0)
    else:
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write(f"== {stage.name}: {rec['command']}\n")
            f.flush()
            proc = subprocess.Popen(stage.argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit_s)
                rec["status"] = "ok" if code in stage.ok_codes else "failed"
                rec["returncode"] = code
            except subprocess.TimeoutExpired:
                _stop(proc)
                rec.update(status="timeout", returncode=proc.returncode,
                           reason=f"killed at its limit of {limit_s:.0f} s")
        rec["seconds"] = round(time.monotonic() - t0, 2)
        rec["result"] = _read_result(stage, log)
        failed_rows = [r for r in rec["result"] or [] if isinstance(r, dict) and "failed" in r]
        if rec["status"] == "ok" and failed_rows:  # the shape benchmark goes on past a failed configuration
            rec.update(status="failed", reason=f"{len(failed_rows)} configuration(s) failed (see the log)")
    atomic_write(out / f"{stage.name}.json", json.dumps(rec, indent=2) + "\n")
    return rec


def _read_result(stage: Stage, log: Path):
    if stage.result == "stdout":
        return _trailing_json(log.read_text(errors="replace"))
    if stage.result and Path(stage.result).is_file():
        try:
            return json.loads(Path(stage.result).read_text())
        except ValueError:
            return None
    return None


def run_all(stages: list[Stage], out: Path, budget_s: float) -> list[dict]:
    """Every stage in order, each under min(its limit, what is left of ``budget_s``)."""
    out.mkdir(parents=True, exist_ok=True)
    t0, records = time.monotonic(), []
    for stage in stages:
        left = budget_s - (time.monotonic() - t0)
        rec = run_stage(stage, out, min(stage.limit_s, left))
        records.append(rec)
        print(f"[{time.monotonic() - t0:6.0f} s] {stage.name}: {rec['status']} in {rec['seconds']:.1f} s"
              + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
    summary = {"budget_s": budget_s, "seconds": round(time.monotonic() - t0, 2), "stages": records}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return records


def _metrics(rec: dict) -> str:
    """The stage's headline numbers for the table."""
    res = rec.get("result")
    if isinstance(res, list):  # the shape benchmark's rows
        parts = []
        for r in res:
            if "seconds" not in r:
                parts.append(f"{r.get('stage')} FAILED")
                continue
            ck = "" if r["stage"] == "rollout" else f" ckpt {'on' if r['checkpointing'] else 'off'}"
            mem = f", {r['peak_cuda_gib']:.1f} GiB, MFU {r['mfu']:.1%}" if "peak_cuda_gib" in r else \
                f", RSS {r['peak_rss_gib']:.1f} GiB"
            parts.append(f"{r['stage']}{ck}: {r['seconds']:.2f} s, {r['trained_tokens'] / r['seconds']:.0f} tok/s{mem}")
        return "; ".join(parts)
    if isinstance(res, dict):
        keys = ("max_abs_diff", "mean_abs_diff", "tokens", "tokens_per_step")
        return ", ".join(f"{k} {res[k]:.3g}" for k in keys if isinstance(res.get(k), (int, float)))
    return rec.get("reason", "")


def table(records: list[dict]) -> str:
    """One line per stage: name, status, seconds of its limit, headline numbers."""
    rows = [f"{'stage':<20} {'status':<8} {'seconds':>15}  result"]
    for r in records:
        rows.append(f"{r['stage']:<20} {r['status']:<8} {r['seconds']:>7.1f} / {r['limit_s']:>5.0f}  {_metrics(r)}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="folder for logs and JSON")
    parser.add_argument("--shape", default=os.environ.get("SHAPE", "sdar-1.7b"), help="bench --shape's SHAPES key")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "0") == "1",
                        help="every stage on CPU with a toy shape (also DRY_RUN=1)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 0)) or None,
                        help=f"seconds for the whole check, each stage's limit cut to what is left (default "
                             f"{BUDGET_S}; a dry run: the sum of its limits)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: use DRY_RUN=1 for the CPU rehearsal")
    stages = plan(out, args.dry_run, args.shape)
    total = sum(s.limit_s for s in stages if not s.skip)
    if args.budget is None:
        args.budget = total if args.dry_run else BUDGET_S
    print(f"gpu check: {len(stages)} stages, limits sum to {total:.0f} s of a {args.budget:.0f} s budget "
          f"({'dry run: toy shape, CPU' if args.dry_run else args.shape + ', 8 x 1,024 tokens, bf16'}); "
          f"results in {out}/", flush=True)
    records = run_all(stages, out, args.budget)
    print(table(records))
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
