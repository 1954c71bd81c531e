#!/bin/bash
# Routing measurements (issue 15): per shape, a uniform calibration, then bench --routing zipf:S (calibrates with it,
# sweeps on it, and reads the uniform profile's picks off the same timings); then the capture overhead.
# Two torch threads (the default on this machine): the second set, since one thread hid the effect of skew.
set -x
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt-routing
cd /work/wt-routing
OUT=/work/routing-results/out-2threads
SLUG=intel-r-xeon-r-processor
LOCK=/tmp/cpu-measure.lock
QUIET='/work/routing-results/wait_quiet.sh; '
for M in small-moe calibrate/results/intel-xeon/routing/olmoe-1b-7b-half; do
  B=$(basename $M)
  /usr/bin/time -f "calibrate uniform $M: %e s" flock $LOCK bash -c "$QUIET python -m autoexperts calibrate --model $M --device cpu --dtype float32 --out $OUT/$SLUG/profiles --no-progress" > /work/routing-results/calibrate-$B-uniform-2threads.txt
  for S in 1.0 1.5; do
    flock $LOCK bash -c "$QUIET python -m autoexperts bench --model $M --device cpu --dtype float32 --out $OUT --parts sweep --routing zipf:$S --no-progress"
  done
done
echo ALL DONE
