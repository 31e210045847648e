#!/bin/bash
# usage: rm.sh SEED TAG [reward args...]  -> runs/rmexp/s$SEED_$TAG/reward
cd "$(dirname "$0")/../.."
seed=$1; tag=$2; shift 2
run=runs/bench_alignment/seed$seed; d=runs/rmexp/s${seed}_$tag
mkdir -p $d
OMP_NUM_THREADS=1 /usr/bin/time -f "%e s" .venv/bin/palmchat reward $run/sft --data $run/data/rankings.jsonl --out $d/reward --seed $seed "$@" > $d/reward.log 2>&1
grep "held-out pairwise" $d/reward.log | sed "s|^|$tag seed$seed: |" >> runs/rmexp/rm_acc.txt
