#!/usr/bin/env bash
# The evidence runs, one after another: the default main job on seeds 0-4, then the spread
# runs on seed 0 (1 thread, the AVX2 code path, the same run again). Each run's wall, user and
# system CPU seconds are appended to runs/evidence/times.txt. Usage: bash docs/evidence/run_seeds.sh
set -u
OUT=${OUT:-runs/evidence}
mkdir -p "$OUT"
run() {  # name, then env assignments and arguments
  local name=$1; shift
  /usr/bin/time -f "$name wall %e user %U sys %S" -a -o "$OUT/times.txt" \
    env "$@" &> "$OUT/$name.log"
}
for s in 0 1 2 3 4; do
  run seed$s python -m dirl_min.train --out "$OUT/seed$s" --seed $s --run.overwrite true
done
run seed0-threads1 python -m dirl_min.train --out "$OUT/seed0-threads1" --seed 0 --run.threads 1 --run.overwrite true
run seed0-avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  python -m dirl_min.train --out "$OUT/seed0-avx2" --seed 0 --run.overwrite true
run seed0-again python -m dirl_min.train --out "$OUT/seed0-again" --seed 0 --run.overwrite true
