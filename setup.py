"""palmchat's optional C files of kernels; everything else is in pyproject.toml.

- palmchat/kernels/decode_bf16.c: bf16 decode steps on AVX512-BF16 (without it oneDNN serves every linear layer);
- palmchat/kernels/decode_avx2.c: the same decode steps on AVX2 + FMA (both share decode_block.h);
- palmchat/kernels/attention_bf16.c: causal attention for bf16 training on AMX (without it SDPA or the blocked kernel).
They are built where they can run (Linux on x86-64) and are optional: without a C compiler the install goes on.
On other machines (ARM: Apple, Graviton) none is built, and PyTorch's own kernels serve every path."""

import platform
import sys

from setuptools import Extension, setup

kernels = []
if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    for name, source in [("palmchat.kernels._decode_bf16", "palmchat/kernels/decode_bf16.c"),
                         ("palmchat.kernels._decode_avx2", "palmchat/kernels/decode_avx2.c"),
                         ("palmchat.kernels._attention_bf16", "palmchat/kernels/attention_bf16.c")]:
        kernels.append(Extension(name, [source], depends=["palmchat/kernels/decode_block.h"],
                                 extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"],
                                 optional=True))

setup(ext_modules=kernels)
