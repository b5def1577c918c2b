"""rest_dense.hardware: the CPU facts behind the kernel rules."""
import pytest
import torch

from rest_dense import hardware

X86 = "processor\t: 0\nmodel name\t: {model}\nflags\t\t: fpu avx2 avx512f{extra}\n\nprocessor\t: 1\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the class rule at a written /proc/cpuinfo and a given torch capability."""
    def set_cpu(text, capability="AVX512"):
        path = tmp_path / f"cpuinfo{len(list(tmp_path.iterdir()))}"
        path.write_text(text)
        real = hardware.read_cpuinfo
        monkeypatch.setattr(hardware, "read_cpuinfo", lambda p=None: real(str(path)))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        hardware.cpu_class.cache_clear()
        return path
    yield set_cpu
    hardware.cpu_class.cache_clear()


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
])
def test_cpu_class(cpuinfo, extra, capability, expected):
    cpuinfo(X86.format(model="x", extra=extra), capability)
    assert hardware.cpu_class() == expected
    assert expected in hardware.CPU_CLASSES


def test_cpu_class_of_this_machine_is_known():
    assert hardware.cpu_class() in hardware.CPU_CLASSES
    flags = hardware.read_cpuinfo().flags
    if "amx_bf16" in flags:
        assert hardware.cpu_class() == "amx"


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
