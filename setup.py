"""palmchat's one optional C file of kernels (palmchat/inference/decode_bf16.c); everything else is in pyproject.toml.

It is built where it can run (Linux on x86-64) and is optional: without a C compiler the install goes on without
it, and oneDNN serves every linear layer."""

import platform
import sys

from setuptools import Extension, setup

kernels = []
if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    kernels.append(Extension("palmchat.inference._decode_bf16", ["palmchat/inference/decode_bf16.c"],
                             extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"], optional=True))

setup(ext_modules=kernels)
