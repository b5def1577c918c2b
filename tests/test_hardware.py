"""rest_dense.hardware: the CPU facts behind the kernel rules."""
import pytest
import torch

from rest_dense import hardware

X86 = "processor\t: 0\nmodel name\t: {model}\nflags\t\t: fpu avx2 avx512f{extra}\n\nprocessor\t: 1\n"


def test_read_cpuinfo_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86.format(model="Xeon", extra=" amx_bf16") + "model name\t: Other\n")
    info = hardware.read_cpuinfo(str(path))
    assert info.model == "Xeon" and info.flags_key == "flags"
    assert {"avx2", "avx512f", "amx_bf16"} <= info.flags
    missing = hardware.read_cpuinfo(str(tmp_path / "missing"))
    assert missing == hardware.CpuInfo() and missing.flags_key is None


@pytest.mark.parametrize("extra,capability,expected", [
    (" avx512_bf16 amx_bf16 amx_tile", "AVX512", "amx"),  # torch says AVX512 on AMX CPUs
    (" avx512_bf16", "AVX512", "avx512"),                  # Zen 4
    ("", "AVX2", "other"),
    ("", "AMX", "amx"),
    # AMX flags but torch's kernels capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2): its
    # flash-attention kernel cannot pack for the tiles there
    (" avx512_bf16 amx_bf16", "AVX2", "other"),
    (" avx512_bf16 amx_bf16", "DEFAULT", "other"),
])
def test_detect_cpu_class(tmp_path, extra, capability, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(X86.format(model="x", extra=extra))
    assert hardware.detect_cpu_class(hardware.read_cpuinfo(str(path)), capability) == expected
    assert expected in hardware.CPU_CLASSES


def test_read_cpuinfo_binary_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_bytes(b"model name\t: \xff\xfeodd\nflags\t: avx2 amx_bf16\n")
    info = hardware.read_cpuinfo(str(path))
    assert "amx_bf16" in info.flags and "odd" in info.model


def test_cpu_class_of_this_machine_is_known():
    assert hardware.cpu_class() in hardware.CPU_CLASSES
    assert hardware.cpu_class() == hardware.detect_cpu_class()


def test_every_cpu_class_has_a_rule():
    """The kernel rules name every CPU class, for every mode / precision they key on."""
    from rest_dense.models import functional as fast

    for cpu in hardware.CPU_CLASSES:
        for mode in ("infer", "train"):
            small, large = fast.BF16_ATTENTION_RULE[(cpu, mode)]
            assert {small, large} <= set(fast.ATTENTION_IMPLS)
        for precision in ("fp32", "bf16", "fp16"):
            rule = fast.STRIDED_CONV_BACKWARD_RULE[(cpu, precision)]
            assert rule in fast.STRIDED_CONV_BACKWARD_IMPLS or isinstance(rule, int)
    assert {k[0] for k in fast.BF16_ATTENTION_RULE} == set(hardware.CPU_CLASSES)
    assert {k[0] for k in fast.STRIDED_CONV_BACKWARD_RULE} == set(hardware.CPU_CLASSES)
    assert set(fast.ATTENTION_CHUNK_ELEMENTS) == set(hardware.CPU_CLASSES)
    assert all(n >= 1 for n in fast.ATTENTION_CHUNK_ELEMENTS.values())
