#!/bin/bash
# usage: ppo.sh SEED RMTAG PPOTAG [ppo args...]  (RM from runs/rmexp/s$SEED_$RMTAG/reward, or RMTAG=bench)
cd "$(dirname "$0")/../.."
seed=$1; rmtag=$2; tag=$3; shift 3
run=runs/bench_alignment/seed$seed
if [ "$rmtag" = bench ]; then rm=$run/reward; else rm=runs/rmexp/s${seed}_$rmtag/reward; fi
d=runs/rmexp/s${seed}_${rmtag}_$tag; mkdir -p $d
OMP_NUM_THREADS=1 /usr/bin/time -f "%e s" .venv/bin/palmchat ppo $run/sft --reward $rm --prompts $run/data/prompts_train.jsonl --out $d/ppo --seed $seed "$@" > $d/ppo.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/evalppo.py $seed ${rmtag}_$tag $d/ppo >> $d/ppo.log 2>&1
tail -1 $d/ppo.log
