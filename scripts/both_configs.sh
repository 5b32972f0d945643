#!/usr/bin/env bash
# Run one command under both numeric configurations side by side (scripts/numeric_env.py), one thread each.
#   scripts/both_configs.sh NAME COMMAND [ARGS...]
# Each run's output goes to _build/logs/NAME-CONFIG.log and is printed when both have finished; the exit
# status is non-zero when either run failed. EXTRA_ENV_native / EXTRA_ENV_other add variables to one run
# (`make seeds` gives each its own BNLIB_SEED).
set -uo pipefail
name=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON_FOR_ENV:-python3}
mkdir -p _build/logs
pids=(); configs=(native other)
for config in "${configs[@]}"; do
  log=_build/logs/$name-$config.log
  vars=$("$python" "$here/numeric_env.py" "$config") || exit 2
  extra_name=EXTRA_ENV_$config; vars="$vars ${!extra_name:-}"
  # shellcheck disable=SC2086
  ( start=$(date +%s); env $vars "$@" >"$log" 2>&1; rc=$?
    echo "[$name, $config configuration: exit $rc after $(( $(date +%s) - start )) s]" >>"$log"; exit $rc ) &
  pids+=($!)
done
status=0
for i in "${!configs[@]}"; do
  wait "${pids[$i]}" || status=1
done
for config in "${configs[@]}"; do
  extra_name=EXTRA_ENV_$config
  echo "==================== $name: $config configuration ($("$python" "$here/numeric_env.py" "$config" | tr '\n' ' ')${!extra_name:-})"
  cat "_build/logs/$name-$config.log"
done
exit $status
