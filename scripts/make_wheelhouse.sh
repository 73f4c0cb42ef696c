#!/usr/bin/env bash
# Wheels for an offline GPU node: everything dirl_min needs beyond what the node already has.
#
#     PYTHON=/path/to/node-like/python bash scripts/make_wheelhouse.sh DIR [EXTRA...]
#
# PYTHON (default: python) is an environment standing for the node: Python 3.12 with the node's
# packages, as `pip install -r .ci/node.txt` makes it (torch 2.11, transformers 5.17,
# accelerate 1.15, numpy, safetensors, tokenizers, sympy, matplotlib, tensorboard, pyyaml, tqdm,
# einops, pytest, hypothesis). pip resolves the project's requirements (and EXTRAs, e.g.
# lmdeploy) against what that environment has, installing nothing; each package it would add
# or change is downloaded into DIR as a wheel for CPython 3.12 on manylinux x86-64 (never a
# source build), and DIR/requirements.txt pins them. On the node:
#
#     pip install --no-index --find-links DIR -r DIR/requirements.txt
#     pip install --no-index --no-deps --no-build-isolation -e .
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: PYTHON=python3.12 bash scripts/make_wheelhouse.sh DIR [EXTRA...]" >&2; exit 2; }
dir=$1; shift
extras=$(IFS=,; echo "$*")
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$py" - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    have = {n: version(n) for n in ("torch", "transformers", "accelerate")}
except PackageNotFoundError as e:
    sys.exit(f"make_wheelhouse: {sys.executable} lacks {e}: PYTHON must stand for the node (pip install -r .ci/node.txt)")
print(f"node stand-in: Python {sys.version.split()[0]}, " + ", ".join(f"{k} {v}" for k, v in have.items()))
if sys.version_info[:2] != (3, 12):
    print("  warning: not Python 3.12, so version markers are evaluated for this Python, not the node's")
PY
# the project's own requirements (and extras), read from pyproject.toml
mapfile -t reqs < <("$py" - "$extras" <<'PY'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(*p["dependencies"], sep="\n")
for extra in filter(None, sys.argv[1].split(",")):
    print(*p["optional-dependencies"][extra], sep="\n")
PY
)
# the node's torch, transformers and accelerate stay as they are: never upgraded to suit an extra
"$py" -c 'from importlib.metadata import version as v
for n in ("torch", "transformers", "accelerate"): print(f"{n}=={v(n)}")' > "$work/keep.txt"
"$py" -m pip install -q --dry-run --report "$work/report.json" -c "$work/keep.txt" "${reqs[@]}"
"$py" - "$work/report.json" "$dir/requirements.txt" <<'PY'
import json, sys
new = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"])
with open(sys.argv[2], "w") as f:
    f.write("# scripts/make_wheelhouse.sh: what the node lacks\n")
    f.writelines(f"{n}=={v}\n" for n, v in new)
print(f"{len(new)} packages beyond the node's: " + ", ".join(f"{n} {v}" for n, v in new))
PY
platforms=()
for n in 17 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${platforms[@]}" -d "$dir" -r "$dir/requirements.txt"
"$py" - "$dir" <<'PY'
import pathlib, sys
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"total: {total / 2**20:.1f} MiB in {len(wheels)} wheels ({sys.argv[1]})")
PY
