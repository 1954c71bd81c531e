#!/bin/bash
# Waits (at most ~10 min) until the CPUs have been at least 85 % idle over 5 consecutive 1-second intervals.
idle() { awk '/^cpu /{print $5+$6, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
quiet=0
for i in $(seq 600); do
  read i0 t0 < <(idle); sleep 1; read i1 t1 < <(idle)
  pct=$(( 100 * (i1 - i0) / (t1 - t0 + 1) ))
  if [ $pct -ge 85 ]; then quiet=$((quiet+1)); else quiet=0; fi
  [ $quiet -ge 5 ] && exit 0
done
echo "machine never quiet; measuring anyway" >&2
