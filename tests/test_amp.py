"""rest_dense.amp: which CPUs compute bf16 natively, and the one warning where they do not."""
import logging

import pytest
import torch

from rest_dense import amp

X86_FLAGS = "flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512bw avx512vl{}\n"
ARM_FEATURES = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics{}\n"


@pytest.fixture
def capability(monkeypatch):
    """Pretend torch's CPU capability (it is the second witness of native bf16)."""
    def set_capability(name):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: name)
    set_capability("AVX2")
    return set_capability


@pytest.mark.parametrize("text,expected", [
    ("processor\t: 0\n" + X86_FLAGS.format(" avx512_bf16"), True),
    (X86_FLAGS.format(" amx_tile amx_bf16"), True),
    (X86_FLAGS.format(""), False),
    # Arm: the BF16 extension in the Features line (Neoverse V1 has it, N1 does not)
    ("processor\t: 0\nBogoMIPS\t: 50.00\n" + ARM_FEATURES.format(" i8mm bf16 dcpodp"), True),
    (ARM_FEATURES.format(" asimdhp cpuid"), False),
    ("processor\t: 0\ncpu\t\t: POWER9\n", None),  # no line that tells
])
def test_cpu_has_native_bf16_reads_the_cpus_flags(tmp_path, capability, text, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert amp.cpu_has_native_bf16(str(info)) is expected


def test_cpu_has_native_bf16_without_cpuinfo(tmp_path, capability):
    assert amp.cpu_has_native_bf16(str(tmp_path / "missing")) is None
    capability("AMX")  # torch dispatches AMX kernels: native whatever the file says
    assert amp.cpu_has_native_bf16(str(tmp_path / "missing")) is True


@pytest.fixture
def emulated_bf16(monkeypatch):
    """A CPU without native bf16, and a process that has not warned yet."""
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda *a, **k: False)
    monkeypatch.setattr(amp, "_WARNED_BF16", [])


def test_emulated_bf16_warns_once_with_the_measured_cost(emulated_bf16, caplog):
    log = logging.getLogger("test_amp")
    with caplog.at_level(logging.WARNING, logger="test_amp"):
        assert amp.warn_if_bf16_emulated("cpu", log) is True
        assert amp.warn_if_bf16_emulated("cpu", log) is True
        assert amp.warn_if_bf16_emulated("cuda", log) is False  # only the CPU emulates
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "emulated" in messages[0] and "slower than fp32" in messages[0]


def test_native_bf16_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda *a, **k: True)
    monkeypatch.setattr(amp, "_WARNED_BF16", [])
    with caplog.at_level(logging.WARNING):
        assert amp.warn_if_bf16_emulated("cpu") is False
    assert not caplog.records and not amp._WARNED_BF16


def test_reading_a_bf16_config_does_not_warn(emulated_bf16, caplog):
    """resolve_amp decides a config's precision, for evaluation too: no training, no
    warning (the trainers warn when bf16 training starts)."""
    with caplog.at_level(logging.WARNING):
        assert amp.resolve_amp(True, "cpu", precision="bf16") is True
    assert not caplog.records and not amp._WARNED_BF16
