#!/bin/bash
# Routing measurements (issue 15): per shape, a uniform calibration, then bench --routing zipf:S (calibrates with it,
# sweeps on it, and reads the uniform profile's picks off the same timings); then the capture overhead.
# One torch thread: the 2-core machine is shared, and two processes with 2 spinning OpenMP threads each slow each
# other 10-100x; each command starts, under the lock, once the CPUs have been 85 % idle for 5 s.
set -x
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt-routing OMP_NUM_THREADS=1
cd /work/wt-routing
OUT=/work/routing-results/out
SLUG=intel-r-xeon-r-processor
LOCK=/tmp/cpu-measure.lock
QUIET='/work/routing-results/wait_quiet.sh; '
for M in small-moe calibrate/results/intel-xeon/routing/olmoe-1b-7b-half; do
  B=$(basename $M)
  /usr/bin/time -f "calibrate uniform $M: %e s" flock $LOCK bash -c "$QUIET python -m autoexperts calibrate --model $M --device cpu --dtype float32 --out $OUT/$SLUG/profiles --no-progress" > /work/routing-results/calibrate-$B-uniform.txt
  for S in 1.0 1.5; do
    flock $LOCK bash -c "$QUIET python -m autoexperts bench --model $M --device cpu --dtype float32 --out $OUT --parts sweep --routing zipf:$S --no-progress"
  done
done
flock $LOCK bash -c "$QUIET python calibrate/capture_overhead.py --model small-moe --tokens 1,16,128 --rounds 100 --out $OUT/capture-overhead.json" > /dev/null
echo ALL DONE
