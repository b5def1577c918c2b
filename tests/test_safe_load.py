"""rest_dense.safe_load (one checkpoint-reading policy for both adapters) and rest_dense.amp
(one AMP-availability decision), framework-free."""
import logging
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from rest_dense import amp, safe_load
from rest_dense.safe_load import UntrustedCheckpointError


@pytest.fixture(autouse=True)
def _fresh_trust():
    safe_load.forget_trusted()
    yield
    safe_load.forget_trusted()


class Stats:
    """A data holder whose statistics functions pickle as ``getattr(Stats, name)``, like
    mmengine's HistoryBuffer."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)
        self.methods = {"mean": Stats.mean}

    def mean(self):
        return float(self.values.mean())

    def secret(self):  # never on the allow-list
        return "no"


safe_load.register_safe_attributes(Stats, ["mean"])


class Note:
    """Not on any allow-list."""

    def __init__(self, text):
        self.text = text


class RunsCode:
    """Unpickling this runs ``open(path, 'w')``: creates a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class AsksForSecret:
    def __reduce__(self):
        return (getattr, (Stats, "secret"))


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_training_like_checkpoint_loads_without_trust(tmp_path):
    """Tensors, numpy scalars / arrays of number types and allow-listed classes with their
    registered statistics functions: no full unpickling, no trust needed."""
    path = _save(tmp_path / "ckpt.pth", {
        "state_dict": {"w": torch.ones(2)}, "seed": np.int64(3), "eta": np.float64(0.5),
        "hist": Stats([1.0, 2.0, 4.0]), "arr": np.arange(4, dtype=np.int32)})
    if "rest_dense.mm.safe_load" not in sys.modules:
        # (importing rest_dense.mm admits the allow-list process-wide: install_global_allow_list)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)  # torch's own allow-list is not enough
    ckpt = safe_load.load_checkpoint_file(path)
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    assert ckpt["seed"] == 3 and ckpt["eta"] == 0.5 and ckpt["arr"].tolist() == [0, 1, 2, 3]
    assert ckpt["hist"].methods["mean"] is Stats.mean and ckpt["hist"].mean() == pytest.approx(7 / 3)
    assert "builtins.getattr" in safe_load.safe_global_names()
    assert "numpy.ndarray" in safe_load.safe_global_names()


def test_code_in_an_untrusted_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    for name, obj, why in (("code.pth", RunsCode(str(marker)), "open"),
                           ("getattr.pth", AsksForSecret(), "secret"),
                           ("note.pth", Note("x"), "Note"),
                           ("objects.pth", np.array([Note("x")], dtype=object), "")):
        path = _save(tmp_path / name, {"x": obj})
        with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as info:
            safe_load.load_checkpoint_file(path)
        assert str(path) in str(info.value) and why in str(info.value)
    assert not marker.exists()


def test_trusted_paths_are_unpickled_in_full(tmp_path, caplog):
    own = tmp_path / "work"
    own.mkdir()
    path = _save(own / "epoch_1.pth", {"note": Note("mine")})
    sibling = _save(tmp_path / "work2.pth", {"note": Note("other")})
    assert safe_load.trust(own, None, "", "https://example.com/w.pth") == [os.path.realpath(own)]
    assert safe_load.is_trusted(path) and not safe_load.is_trusted(sibling)
    assert not safe_load.is_trusted(tmp_path / "workshop" / "x.pth")  # a prefix is not a parent
    with caplog.at_level(logging.WARNING, logger="rest_dense.safe_load"):
        assert safe_load.load_checkpoint_file(path)["note"].text == "mine"
    assert "full unpickling" in caplog.text
    with pytest.raises(UntrustedCheckpointError):
        safe_load.load_checkpoint_file(sibling)
    assert safe_load.load_checkpoint_file(sibling, trusted=True)["note"].text == "other"
    with pytest.raises(UntrustedCheckpointError):
        safe_load.load_checkpoint_file(path, trusted=False)  # an explicit no wins
    safe_load.forget_trusted(own)
    assert safe_load.trusted_paths() == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_load.load_checkpoint_file(tmp_path / "missing.pth")


def test_one_check_of_a_checkpoint_path_for_every_reader(tmp_path, monkeypatch):
    """safe_load.checkpoint_file is the check of the mm runner, detectron2's command line
    and MODEL.WEIGHTS alike: a folder is named as one (and is a FileNotFoundError to the
    handlers of missing files), ``~`` is expanded, URLs pass only where asked."""
    from rest_dense.d2.engine import check_weights_file
    from rest_dense.mm.runner import _check_local_file

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.pth").write_bytes(b"x")
    assert safe_load.checkpoint_file("~/w.pth") == str(tmp_path / "w.pth")
    assert safe_load.checkpoint_file("https://x/w.pth", urls=True) == "https://x/w.pth"
    with pytest.raises(FileNotFoundError, match="'https://x/w.pth' does not exist"):
        safe_load.checkpoint_file("https://x/w.pth")
    for check in (lambda p: safe_load.checkpoint_file(p, "MODEL.WEIGHTS", urls=True),
                  lambda p: check_weights_file(p, "MODEL.WEIGHTS"),
                  lambda p: _check_local_file(p, "MODEL.WEIGHTS")):
        with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS .* is a directory, not a file"):
            check(str(tmp_path))
        with pytest.raises(IsADirectoryError):
            check(str(tmp_path))
        with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS .*nope.pth' does not exist"):
            check("~/nope.pth")
        check("~/w.pth")
        check("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    with pytest.raises(FileNotFoundError, match="--resume without a value"):
        _check_local_file(str(tmp_path), "resume checkpoint")
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pkl' does not exist"):
        safe_load.load_pickle_file(tmp_path / "nope.pkl")


def test_plain_pickles_use_the_same_allow_list(tmp_path):
    good = tmp_path / "weights.pkl"
    with open(good, "wb") as f:
        pickle.dump({"blobs": {"conv.w": np.ones((2, 2), np.float32)}, "it": np.int64(5)}, f)
    data = safe_load.load_pickle_file(good)
    assert data["blobs"]["conv.w"].sum() == 4 and data["it"] == 5
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"x": RunsCode(str(marker))}, f)
    with pytest.raises(UntrustedCheckpointError, match="allow-list"):
        safe_load.load_pickle_file(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------- AMP
def test_amp_on_cpu_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(amp, "accelerator_available", lambda device_type: False)
    assert not amp.amp_supported() and not amp.amp_supported("cpu")
    with caplog.at_level(logging.WARNING, logger="rest_dense.amp"):
        assert amp.resolve_amp(True) is False
    assert "training in fp32" in caplog.text and "CUDA" in caplog.text
    assert amp.resolve_amp(False, "cuda") is False


def test_amp_follows_the_device(monkeypatch):
    monkeypatch.setattr(amp, "accelerator_available", lambda device_type: device_type == "cuda")
    assert amp.amp_supported() and amp.amp_supported("cuda:0")
    assert amp.amp_supported(torch.device("cuda", 1))
    assert not amp.amp_supported("cpu") and not amp.amp_supported("npu")
    assert amp.resolve_amp(True, "cuda") is True
    assert amp.resolve_amp(True, "mps") is False
    assert not amp.amp_supported("npu", backends=("cuda",))


def test_accelerator_available_matches_torch():
    assert amp.accelerator_available("cuda") == torch.cuda.is_available()
    assert amp.accelerator_available("no_such_device") is False


def test_mmengine_training_checkpoint_converts_in_a_fresh_process(tmp_path, subprocess_env):
    """A training checkpoint written by mmengine (HistoryBuffer statistics in its message
    hub) reaches load_checkpoint / `rest-dense convert` in a process that never imported
    rest_dense.mm or mmengine: read with the allow-list, nothing of it run."""
    import subprocess

    pytest.importorskip("mmengine")
    make = (
        "import torch; from mmengine.logging.history_buffer import HistoryBuffer\n"
        "from rest_dense.models import create_model\n"
        "h = HistoryBuffer(); h.update(1.0)\n"
        "sd = {'backbone.' + k: v for k, v in create_model('restv2_tiny').state_dict().items()}\n"
        f"torch.save({{'meta': {{'hub': {{'loss': h}}}}, 'state_dict': sd}}, {str(tmp_path / 'mm.pth')!r})\n")
    subprocess.run([sys.executable, "-c", make], check=True, env=subprocess_env, timeout=120)
    check = (
        "import sys; from rest_dense.models import create_model, load_checkpoint\n"
        f"load_checkpoint(create_model('restv2_tiny'), {str(tmp_path / 'mm.pth')!r})\n"
        "assert 'rest_dense.mm' not in sys.modules\n"
        "from rest_dense.cli import main\n"
        f"sys.exit(main(['convert', {str(tmp_path / 'mm.pth')!r}, {str(tmp_path / 'core.pth')!r}, '--to', 'core']))\n")
    r = subprocess.run([sys.executable, "-c", check], env=subprocess_env, timeout=180,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "core.pth").is_file()


def test_flipped_bytes_are_caught_by_the_archive_checksums(tmp_path):
    """torch.load does not check the CRC-32 of torch.save's archive entries: a block of
    bytes overwritten inside a tensor would load as other numbers. Every reader here
    refuses it, naming the entry; a file saved without checksums still loads."""
    from rest_dense.models import CheckpointFormatError

    sd = {"w": torch.randn(256, 256), "b": torch.arange(10.0)}
    good = tmp_path / "good.pth"
    torch.save({"state_dict": sd}, good)
    data = bytearray(good.read_bytes())
    start = data.index(sd["w"][100].numpy().tobytes())  # inside the tensor's bytes
    data[start:start + 64] = b"\xff" * 64
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    assert torch.equal(safe_load.load_checkpoint_file(good)["state_dict"]["w"], sd["w"])
    with pytest.raises(CheckpointFormatError, match="CRC-32"):
        safe_load.load_checkpoint_file(bad)
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: always writes the checksums
        config = None
    if config is not None and hasattr(config.save, "compute_crc32"):
        previous = config.save.compute_crc32
        config.save.compute_crc32 = False
        try:
            torch.save(sd, tmp_path / "no_crc.pth")
        finally:
            config.save.compute_crc32 = previous
        assert torch.equal(safe_load.load_checkpoint_file(tmp_path / "no_crc.pth")["b"], sd["b"])
