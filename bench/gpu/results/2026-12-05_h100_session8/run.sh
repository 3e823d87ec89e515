#!/bin/bash
# The parts of the session-8 device call kept here (H100, bundle 5b9f77f): the service suite and
# the two-pass mass kernel at 32k and 128k. The same call's serving benchmark wrote more files
# than a call brings back, and none of them returned.
set -u
O=${OUT:?}; R=$PWD/.gpu/bundle/run
OUT=$O/gpu-out scripts/gpu.sh run service > $O/service.txt 2>&1
for n in 32768 131072; do
  $R anchor_mass_bench --backend=cuda --n=$n --seeds=0 --thetas=12 --targets=0.95 \
    --groups=128:16,128:4 --repeats=2 > $O/mass_${n}_R.txt 2>&1
done
