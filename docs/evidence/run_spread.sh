#!/usr/bin/env bash
# The spread runs on seed 0, where only the floating-point path changes: 2 threads instead of 1,
# the AVX2 code path of ATen, MKL and oneDNN instead of AVX-512, and the same run again.
# Usage: bash docs/evidence/run_spread.sh [threads2] [avx2] [again]   (default: all three, in turn;
# after run_seeds.sh: seed0 is the reference)
set -u
OUT=${OUT:-runs/evidence}
mkdir -p "$OUT"
run() {  # name, then env assignments and the command
  local name=$1; shift
  /usr/bin/time -f "$name wall %e user %U sys %S" -a -o "$OUT/times.txt" env "$@" &> "$OUT/$name.log"
}
AVX2=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
for what in "${@:-threads2 avx2 again}"; do for w in $what; do case $w in
  threads2) run seed0-threads2 python -m dirl_min.train --out "$OUT/seed0-threads2" --seed 0 --run.threads 2 --run.overwrite true ;;
  avx2)  # first, into seed0-avx2.paths, that the code path is honoured: ATen's dispatch level and MKL's banner
    env "${AVX2[@]}" MKL_VERBOSE=1 python -c \
      "import torch; print('aten', torch.backends.cpu.get_cpu_capability()); torch.ones(8, 8) @ torch.ones(8, 8)" \
      2>&1 | head -2 > "$OUT/seed0-avx2.paths"
    run seed0-avx2 "${AVX2[@]}" python -m dirl_min.train --out "$OUT/seed0-avx2" --seed 0 --run.overwrite true ;;
  again) run seed0-again python -m dirl_min.train --out "$OUT/seed0-again" --seed 0 --run.overwrite true ;;
  *) echo "unknown spread run $w" >&2; exit 2 ;;
esac; done; done
