#!/bin/bash
# usage: onpol.sh SEED TAG N K [ppo args...]: on-policy rankings + RM (3 ep, standardized) + PPO (kl 0.4, 60 it) + eval
cd "$(dirname "$0")/../.."
seed=$1; tag=$2; n=$3; k=$4; shift 4
run=runs/bench_alignment/seed$seed; d=runs/rmexp/s${seed}_$tag
mkdir -p $d
[ -f $d/rankings.jsonl ] || .venv/bin/python benchmarks/experiments/onpolicy.py $seed $n $k $d > $d/onpol.log 2>&1
[ -n "$SRC" ] && cp runs/rmexp/$SRC/rankings.jsonl $d/; .venv/bin/palmchat reward $run/sft --data $d/rankings.jsonl --out $d/reward --seed $seed --epochs 3 --normalize standardize $RMARGS 2>&1 | grep -v "it/s\]" > $d/reward.log
grep "held-out pairwise" $d/reward.log | sed "s|^|$tag seed$seed: |" >> runs/rmexp/rm_acc.txt
.venv/bin/palmchat ppo $run/sft --reward $d/reward --prompts $run/data/prompts_train.jsonl --out $d/ppo --seed $seed --kl-coef 0.4 --iterations 60 "$@" 2>&1 | grep -v "it/s\]" > $d/ppo.log
.venv/bin/python benchmarks/experiments/evalppo.py $seed ${tag} $d/ppo >> $d/ppo.log 2>&1
tail -1 $d/ppo.log
