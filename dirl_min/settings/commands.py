"""The settings of ``python -m dirl_min.eval``, ``check``, ``bench`` and ``bench --shape``.

Each command's settings are a dataclass of sections, parsed by :func:`dirl_min.settings.config.parse_config`
as the main job's are: ``--help`` from the fields, ``--config FILE.yaml``, ``--section.name VALUE``,
and each command's established flags (``--top-k``, ``--max-new-tokens``) as aliases of the dotted
names. Sections shared with the main job (:class:`~dirl_min.settings.config.Sampling`,
:class:`~dirl_min.settings.config.Unmasking`) keep one meaning, one default and one rule; the rule sits
on the field and :mod:`dirl_min.settings.checks` builds ``EVAL_RULES``, ``CHECK_RULES``, ``BENCH_RULES``
and ``SHAPE_RULES`` from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pathlib import Path

from dirl_min.settings.config import DTYPES, DataConfig, EvalConfig, Sampling, Unmasking, _f
from dirl_min.settings.rules import Check, at_least, is_int, is_number, levels, names_from, number, one_of, template
from dirl_min.evaluation.benchmarks import BENCHMARKS, DIRL_PROMPT

_DATA, _EVAL = DataConfig(), EvalConfig()  # the main job's defaults, where dirl_min.eval shares them


def _sizes():
    from dirl_min.speed.measures import SIZES

    return tuple(SIZES)


def _shapes():
    from dirl_min.speed.shapes import SHAPES

    return tuple(SHAPES)


# ---- python -m dirl_min.eval ----

@dataclass
class Checkpoint:
    path: str = _f("", "checkpoint folder (SDAR / DiRL / TraDo / Qwen3), or a dirl_min.train checkpoint (its model/ "
                       "subfolder is used); '' or 'tiny' = a random tiny model, for smoke tests")
    dtype: str = _f("auto", "parameter dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16",
                    rule=one_of(*DTYPES))


@dataclass
class EvalModel(Checkpoint):
    backend: str = _f("native", "native = dirl_min's batched KV-cached decoder; lmdeploy needs the lmdeploy package "
                                "and CUDA", rule=one_of("native", "lmdeploy"))


@dataclass
class BenchmarkData:
    benchmarks: str = _f("", "comma-separated benchmark names, fetched with --hub or looked up in --data-dir "
                             f"({', '.join(BENCHMARKS)}), and/or files (JSON/JSONL/parquet records with question and "
                             "ground_truth_answer) or folders of such files; '' = all the names, unless --task is given")
    data_dir: str = _f("", "folder holding the benchmark files, one per name: math500.jsonl (or DiRL's MATH500.json), "
                           "gsm8k.jsonl, ... ('' = none; see --hub)")
    hub: bool = _f(False, "get the benchmarks from DiRL's Hugging Face datasets Auraithm/{MATH500,GSM8K,AIME2024,"
                          "AIME2025,OlympiadBench} with `datasets`, converted to JSONL and cached in $DIRL_MIN_DATA "
                          "(default ~/.cache/dirl_min/benchmarks); cached copies are read offline")
    task: str = _f("", "embedded = also evaluate the embedded arithmetic task's held-out split (the one "
                       "dirl_min.train evaluates and never trains on); alone unless --benchmarks is given",
                   rule=one_of("", "embedded"))
    task_levels: list = _f(_DATA.task_levels, "embedded task: levels, as dirl_min.train's data.task_levels",
                           rule=levels())
    task_max_operand: int = _f(_DATA.task_max_operand, "embedded task: operands 0..N", rule=at_least(0))
    held_out: int = _f(_DATA.held_out, "embedded task: size of the held-out split", rule=at_least(1))
    split_seed: int = _f(_DATA.split_seed, "embedded task: seed of the train/held-out split")
    limit: int = _f(0, "evaluate only the first N problems of each benchmark (0 = all)", rule=at_least(0, "0 = all"))
    prompt_template: str = _f("", "user message; {question} is replaced by the question and the result is rendered "
                                  "with the model's chat template ('' = for benchmark files DiRL's "
                                  f"{DIRL_PROMPT!r}; for --task embedded {_DATA.prompt_template!r}, dirl_min.train's)",
                              rule=template(optional=True))


@dataclass
class BenchmarkSampling(Sampling):
    max_new_tokens: int = _f(8192, "response length limit, counted in whole blocks (DiRL's; the main job's "
                                   f"evaluation uses {_EVAL.max_new_tokens} for the embedded task, pass "
                                   f"--max-new-tokens {_EVAL.max_new_tokens} with --task embedded to compare)",
                             rule=at_least(1))
    batch_size: int = _f(64, "sequences decoded together per process; results do not depend on it", rule=at_least(1))
    seed: int = _f(0, "sampling seed; each sample's seed is a function of (seed, benchmark, problem, sample)",
                   rule=at_least(0))


@dataclass
class Sweep(Unmasking):
    thresholds: list = _f([], "sweep several dynamic thresholds, e.g. 0.7,0.8,0.9,0.95 (replaces --threshold; writes "
                              "a plot of accuracy against tokens per step; [] = off)",
                          rule=Check(lambda v: isinstance(v, list) and all(is_number(t) and 0 <= t <= 1 for t in v) and len(set(v)) == len(v), "distinct numbers in [0, 1]"))

    @property
    def evaluated(self) -> list[float]:
        """The thresholds evaluated, in order: the sweep's, else ``[threshold]``."""
        return [float(t) for t in (self.thresholds or [self.threshold])]


@dataclass
class Verify:
    timeout: float = _f(5.0, "hard time bound per math-verify check, seconds", rule=number(0, lo_open=True))
    workers: int = _f(0, "math-verify checks run in parallel, each in its own process; 0 = one at a time",
                      rule=at_least(0))


@dataclass
class EvalOutput:
    out: str = _f("runs/eval", "output folder; rerunning with the same folder resumes",
                  rule=Check(lambda v: isinstance(v, str) and bool(v.strip()), "a folder name"))
    overwrite: bool = _f(False, "discard earlier samples and results in --out instead of resuming")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class EvalCommand:
    model: EvalModel = field(default_factory=EvalModel)
    data: BenchmarkData = field(default_factory=BenchmarkData)
    eval: BenchmarkSampling = field(default_factory=BenchmarkSampling)
    decode: Sweep = field(default_factory=Sweep)
    verify: Verify = field(default_factory=Verify)
    run: EvalOutput = field(default_factory=EvalOutput)


EVAL_ALIASES = {
    "--model": "model.path", "--dtype": "model.dtype", "--backend": "model.backend",
    "--benchmarks": "data.benchmarks", "--data-dir": "data.data_dir", "--hub": "data.hub", "--task": "data.task",
    "--task-levels": "data.task_levels", "--task-max-operand": "data.task_max_operand",
    "--held-out": "data.held_out", "--split-seed": "data.split_seed", "--limit": "data.limit",
    "--prompt-template": "data.prompt_template",
    "--samples": "eval.samples", "--temperature": "eval.temperature", "--top-k": "eval.top_k", "--top-p": "eval.top_p",
    "--max-new-tokens": "eval.max_new_tokens", "--batch-size": "eval.batch_size", "--seed": "eval.seed",
    "--strategy": "decode.strategy", "--threshold": "decode.threshold", "--thresholds": "decode.thresholds",
    "--steps": "decode.steps",
    "--verify-timeout": "verify.timeout", "--verify-workers": "verify.workers",
    "--out": "run.out", "--overwrite": "run.overwrite", "--no-progress": ("run.progress", "false"),
}


# ---- python -m dirl_min.check ----

@dataclass
class CheckRollout:
    prompts: str = _f("", "a UTF-8 text file with one prompt per line ('' = four built-in)")
    max_new_tokens: int = _f(64, "tokens decoded per prompt (whole blocks)", rule=at_least(1))
    temperature: float = _f(1.0, "sampling temperature of the decoded responses (0 = greedy)",
                            rule=number(0, why="0 = greedy"))
    threshold: float = _f(0.9, "confidence threshold of the dynamic unmasking strategy, in [0, 1]", rule=number(0, 1))
    seed: int = _f(0, "sampling seed", rule=at_least(0))


@dataclass
class CheckModel(Checkpoint):
    path: str = _f("", Checkpoint.__dataclass_fields__["path"].metadata["help"],
                   rule=Check(lambda v: not v or Path(v).is_dir(), "a checkpoint folder (empty = the tiny model)"))


@dataclass
class Consistency:
    tolerance: float = _f(0.0, "fail (exit 1) above this max |difference|; 0 = 1e-4 in float32, 0.1 in bf16",
                          rule=number(0, why="0 = the dtype's default"))
    lmdeploy: bool = _f(False, "also decode greedily with LMDeploy (CUDA, lmdeploy 0.18) and report how often its "
                               "tokens and step maps equal the native engine's (bf16 rounding may flip a few "
                               "near-threshold steps)")


@dataclass
class CheckCommand:
    model: CheckModel = field(default_factory=CheckModel)
    rollout: CheckRollout = field(default_factory=CheckRollout)
    check: Consistency = field(default_factory=Consistency)


CHECK_ALIASES = {
    "--model": "model.path", "--dtype": "model.dtype", "--prompts": "rollout.prompts",
    "--max-new-tokens": "rollout.max_new_tokens", "--temperature": "rollout.temperature",
    "--threshold": "rollout.threshold", "--seed": "rollout.seed", "--tolerance": "check.tolerance",
    "--lmdeploy": "check.lmdeploy",
}



# ---- python -m dirl_min.bench ----

@dataclass
class BenchModels:
    sizes: list = _f(["tiny", "mid"], "model sizes to benchmark, from dirl_min.speed.measures.SIZES (tiny = "
                                      "build_tiny defaults; mid = hidden 512, 8 layers, 8/4 heads, MLP 1536)",
                     rule=names_from(_sizes, "sizes"))
    block_size: int = _f(4, "diffusion block size B", rule=at_least(1))
    sharpen: float = _f(25.0, "factor applied to the untied lm_head weights so that the random model is confident",
                        rule=number(0, lo_open=True))
    seed: int = _f(0, "model weight seed", rule=at_least(0))


@dataclass
class BenchDecode:
    new_tokens: int = _f(256, "max_new_tokens of every decoding run (whole blocks; no stop tokens, so every run of a "
                              "row decodes the same number of blocks)", rule=at_least(1))
    batch: int = _f(16, "batch size of the large-batch row (row 4)", rule=at_least(1))
    threshold: float = _f(0.9, "confidence threshold of the dynamic strategy", rule=number(0, 1))
    temperature: float = _f(0.0, "decoding temperature for rows 1-5 (0 = greedy); rescoring rollouts always use 1.0",
                            rule=number(0, why="0 = greedy"))
    top_k: int = _f(0, "top-k for rows 1-5 when sampling (0 = off)", rule=at_least(0, "0 = off"))


@dataclass
class BenchReference:
    max_seconds: float = _f(60.0, "if the uncached reference decoder is estimated to take longer than this at "
                                  "--new-tokens, halve its token count until it fits (the value used is printed)",
                            rule=number(0, lo_open=True))
    tokens: int = _f(0, "new tokens for the reference comparison (row 1), overriding the estimate (0 = auto)",
                     rule=at_least(0, "0 = auto"))
    skip: bool = _f(False, "skip the uncached reference decoder (row 1)")


@dataclass
class BenchRescore:
    batch: int = _f(8, "rollouts rescored in row 6 (sampled: temperature 1, top-k 50, as DiRL's rollouts); 0 skips "
                       "the row", rule=at_least(0, "0 skips the row"))
    new_tokens: int = _f(64, "new tokens of each rescored rollout", rule=at_least(1))


@dataclass
class BenchRun:
    repeats: int = _f(2, "timed repeats per configuration (after one short warm-up), interleaved across the "
                         "configurations of a row; medians are reported. 2 keeps the default run near 5 minutes on "
                         "2 busy cores; use 3 or more for steadier figures", rule=at_least(1))
    threads: int = _f(1, "torch intra-op threads (0 = torch's default for this machine). 1 by default: on a machine "
                         "shared with other work, several threads make timings erratic",
                      rule=at_least(0, "0 = torch's default"))
    clock: str = _f("wall", "what the figures divide by: 'wall' = time.perf_counter (what a user waits); 'cpu' = "
                            "time.process_time, this process's CPU time, which other processes' load barely disturbs "
                            "when --threads is 1 (with more threads it sums their work). Both are kept in --json",
                    rule=one_of("wall", "cpu"))
    quick: bool = _f(False, "a fast smoke run (about a minute): --new-tokens 64 --repeats 1 --ref-max-seconds 15 "
                            "--rescore-batch 4 --rescore-new-tokens 32 (options given explicitly still win)")
    json: str = _f("", "also write all results (and raw timings) to this file ('' = no file)")
    quiet: bool = _f(False, "no progress lines on stderr")


@dataclass
class BenchCommand:
    model: BenchModels = field(default_factory=BenchModels)
    decode: BenchDecode = field(default_factory=BenchDecode)
    reference: BenchReference = field(default_factory=BenchReference)
    rescore: BenchRescore = field(default_factory=BenchRescore)
    run: BenchRun = field(default_factory=BenchRun)


BENCH_ALIASES = {
    "--sizes": "model.sizes", "--block-size": "model.block_size", "--sharpen": "model.sharpen", "--seed": "model.seed",
    "--new-tokens": "decode.new_tokens", "--batch": "decode.batch", "--threshold": "decode.threshold",
    "--temperature": "decode.temperature", "--top-k": "decode.top_k",
    "--ref-max-seconds": "reference.max_seconds", "--ref-tokens": "reference.tokens", "--no-reference": "reference.skip",
    "--rescore-batch": "rescore.batch", "--rescore-new-tokens": "rescore.new_tokens",
    "--repeats": "run.repeats", "--threads": "run.threads", "--clock": "run.clock", "--quick": "run.quick",
    "--json": "run.json", "--quiet": "run.quiet",
}

#: what --quick changes (settings given explicitly still win)
BENCH_QUICK = {"decode.new_tokens": 64, "run.repeats": 1, "reference.max_seconds": 15.0, "rescore.batch": 4,
               "rescore.new_tokens": 32}


# ---- python -m dirl_min.bench --shape (dirl_min.speed.shapes) ----

@dataclass
class ShapeModel:
    shape: str = _f("qwen3-0.6b", "the checkpoint whose shape is used (dirl_min.speed.shapes.SHAPES)",
                    rule=Check(lambda v: v in _shapes(), lambda: "one of " + ", ".join(_shapes())))
    layers: int = _f(0, "keep the first N decoder layers (0 = all of the real depth)", rule=at_least(0, "0 = all"))
    dtype: str = _f("float32", "float32 or bfloat16", rule=one_of("float32", "bfloat16"))
    attn: str = _f("sdpa", "attention implementation: sdpa or flex_attention", rule=one_of("sdpa", "flex_attention"))
    device: str = _f("cpu", "cpu or cuda",
                     rule=Check(lambda v: isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda"), "cpu or cuda"))


@dataclass
class ShapeStep:
    responses: int = _f(8, "responses per step", rule=at_least(1))
    response_tokens: int = _f(1024, "tokens per response (a multiple of 4)",
                              rule=Check(lambda v: is_int(v) and v > 0 and v % 4 == 0, "a positive multiple of 4 (the block size)"))
    stages: list = _f(["dipo", "sft"], "which steps to measure, from sft, dipo, rollout",
                      rule=names_from(lambda: ("sft", "dipo", "rollout"), "stages"))
    checkpointing: list = _f(["on", "off"], "gradient checkpointing settings to measure, from on, off (each a child "
                                            "process)", rule=names_from(lambda: ("on", "off"), "settings"))
    peak_tflops: float = _f(989.0, "the device's dense bf16 peak, for MFU (H100/H200)", rule=number(0, lo_open=True))
    lmdeploy: str = _f("", "rollout stage: decode with LMDeploy from this saved folder (--save)")


@dataclass
class ShapeRun:
    threads: int = _f(0, "torch threads per child (0 = torch's default)", rule=at_least(0, "0 = torch's default"))
    json: str = _f("", "also write the results here")
    save: str = _f("", "only save the random model (with the Qwen tokenizer) to this folder")
    worker: str = _f("", "a child process: stage:on|off", hidden=True)


@dataclass
class ShapeCommand:
    model: ShapeModel = field(default_factory=ShapeModel)
    step: ShapeStep = field(default_factory=ShapeStep)
    run: ShapeRun = field(default_factory=ShapeRun)


SHAPE_ALIASES = {
    "--shape": "model.shape", "--layers": "model.layers", "--dtype": "model.dtype", "--attn": "model.attn",
    "--device": "model.device", "--responses": "step.responses", "--response-tokens": "step.response_tokens",
    "--stages": "step.stages", "--checkpointing": "step.checkpointing", "--peak-tflops": "step.peak_tflops",
    "--lmdeploy": "step.lmdeploy", "--threads": "run.threads", "--json": "run.json", "--save": "run.save",
    "--worker": "run.worker",
}

def parse_command(argv, rules, cross_rules=(), **parser_kw):
    """A command's settings: :func:`dirl_min.settings.config.parse_config` (``parser_kw``: description, prog,
    root, aliases, ...), then the command's ``rules`` (:func:`dirl_min.settings.checks.command_problems`).
    Every error exits with status 2 and the command's usage line."""
    from dirl_min.settings.config import SettingsError, build_parser, parse_config
    from dirl_min.settings.rules import command_problems

    try:
        cfg = parse_config(argv, **parser_kw)
        msgs = command_problems(cfg, rules, cross_rules, parser_kw.get("aliases"))
    except SettingsError as e:  # a bad --config file
        msgs = [str(e)]
    if msgs:
        build_parser(**{k: v for k, v in parser_kw.items() if k != "base"}).error("; ".join(msgs))
    return cfg
