"""The benchmarks of an evaluation: DiRL's five sets, where they come from, how a run finds them.

Two ways to get DiRL's sets, both shown in the README:

* ``--data-dir DIR``: local files, one per benchmark (``math500.jsonl`` ..., or DiRL's own
  spelling ``MATH500.json``), records with ``question`` and ``ground_truth_answer``.
* ``--hub``: :func:`fetch` downloads DiRL's own copies from the Hugging Face Hub with
  ``datasets`` (:data:`HUB_SOURCES`: dataset id, revision, file), converts them to that
  layout (:func:`to_records`) and keeps them in :func:`cache_dir`; later runs, also
  offline, read the cached copy. Without network (``HF_HUB_OFFLINE=1``, or a Hub that does
  not answer within a few seconds) a benchmark that is not cached is an immediate error
  that says what to do, instead of ``datasets``' retries.

A run's benchmarks (:func:`load_benchmarks`) are those names or any files/folders of records
(:func:`resolve_benchmarks`), and/or the embedded task's held-out split, each with its prompt
template (DiRL's :data:`DIRL_PROMPT` for benchmark files).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from dirl_min.infra.atomic import atomic_write
from dirl_min.infra.errors import DirlError, EvalError
from dirl_min.data import Problem
from dirl_min.data.tasks import PLAIN_TEMPLATE

__all__ = ["HubSource", "HUB_SOURCES", "BENCHMARKS", "HubError", "cache_dir", "to_records", "hub_unreachable",
           "fetch", "DIRL_PROMPT", "Benchmark", "resolve_benchmarks", "load_benchmarks"]


class HubError(DirlError, RuntimeError):
    """A benchmark could not be had from the Hub (offline, unreachable, unknown); the message says what to do."""


@dataclass(frozen=True)
class HubSource:
    """One benchmark on the Hub: ``datasets.load_dataset(repo, revision=revision, data_files=file)``."""

    repo: str
    file: str
    revision: str = "main"


# DiRL's evaluation sets (``download.sh`` of OpenMOSS/DiRL fetches these repositories, one JSON
# file each). Revision "main": no commit of these repositories could be checked from where this
# was written; the commit actually read is recorded next to each cached copy and in results.json.
HUB_SOURCES: dict[str, HubSource] = {
    "math500": HubSource("Auraithm/MATH500", "MATH500.json"),
    "gsm8k": HubSource("Auraithm/GSM8K", "GSM8K.json"),
    "aime2024": HubSource("Auraithm/AIME2024", "AIME2024.json"),
    "aime2025": HubSource("Auraithm/AIME2025", "AIME2025.json"),
    "olympiadbench": HubSource("Auraithm/OlympiadBench", "OlympiadBench.json"),
}
#: benchmark name -> DiRL's spelling of it (its Hub dataset and file name)
BENCHMARKS = {name: src.file.removesuffix(".json") for name, src in HUB_SOURCES.items()}
CACHE_ENV = "DIRL_MIN_DATA"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0

# Field names used by public copies of these benchmarks, in order of preference.
_QUESTION_KEYS = ("question", "problem", "Problem", "Question")
_ANSWER_KEYS = ("ground_truth_answer", "answer", "final_answer", "Answer")


def cache_dir() -> Path:
    """Where ``--hub`` keeps converted benchmark files: ``$DIRL_MIN_DATA``, else
    ``$XDG_CACHE_HOME/dirl_min/benchmarks`` (``~/.cache/dirl_min/benchmarks``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dirl_min" / "benchmarks"


def _answer_text(value, key: str) -> str:
    """A ground truth as text: GSM8K solutions keep only what follows the last ``####``
    (thousands commas removed); a one-element list is its element; 70.0 becomes 70."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{key} is a list of {len(value)} answers; expected exactly one")
        value = value[0]
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{key} is {value!r}; expected text or a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def to_records(rows: Iterable[dict], where: str) -> list[dict]:
    """``{"question", "ground_truth_answer"}`` records from rows in any of the layouts public
    copies use: question under question/problem, answer under ground_truth_answer/answer/
    final_answer (GSM8K's ``... #### 72`` solutions and one-element lists are reduced to the
    answer). Other plain (text / number) fields are kept.

    Raises:
        ValueError: a row without a question or an answer (the message names ``where`` and the row).
    """
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        q_key = next((k for k in _QUESTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        a_key = next((k for k in _ANSWER_KEYS if row.get(k) not in (None, "", [])), None)
        if q_key is None or a_key is None:
            missing = "question" if q_key is None else "answer"
            raise ValueError(f"{where}: row {i} has no {missing} (fields: {sorted(row)}; "
                             f"looked for {_QUESTION_KEYS if q_key is None else _ANSWER_KEYS})")
        try:
            answer = _answer_text(row[a_key], a_key)
        except ValueError as e:
            raise ValueError(f"{where}: row {i}: {e}") from None
        rest = {k: v for k, v in row.items()  # plain extra fields (id, source, level ...) travel along
                if k not in (q_key, a_key, "question", "ground_truth_answer") and isinstance(v, (str, int, float))}
        out.append({"question": row[q_key], "ground_truth_answer": answer, **rest})
    return out


def _offline_flag() -> str | None:
    for name in OFFLINE_ENVS:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be used now (``HF_HUB_OFFLINE`` set, or no TCP connection to the
    endpoint within ``timeout`` seconds), or None when it answers."""
    flag = _offline_flag()
    if flag:
        return f"{flag}={os.environ[flag]} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} did not answer within {timeout:g} s ({type(e).__name__}: {e})"
    return None


def _cached(name: str, src: HubSource, folder: Path) -> tuple[Path, dict] | None:
    path, meta_path = folder / f"{name}.jsonl", folder / f"{name}.source.json"
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None  # a copy whose record is unreadable is fetched again
    if (meta.get("repo"), meta.get("revision"), meta.get("file")) != (src.repo, src.revision, src.file):
        return None  # the pinned source changed since the copy was made
    return path, meta


def jsonl_text(records: Iterable[dict]) -> str:
    """The cache's JSON Lines text: one record per line, non-ASCII kept as UTF-8 (U+2028 and U+2029
    too, raw inside strings: :func:`dirl_min.data.load_records` splits lines at "\\n" only)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _download(name: str, src: HubSource, folder: Path) -> tuple[Path, dict]:
    from huggingface_hub import HfApi

    from dirl_min.data.records import import_datasets

    datasets = import_datasets("--hub")

    commit = HfApi().dataset_info(src.repo, revision=src.revision, timeout=10).sha
    ds = datasets.load_dataset(src.repo, revision=commit, data_files=src.file, split="train")
    records = to_records(ds, f"hf://datasets/{src.repo}@{commit}/{src.file}")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"repo": src.repo, "revision": src.revision, "file": src.file, "commit": commit, "records": len(records)}
    path = folder / f"{name}.jsonl"
    atomic_write(path, jsonl_text(records))
    atomic_write(folder / f"{name}.source.json", json.dumps(meta, indent=2) + "\n")
    return path, meta


def fetch(names: list[str], folder: Path | None = None) -> list[tuple[str, Path, str]]:
    """``(name, local JSONL file, source)`` per benchmark name, downloading what is not cached.

    ``source`` is ``hf://datasets/<repo>@<commit>/<file>``. Cached copies are used without
    any network access; the network is probed once, only when something is missing.

    Raises:
        HubError: an unknown name, or a missing copy while the Hub is unreachable / offline,
            or a failed download (the message says what to do instead).
    """
    folder = Path(folder) if folder is not None else cache_dir()
    unknown = [n for n in names if n.lower() not in HUB_SOURCES]
    if unknown:
        raise HubError(f"--hub: unknown benchmark(s) {unknown}; the Hub sets are {', '.join(HUB_SOURCES)} "
                       "(other files: --benchmarks path/to/file.jsonl)")
    found = {n: _cached(n.lower(), HUB_SOURCES[n.lower()], folder) for n in names}
    missing = [n for n, hit in found.items() if hit is None]
    if missing:
        reason = hub_unreachable()
        if reason:
            raise HubError(f"--hub: {', '.join(missing)} not in the local cache {folder} and the Hugging Face Hub "
                           f"cannot be reached ({reason}). Run once with network access to fill the cache, or "
                           "pass local files with --data-dir DIR (see README, 'Evaluation')")
    out = []
    for n in names:
        key, src = n.lower(), HUB_SOURCES[n.lower()]
        if found[n] is None:
            try:
                found[n] = _download(key, src, folder)
            except Exception as e:  # network, permissions, a changed file layout ...
                raise HubError(f"--hub: could not get {src.repo} ({src.file}, revision {src.revision}) from the "
                               f"Hugging Face Hub: {type(e).__name__}: {e}; use local files with --data-dir") from None
        path, meta = found[n]
        out.append((key, path, f"hf://datasets/{src.repo}@{meta['commit']}/{src.file}"))
    return out


# --------------------------------------------------------------------------------------
# The benchmarks of a run
# --------------------------------------------------------------------------------------

DIRL_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Benchmark:
    """One evaluation set: its problems (after ``--limit``), where they came from, and the
    prompt template used for it. ``prompts`` (chat-rendered token ids) are filled by :func:`prepare`."""

    name: str
    source: str
    problems: list[Problem]
    template: str
    prompts: list[list[int]] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def resolve_benchmarks(spec: str, data_dir: Path | None) -> list[tuple[str, Path]]:
    """``(name, file)`` for each comma-separated item of ``spec``.

    An item is an existing file (name = its stem), an existing folder (every JSON/JSONL/
    parquet file in it), or a benchmark name looked up in ``data_dir`` as ``name.jsonl``,
    ``name.json`` or ``name.parquet`` (also DiRL's own spelling, e.g. ``MATH500.json``).

    Raises:
        EvalError: an item that is neither, no ``data_dir`` for a name, or two benchmarks
            with the same name.
    """
    out: list[tuple[str, Path]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_file():
            out.append((_stem(path), path))
            continue
        if path.is_dir():
            files = _data_files(path)
            if not files:
                raise EvalError(f"--benchmarks: folder {path} holds no {'/'.join(DATA_SUFFIXES)} file")
            out.extend((_stem(f), f) for f in files)
            continue
        if "/" in item or os.sep in item or item.endswith(DATA_SUFFIXES):
            raise EvalError(f"--benchmarks: no such file or folder: {item}")
        if data_dir is None and item.lower() not in BENCHMARKS:
            raise EvalError(f"--benchmarks: {item!r} is not a file, a folder or a benchmark name "
                            f"({', '.join(BENCHMARKS)})")
        if data_dir is None:
            raise EvalError(
                f"--benchmarks: {item!r} is a benchmark name but no --data-dir was given; pass --hub (downloads "
                "DiRL's sets once, then reads the local cache), --data-dir DIR, or the files themselves "
                "(--benchmarks path/to/math500.jsonl,...)")
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise EvalError(f"--data-dir: {data_dir} is not a folder")
        names = [item] + ([BENCHMARKS[item.lower()]] if item.lower() in BENCHMARKS else [])
        found = next((data_dir / f"{n}{s}" for n in names for s in DATA_SUFFIXES if (data_dir / f"{n}{s}").is_file()), None)
        if found is None:
            have = ", ".join(_stem(f) for f in _data_files(data_dir)) or "nothing"
            raise EvalError(f"--benchmarks: no file for {item!r} in {data_dir} (looked for {item}.jsonl/.json/.parquet); "
                            f"it holds: {have}")
        out.append((item, found))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"--benchmarks: several files give the benchmark name(s) {dup}; rename one")
    if not out:
        raise EvalError("--benchmarks: no benchmark given")
    return out


def load_benchmarks(cfg) -> list[Benchmark]:
    """The benchmarks selected by the settings ``cfg`` (:class:`dirl_min.settings.commands.EvalCommand`; its
    ``data`` section), with problems loaded and ``--limit`` applied. '' means not given.

    Raises:
        DataError: a malformed data file (the message names file, line and field).
        EvalError: a usage problem.
    """
    from dirl_min import data

    d = cfg.data
    benches: list[Benchmark] = []
    spec = d.benchmarks or ("" if d.task else ",".join(BENCHMARKS))
    if spec:
        if d.hub:
            try:
                got = fetch([s.strip() for s in spec.split(",") if s.strip()])
            except HubError as e:
                raise EvalError(str(e)) from None
            files, sources = [(n, p) for n, p, _ in got], [src for _, _, src in got]
        else:
            data_dir = Path(d.data_dir) if d.data_dir else None
            files = resolve_benchmarks(spec, data_dir)
            sources = [str(p.resolve()) for _, p in files]
        template = d.prompt_template or DIRL_PROMPT
        for (name, path), source in zip(files, sources):
            benches.append(Benchmark(name, source, data.load_problems(path), template))
    if d.task == "embedded":
        levels = tuple(d.task_levels)
        problems = data.arithmetic_problems(d.task_max_operand, levels)
        _, held = data.split_problems(problems, d.held_out, d.split_seed)
        template = d.prompt_template or PLAIN_TEMPLATE
        source = (f"embedded arithmetic task, levels {list(levels)}, operands 0..{d.task_max_operand}, "
                  f"held-out {d.held_out} (split seed {d.split_seed})")
        if any(b.name == "embedded" for b in benches):
            raise EvalError("--task embedded: a benchmark file is already called 'embedded'; rename it")
        benches.append(Benchmark("embedded", source, held, template))
    if d.limit:
        for b in benches:
            b.problems = b.problems[: d.limit]
    return benches
