#!/usr/bin/env bash
# Runs `python -m train.main` under torchrun, on one node or on several.
#
#   launch/torchrun.sh experiment=NAME [key=value ...]              one node, one process per GPU
#   NNODES=2 RDZV_ENDPOINT=node01:29500 launch/torchrun.sh experiment=NAME ...
#                                                                    the same line on every node
#   launch/torchrun.sh --dry-run experiment=NAME ...                 print each node's command only
#
# The experiment and overrides reach train.main verbatim; quote them as for any command, e.g.
#   data.shards='/data/shard-{000000..000999}.tar'
# Environment:
#   NPROC_PER_NODE  processes per node (default: the GPUs this node shows, else 1)
#   NNODES          nodes (default 1); above 1, RDZV_ENDPOINT is required
#   RDZV_ENDPOINT   host:port of the c10d rendezvous: one node's address every node can reach (the
#                   node that owns it hosts the store); never localhost on several nodes
#   RDZV_ID         rendezvous id, the same on every node (default qwen35-pretrain)
#   NODE_RANK       this node's rank, 0..NNODES-1 (default 0). The c10d rendezvous assigns node
#                   ranks as nodes join, so it only labels the node (dry run, LOG_DIR/node<NODE_RANK>)
#   MAX_RESTARTS    times torchrun restarts a failed worker group (default 0); a restarted run
#                   resumes from the last committed checkpoint (train.resume=auto)
#   LOG_DIR         write every rank's stdout/stderr under LOG_DIR/node<NODE_RANK>/ (and to console)
#   TORCHRUN        the launcher (default .venv/bin/torchrun, else torchrun on PATH)
#   DRY_RUN=1       the same as --dry-run
# Before starting anything, the config is checked once with WORLD_SIZE = NNODES x NPROC_PER_NODE,
# so a bad layout fails with one line instead of one per rank.
# The other launchers (cpu.sh, slurm.sbatch) source this file for the functions below.
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# Elastic restarts: torchrun shares its rendezvous store with the workers without a per-attempt
# prefix, so a restarted rank can connect to the dead attempt's ports (pytorch/pytorch#135712).
# The trainer prefixes by the restart count, which only one node's workers agree on; opting out
# gives every attempt a fresh store on any number of nodes. (cpu.sh and slurm.sbatch source this.)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# One argument as it has to be typed in a shell; in key=value only the value is quoted.
shquote() {
  local w=$1 key_re='^([A-Za-z0-9_+][A-Za-z0-9_.+@/-]*=)(.*)$' q="'"
  if [[ -n $w && $w != *[!A-Za-z0-9_./:=,+@%-]* ]]; then
    printf '%s' "$w"
    return
  fi
  if [[ $w =~ $key_re ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    w=${BASH_REMATCH[2]}
  fi
  printf "'%s'" "${w//$q/$q\\$q$q}"
}

# A command line a shell would read back into exactly these arguments.
print_cmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shquote "$a")"; done
  printf '%s\n' "$out"
}

# GPUs this node shows: CUDA_VISIBLE_DEVICES if set, else nvidia-smi; 0 when there are none.
count_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local ids
    IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

pick_torchrun() {
  if [[ -n ${TORCHRUN:-} ]]; then echo "$TORCHRUN"
  elif [[ -x $REPO/.venv/bin/torchrun ]]; then echo .venv/bin/torchrun
  else echo torchrun; fi
}

pick_python() {
  if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"
  elif [[ -x $REPO/.venv/bin/python ]]; then echo .venv/bin/python
  else echo python3; fi
}

# Compose and validate the config as WORLD_SIZE ranks would; print its run_dir. Exits 2 on error.
check_config() {
  local world=$1 out
  shift
  if ! out=$(WORLD_SIZE=$world "$(pick_python)" -m train.main "$@" --cfg); then
    echo "launch: the config above is invalid for world size $world; nothing was started" >&2
    exit 2
  fi
  out=$(sed -n 's/^run_dir: //p' <<< "$out")
  out=${out#[\'\"]}
  echo "${out%[\'\"]}"
}

# Whether a host name (or address) resolves here: torchrun would retry a bad one for minutes.
resolves() { getent ahosts "$1" >/dev/null 2>&1; }

is_dry_run() { [[ ${DRY_RUN:-0} != 0 && -n ${DRY_RUN:-} ]]; }

main() {
  if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d'; return 0; fi
  cd "$REPO"
  local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} restarts=${MAX_RESTARTS:-0}
  local nproc=${NPROC_PER_NODE:-}
  if [[ -z $nproc ]]; then
    nproc=$(count_gpus)
    if [[ $nproc == 0 ]]; then
      nproc=1
      echo "launch: no GPU found, starting 1 process (launch/cpu.sh N runs N gloo ranks on CPU)" >&2
    fi
  fi
  local cmd=("$(pick_torchrun)")
  if [[ $nnodes == 1 && -z ${RDZV_ENDPOINT:-} ]]; then
    cmd+=(--standalone --nproc-per-node "$nproc")
  else
    if [[ -z ${RDZV_ENDPOINT:-} ]]; then
      echo "launch: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (a node every node can reach)" >&2
      return 2
    fi
    cmd+=(--nnodes "$nnodes" --nproc-per-node "$nproc" --rdzv-backend c10d
          --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-qwen35-pretrain}")
  fi
  cmd+=(--max-restarts "$restarts")
  local node_cmd=("${cmd[@]}")
  if [[ -n ${LOG_DIR:-} ]]; then node_cmd+=(--log-dir "$LOG_DIR/node$node_rank" --tee 3); fi
  node_cmd+=(--module train.main "$@")

  if is_dry_run; then
    local n world="?"
    [[ $nnodes =~ ^[0-9]+$ ]] && world=$((nnodes * nproc))
    echo "# dry run: $nnodes node(s) x $nproc processes = world $world; run from $REPO"
    if [[ $nnodes =~ ^[0-9]+$ && $nnodes -gt 1 ]]; then
      echo "# c10d rendezvous at $RDZV_ENDPOINT; it numbers the nodes as they join (NODE_RANK only labels them)"
      for ((n = 0; n < nnodes; n++)); do
        local per=("${cmd[@]}")
        if [[ -n ${LOG_DIR:-} ]]; then per+=(--log-dir "$LOG_DIR/node$n" --tee 3); fi
        per+=(--module train.main "$@")
        printf '[node %d%s] %s\n' "$n" "$([[ $n == "$node_rank" ]] && echo ', this node')" "$(print_cmd "${per[@]}")"
      done
    else
      printf '[node 0] %s\n' "$(print_cmd "${node_cmd[@]}")"
    fi
    return 0
  fi
  if [[ $nnodes =~ ^[0-9]+$ ]]; then
    check_config $((nnodes * nproc)) "$@" >/dev/null
  fi
  exec "${node_cmd[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
