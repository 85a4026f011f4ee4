#!/usr/bin/env bash
# Runs any parallel layout on this machine's CPU: N gloo ranks under torchrun --standalone.
#
#   launch/cpu.sh N experiment=NAME [key=value ...]
#   launch/cpu.sh 4 experiment=smoke_cpu_text parallel.tp=2 parallel.ep=2
#   launch/cpu.sh --dry-run 4 experiment=smoke_cpu_text parallel.tp=2     print the command only
#
# Adds train.device=cpu before the overrides (the trainer then picks gloo). OMP_NUM_THREADS
# defaults to the cores this process may use divided by N (at least 1), so N ranks do not
# oversubscribe the CPU. Same environment as launch/torchrun.sh (TORCHRUN, DRY_RUN=1, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh"

if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ ! ${1:-} =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/cpu.sh [--dry-run] NPROC experiment=NAME [key=value ...]" >&2
  exit 2
fi
nproc=$1
shift
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
threads=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
cd "$REPO"
cmd=(env "OMP_NUM_THREADS=$threads" "$(pick_torchrun)" --standalone --nproc-per-node "$nproc"
     --module train.main train.device=cpu "$@")
if is_dry_run; then
  echo "# dry run: 1 node x $nproc gloo processes on CPU = world $nproc; run from $REPO"
  printf '[node 0] %s\n' "$(print_cmd "${cmd[@]}")"
  exit 0
fi
check_config "$nproc" train.device=cpu "$@" >/dev/null
exec "${cmd[@]}"
