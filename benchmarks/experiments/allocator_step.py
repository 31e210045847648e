"""Training step times of ours (compiled) and the reference's flash path in one process, with glibc's default
allocator or with glibc keeping freed memory (no fresh mmap, and so no page faults, for buffers above 32 MB).

The setting is process-wide, so compare separate runs, alternating (benchmarks/README.md, session 9):

    for m in default keep default keep; do .venv/bin/python benchmarks/experiments/allocator_step.py enwik8 $m; done
"""

import ctypes
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

shape, mode = sys.argv[1], sys.argv[2]
if mode == "keep":
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    assert libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1

sys.path.insert(0, str(Path(__file__).parent.parent))
import bench_foundation as bench  # noqa: E402

from palmchat.model.palm import PaLM  # noqa: E402

config = bench.SHAPES[shape]
data = torch.randint(1, config.vocab_size, (bench.BATCH, bench.SEQ + 1))


def ours_loss(model):
    logits = model(data[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten())


torch.manual_seed(0)
sides = {"ours bf16 compiled": bench.train_step(torch.compile(PaLM(config)), ours_loss, True),
         "ref bf16 flash": bench.train_step(bench.reference(config, flash=True), lambda m: m(data, return_loss=True), True)}
for step in sides.values():
    step(), step()  # warm-up (and compilation)
times = {name: [] for name in sides}
for _ in range(6):
    for name, step in sides.items():
        times[name].append(bench.timed(step))
medians = {name: statistics.median(t) for name, t in times.items()}
print(mode, {name: round(t, 3) for name, t in medians.items()},
      f"ratio {medians['ref bf16 flash'] / medians['ours bf16 compiled']:.2f}x")
