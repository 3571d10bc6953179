#!/usr/bin/env bash
# Model-check spec/model/group.pml with spin: every configuration below must verify with
# 0 errors (assertions, invalid end states, the "nobody waits forever" watchdog, and the
# progress property), and the sanity run must find its planted violation (proof that a
# group can complete at all, so the safety checks are not vacuous).
#
# Usage: spec/model/check.sh [--only NAME[,NAME...]] [-DMACRO[=VALUE] ...]
#   --only runs just the named configurations (see the table below).
#   Extra macros are added to every configuration, e.g. -DBUG_APPLY_EARLY to check that
#   spin catches a member that applies the sum with k-1 reduced shards (then this script
#   must fail). Exit status: 0 if everything verified, 1 otherwise, 2 on a usage error or
#   if spin or gcc is missing.
# Environment: PAN_MEMLIM (MB, default 1500), PAN_DEPTH (default 200000), JOBS (default 2),
#   PAN_CFLAGS (more gcc flags for pan, after the configuration's: e.g. -O0 for a run that
#   stops at its first error, where a long -O2 compile does not pay).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
model="$here/group.pml"
extra=()
only=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --only) only="${2:-}"; shift 2 || { echo "check.sh: --only needs names" >&2; exit 2; } ;;
    -D*) extra+=("$1"); shift ;;
    *) echo "check.sh: unknown argument '$1' (expected --only NAMES or -DMACRO[=VALUE])" >&2
       exit 2 ;;
  esac
done
for tool in spin gcc; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "check.sh: '$tool' not found; install it (Debian: apt-get install -y spin gcc)" >&2
    exit 2
  fi
done
memlim="${PAN_MEMLIM:-1500}"
depth="${PAN_DEPTH:-200000}"
jobs="${JOBS:-2}"
read -r -a pan_cflags <<<"${PAN_CFLAGS:-}"

# name | spin macros | pan build flags | pan run flags | expect (pass or violation)
# pan is compiled with -O0 unless its build flags say otherwise: gcc -O2 on pan.c takes
# tens of seconds, which only the searches of millions of states repay (race3: 8.8M states
# in 3x less time than at -O0); the others search in seconds at -O0.
configs=(
  "race3|-DN=3 -DNINIT=2 -DTRIES=1 -DMAXCRASH=1 -DQS=6|-DSAFETY -O2|-c1|pass"
  "race3-withdraw|-DN=3 -DNINIT=2 -DTRIES=1 -DMAXCRASH=0 -DMAXWITHDRAW=1 -DQS=6|-DSAFETY -O2|-c1|pass"
  "crash4|-DN=4 -DNINIT=1 -DTRIES=1 -DMAXCRASH=1 -DQS=6|-DSAFETY|-c1|pass"
  "withdraw4|-DN=4 -DNINIT=1 -DTRIES=1 -DMAXCRASH=0 -DMAXWITHDRAW=1 -DQS=6|-DSAFETY|-c1|pass"
  "progress4|-DN=4 -DNINIT=1 -DTRIES=1 -DMAXCRASH=0 -DPROGRESS -DQS=6|-DNFAIR=3|-a -f -c1|pass"
  "canary|-DN=4 -DNINIT=1 -DTRIES=1 -DMAXCRASH=0 -DCANARY_COMPLETION -DQS=6|-DSAFETY|-c1|violation"
  "shares-canary|-DN=4 -DNINIT=1 -DTRIES=1 -DMAXCRASH=0 -DBUG_SHARE_ROUNDING -DQS=6|-DSAFETY|-c1|violation"
)

if [ -n "$only" ]; then
  selected=()
  IFS=',' read -r -a wanted <<<"$only"
  for w in "${wanted[@]}"; do
    found=""
    for c in "${configs[@]}"; do
      if [ "${c%%|*}" = "$w" ]; then selected+=("$c"); found=1; fi
    done
    if [ -z "$found" ]; then
      echo "check.sh: no configuration named '$w'" >&2
      exit 2
    fi
  done
  configs=("${selected[@]}")
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run_one() {  # index: verify one configuration, leaving a one-line verdict in $work/N.verdict
  local i="$1"
  IFS='|' read -r name macros build runflags expect <<<"${configs[$i]}"
  local dir="$work/$i"
  mkdir -p "$dir"
  cp "$model" "$dir/group.pml"
  local verdict
  # shellcheck disable=SC2086  # macros and flags are word lists on purpose
  if ! (cd "$dir" && spin $macros "${extra[@]}" -a group.pml >spin.log 2>&1); then
    verdict="FAIL  $name: spin -a failed: $(tr '\n' ' ' <"$dir/spin.log")"
  elif ! (cd "$dir" && gcc -O0 -w $build "${pan_cflags[@]}" -DCOLLAPSE -DMEMLIM="$memlim" -o pan pan.c \
      >gcc.log 2>&1); then
    verdict="FAIL  $name: gcc failed: $(head -c 400 "$dir/gcc.log")"
  else
    (cd "$dir" && ./pan -m"$depth" $runflags >pan.log 2>&1) || true
    local log="$dir/pan.log"
    local errors states depth_reached
    errors="$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    states="$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$log" | tail -n 1)"
    depth_reached="$(sed -n 's/.*depth reached \([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    local incomplete=""
    if grep -qE "max search depth too small|out of memory|Search not completed" "$log"; then
      incomplete="search incomplete ($(grep -oE "max search depth too small|out of memory|Search not completed" "$log" | head -n 1))"
    fi
    local what
    what="$(grep -E "assertion violated|invalid end state|acceptance cycle|non-progress cycle|pan:1:" "$log" | head -n 1 || true)"
    local summary="states=${states:-?} depth=${depth_reached:-?} errors=${errors:-?}"
    if [ "$expect" = pass ]; then
      if [ "${errors:-x}" = 0 ] && [ -z "$incomplete" ]; then
        verdict="ok    $name: $summary"
      else
        verdict="FAIL  $name: $summary ${incomplete} ${what}"
      fi
    else
      if [ -n "${errors:-}" ] && [ "$errors" != 0 ]; then
        verdict="ok    $name: the planted violation was found as expected ($what)"
      else
        verdict="FAIL  $name: expected spin to find the planted violation: $summary"
      fi
    fi
    if [[ "$verdict" == FAIL* ]]; then
      cp "$log" "$work/$i.pan.log"
      if [ -f "$dir/group.pml.trail" ]; then
        (cd "$dir" && spin -t -p -g -l $macros "${extra[@]}" group.pml 2>&1 | tail -n 60) \
          >"$work/$i.trail.txt" || true
      fi
    fi
  fi
  echo "$verdict" >"$work/$i.verdict"
}

echo "== spin model check of $model"
echo "   spin: $(spin -V | head -n 1); extra macros: ${extra[*]:-none}; memlim ${memlim} MB"
running=0
for i in "${!configs[@]}"; do  # the largest run first, the others fill the other core(s)
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_one "$i" &
  running=$((running + 1))
done
wait

failed=0
for i in "${!configs[@]}"; do
  line="$(cat "$work/$i.verdict")"
  echo "$line"
  if [[ "$line" == FAIL* ]]; then
    failed=$((failed + 1))
    if [ -f "$work/$i.trail.txt" ]; then
      echo "---- counterexample (last steps of spin -t) ----"
      cat "$work/$i.trail.txt"
      echo "------------------------------------------------"
    elif [ -f "$work/$i.pan.log" ]; then
      tail -n 25 "$work/$i.pan.log"
    fi
  fi
done
if [ "$failed" -ne 0 ]; then
  echo "== model check FAILED: $failed of ${#configs[@]} runs"
  exit 1
fi
echo "== model check passed: ${#configs[@]} runs, errors 0"
