"""CPU detection and the PALMCHAT_MAX_CPU_ISA cap (palmchat/utils/cpu.py): every CPU-dependent choice follows them.

Detection is read once per process and the kernels load at import, so what a cap changes is checked in a
subprocess started with the variable set."""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest

from palmchat.kernels.loader import load
from palmchat.utils import cpu

pytestmark = pytest.mark.kernels

# /proc/cpuinfo flags (abridged) of CPUs at each level
AVX_ONLY = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx aes"  # Sandy Bridge: below every level
AVX2_EPYC = AVX_ONLY + " fma f16c avx2 bmi1 bmi2 sha_ni"  # AMD EPYC Zen 2/3: no AVX-512 at all
SKYLAKE_SP = AVX2_EPYC + " avx512f avx512dq avx512cd avx512bw avx512vl"
ZEN4 = SKYLAKE_SP + " avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = ZEN4 + " avx512_fp16 amx_bf16 amx_tile amx_int8"
RANK = {cpu.BELOW_ALL_LEVELS: -1} | {level: i for i, level in enumerate(cpu.LEVELS)}


@pytest.fixture
def fresh_detection(monkeypatch):
    """Forget the cached level before and after the test, which sets its own flags and cap."""
    cpu.cpu_isa.cache_clear()
    monkeypatch.delenv(cpu.MAX_ISA_VARIABLE, raising=False)
    yield
    cpu.cpu_isa.cache_clear()


@pytest.mark.parametrize("flags, level", [
    pytest.param("", "baseline", id="no flags (not Linux)"),
    pytest.param(AVX_ONLY, "baseline", id="Sandy Bridge"),
    pytest.param(AVX2_EPYC, "avx2", id="EPYC Zen 3"),
    pytest.param(SKYLAKE_SP, "avx512", id="Skylake-SP"),
    pytest.param(ZEN4, "avx512_bf16", id="Zen 4"),
    pytest.param(SAPPHIRE_RAPIDS, "amx", id="Sapphire Rapids"),
    pytest.param(AVX2_EPYC + " avx512f avx512bw avx512vl", "avx2", id="AVX-512 without DQ"),  # oneDNN's bf16 needs DQ
    pytest.param(SKYLAKE_SP + " amx_bf16 amx_tile", "avx512", id="AMX without AVX512-BF16"),  # levels are cumulative
])
def test_the_level_is_the_highest_whose_flags_and_those_below_are_all_present(flags, level, monkeypatch,
                                                                              fresh_detection):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags.split()))
    assert cpu.detected_isa() == level
    assert cpu.cpu_isa() == level


@pytest.mark.parametrize("cap, level", [("avx2", "avx2"), ("avx512", "avx512"), ("AVX512_BF16", "avx512_bf16"),
                                        ("amx", "amx"), ("", "amx")])
def test_the_cap_lowers_the_level(cap, level, monkeypatch, fresh_detection):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS.split()))
    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, cap)
    assert cpu.cpu_isa() == level
    assert [cpu.cpu_supports(x) for x in cpu.LEVELS] == [RANK[x] <= RANK[level] for x in cpu.LEVELS]


def test_the_cap_never_raises_the_level_above_what_the_cpu_has(monkeypatch, fresh_detection):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(AVX2_EPYC.split()))
    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, "amx")
    assert cpu.cpu_isa() == "avx2" and not cpu.cpu_supports("avx512")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    cpu.cpu_isa.cache_clear()
    assert cpu.cpu_isa() == "baseline" and not cpu.cpu_supports("avx2")


def test_an_unknown_cap_is_a_one_line_error_naming_the_variable_and_the_levels(monkeypatch, fresh_detection):
    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, "avx512bf16")
    with pytest.raises(ValueError) as error:
        cpu.cpu_isa()
    message = str(error.value)
    assert "\n" not in message and "PALMCHAT_MAX_CPU_ISA='avx512bf16'" in message
    assert "avx2, avx512, avx512_bf16, amx" in message
    with pytest.raises(ValueError, match="unknown CPU level 'avx512bf16'"):
        cpu.cpu_supports("avx512bf16")


def test_an_unknown_cap_stops_a_process_at_import_with_that_message():
    result = subprocess.run([sys.executable, "-c", "import palmchat.model.transformer"], capture_output=True, text=True,
                            env={**os.environ, cpu.MAX_ISA_VARIABLE: "sse4"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ValueError: PALMCHAT_MAX_CPU_ISA='sse4' is not one of avx2, avx512, avx512_bf16, amx (lowest first), "
        "or unset for what the CPU has")


# What palmchat chooses, printed as JSON by a fresh process.
CHOICES = """
import json, torch
from palmchat.kernels.loader import load
from palmchat.utils import cpu
from palmchat.model.config import preset
from palmchat.kernels.cpu_linear import can_pack, decode_kernel_level
from palmchat.inference.engine import Engine
from palmchat.kernels import blocked_attention, cpu_attention
from palmchat.model.transformer import Transformer
from palmchat.utils.device import autocast_dtype, decode_dtype

model = Transformer(preset("tiny", vocab_size=97)).eval()
modules = {str(dtype): [type(m).__name__ for m in Engine(model, dtype=dtype).sync().modules()]
           for dtype in (torch.float32, torch.bfloat16)}
print(json.dumps({
    "level": cpu.cpu_isa(),
    "decode kernel": decode_kernel_level(),
    "attention_bf16.c": cpu_attention.KERNEL is not None,
    "attention_bf16.c on AMX": bool(cpu_attention.KERNEL and cpu_attention.KERNEL[1]),
    "attention_bf16.c in training": cpu_attention.ON_THIS_CPU,
    "SDPA in training": blocked_attention.SDPA_IS_FASTER_ON_THIS_CPU,
    "packs bf16": can_pack(torch.bfloat16),
    "packs fp32": can_pack(torch.float32),
    "autocast auto": str(autocast_dtype("auto", torch.device("cpu"))),
    "decode auto": str(decode_dtype("auto")),
    "fp32 copy packed": "PackedLinear" in modules["torch.float32"],
    "bf16 copy packed": "PackedLinear" in modules["torch.bfloat16"],
    "bf16 copy fused": "FusedBlock" in modules["torch.bfloat16"],
}))
"""


def choices_under(cap: str) -> dict:
    """palmchat's choices in a process capped at `cap`, with PyTorch's own ISA switches (`make test`'s second pass
    sets them) removed: the cap alone must decide. The decode kernel's line on stderr must come exactly once."""
    pytorch_switches = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
    env = {k: v for k, v in os.environ.items() if k not in pytorch_switches}
    result = subprocess.run([sys.executable, "-c", CHOICES], capture_output=True, text=True, check=True,
                            env={**env, cpu.MAX_ISA_VARIABLE: cap})
    said = [line for line in result.stderr.splitlines() if line.startswith("palmchat: bf16 decode kernel: ")]
    assert len(said) == 1, result.stderr
    return json.loads(result.stdout)


def built(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("cap", ["avx2", "avx512", "avx512_bf16"])
def test_under_a_cap_palmchat_takes_what_a_cpu_of_that_level_takes(cap):
    """The decode kernel of the highest level the CPU has (decode_bf16.c on AVX512-BF16, else decode_avx2.c);
    below AVX512-BF16 no bf16 training (autocast stays off: bf16 is emulated there) and no attention_bf16.c; below
    AVX-512 no bf16 weight packed by oneDNN (its reorder would raise on such a CPU), the bf16 copy packed and fused
    for the AVX2 kernel instead; below AMX the blocked kernel (or SDPA's fallback), never the AMX tiles. fp32
    packs everywhere."""
    level = min(cpu.detected_isa(), cap, key=RANK.get)
    has = {name: RANK[level] >= RANK[name] for name in cpu.LEVELS}
    got = choices_under(cap)
    assert got["level"] == level
    if has["avx512_bf16"] and built("palmchat.kernels._decode_bf16"):
        assert got["decode kernel"] == "avx512_bf16"
    else:
        assert got["decode kernel"] == ("avx2" if has["avx2"] and built("palmchat.kernels._decode_avx2") else None)
    assert got["attention_bf16.c"] == (has["avx512_bf16"] and built("palmchat.kernels._attention_bf16"))
    assert not got["attention_bf16.c on AMX"] and not got["attention_bf16.c in training"]
    assert not got["SDPA in training"]
    assert got["autocast auto"] == ("torch.bfloat16" if has["avx512_bf16"] else "None")
    # serving: bf16 wherever a decode kernel reads it (half the bytes per token of fp32), even without bf16 training
    assert got["decode auto"] == ("torch.bfloat16" if got["decode kernel"] else "torch.float32")
    assert got["packs fp32"] and got["fp32 copy packed"]
    if not has["avx512"]:
        assert got["packs bf16"] == (got["decode kernel"] is not None)
    assert got["bf16 copy packed"] == got["packs bf16"]
    assert got["bf16 copy fused"] == (got["decode kernel"] is not None and got["packs bf16"])


def test_the_avx2_cap_leaves_only_what_an_avx2_cpu_runs():
    """What `make test`'s second pass relies on: on any CPU with AVX2, the cap leaves the AVX2 decode kernel (the
    bf16 copy packed for it and fused) and the fallbacks of everything else; bf16 training stays off."""
    if cpu.detected_isa() == cpu.BELOW_ALL_LEVELS:
        pytest.skip("needs AVX2 (this CPU is below every level palmchat distinguishes)")
    if not built("palmchat.kernels._decode_avx2"):
        pytest.skip("decode_avx2.c was not built")
    assert choices_under("avx2") == {
        "level": "avx2", "decode kernel": "avx2", "attention_bf16.c": False, "attention_bf16.c on AMX": False,
        "attention_bf16.c in training": False, "SDPA in training": False, "packs bf16": True, "packs fp32": True,
        "autocast auto": "None", "decode auto": "torch.bfloat16", "fp32 copy packed": True, "bf16 copy packed": True,
        "bf16 copy fused": True}


def test_a_cpu_below_avx2_or_not_x86_gets_no_kernel_and_fp32(monkeypatch, fresh_detection):
    """ARM (Apple, Graviton) or a pre-AVX2 x86 CPU: palmchat detects no level, loads no C kernel, keeps bf16
    layers plain (PyTorch's own kernels) and serves and trains in fp32 by default."""
    import torch

    from palmchat.kernels import cpu_linear
    from palmchat.utils.device import autocast_dtype, decode_dtype

    def forget():
        cpu_linear.decode_kernel.cache_clear()
        cpu_linear.decode_kernel_level.cache_clear()

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(AVX_ONLY.split()))
    forget()
    try:
        assert cpu.cpu_isa() == "baseline"
        assert cpu_linear.decode_kernel_level() is None and cpu_linear.bf16_kernel() is None
        assert all(cpu_linear.decode_kernel(level) is None for level in cpu_linear.DECODE_KERNELS)
        assert not cpu_linear.can_pack(torch.bfloat16)
        assert decode_dtype("auto") == torch.float32 and autocast_dtype("auto", torch.device("cpu")) is None
    finally:
        forget()


@pytest.mark.parametrize("module, supported, level", [
    ("palmchat.kernels._decode_bf16", "palmchat_linear_bf16_supported", "avx512_bf16"),
    ("palmchat.kernels._decode_avx2", "palmchat_linear_bf16_supported", "avx2"),
    ("palmchat.kernels._attention_bf16", "palmchat_attention_bf16_supported", "avx512_bf16"),
])
def test_the_c_kernels_are_built_and_load_where_the_cpu_can_run_them(module, supported, level):
    source = module.rsplit(".", 1)[1].lstrip("_") + ".c"
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not cpu.cpu_supports(level):
        pytest.skip(f"needs {level} ({source}) on x86-64 Linux")
    assert built(module), f"{source} was not built: run `pip install -e .` with a C compiler"
    assert load(module, supported, level) is not None
