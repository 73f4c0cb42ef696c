#!/usr/bin/env bash
# The evidence runs: the default main job on seeds 0-4, one after another. Each run's wall, user
# and system CPU seconds are appended to $OUT/times.txt. Usage: bash docs/evidence/run_seeds.sh
set -u
OUT=${OUT:-runs/evidence}
mkdir -p "$OUT"
for s in ${SEEDS:-0 1 2 3 4}; do
  /usr/bin/time -f "seed$s wall %e user %U sys %S" -a -o "$OUT/times.txt" \
    python -m dirl_min.train --out "$OUT/seed$s" --seed $s --run.overwrite true &> "$OUT/seed$s.log"
done
