"""rest_dense.models.pretrained, the backbone weight loader: it never loads the wrong
weights silently.

One parametrised case per row. Every error case checks the exception type and that the
message names the problem (the variants, the key, or what the file is); every good case
checks the result.
"""
from __future__ import annotations

import gzip
import itertools
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from rest_dense.models import (CheckpointFormatError, CheckpointMismatchError,
                               CheckpointValueError, ResTv1, ResTv2, create_model,
                               list_models, load_checkpoint, read_state_dict)
from rest_dense.models.pretrained import checkpoint_file_kind, infer_arch

from conftest import TINY_ARCH, fixture_path

VARIANTS = list_models()
RELEASED_NAME = {n: n if n.startswith("restv2_") else n.replace("restv1_", "rest_") for n in VARIANTS}


# --------------------------------------------------------------------------- fixtures
class _Zoo:
    """Full-size models, built once per (variant, attn_mode) for the whole module."""

    def __init__(self):
        self._models = {}

    def __call__(self, name: str, attn_mode: str = "global"):
        key = (name, attn_mode)
        if key not in self._models:
            kw = {"attn_mode": attn_mode} if attn_mode != "global" else {}
            torch.manual_seed(0)
            self._models[key] = create_model(name, **kw).eval()
        return self._models[key]


@pytest.fixture(scope="module")
def zoo():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _Zoo()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def released_keys():
    return json.loads(fixture_path("official_imagenet_checkpoint_keys.json").read_text())


def _released_ckpt(keys: dict) -> dict:
    """A released ImageNet checkpoint's layout with zero tensors (stride-0: no memory)."""
    zero = torch.zeros(())
    return {"model": {k: (torch.zeros((), dtype=torch.int64) if k.endswith("num_batches_tracked")
                          else zero.expand(shape)) for k, shape in keys.items()}}


def _tiny(cls=ResTv2, arch=None, **kw):
    torch.manual_seed(0)
    return cls(arch=dict(arch or TINY_ARCH), **kw).eval()


# --------------------------------------------------------------------------- wrong variants
PAIRS = [(a, b) for a, b in itertools.permutations(VARIANTS, 2)]


@pytest.mark.parametrize("ckpt_name,model_name", PAIRS,
                         ids=[f"{a}-ckpt-into-{b}" for a, b in PAIRS])
def test_dense_checkpoint_of_another_variant_names_both(zoo, ckpt_name, model_name):
    """Every ordered pair of registered variants: deeper (all of the model's keys present),
    shallower, wider, other family — all refused, naming both variants."""
    source = zoo(ckpt_name).state_dict()
    model = zoo(model_name)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, {"model": source}, log=None)
    msg = str(info.value)
    assert f"holds {ckpt_name} " in msg and f"model is {model_name} " in msg, msg


SAME_FAMILY = [(a, b) for a, b in PAIRS if a.split("_")[0] == b.split("_")[0]]


@pytest.mark.parametrize("ckpt_name,model_name", SAME_FAMILY,
                         ids=[f"released-{a}-into-{b}" for a, b in SAME_FAMILY])
def test_released_imagenet_checkpoint_of_another_variant_names_both(zoo, released_keys,
                                                                     ckpt_name, model_name):
    ckpt = _released_ckpt(released_keys[RELEASED_NAME[ckpt_name]])
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(zoo(model_name), ckpt, log=None)
    msg = str(info.value)
    assert ckpt_name in msg and model_name in msg, msg


def test_deeper_checkpoint_with_every_model_key_is_refused(zoo):
    """restv2_small holds every key of restv2_tiny with the same shapes, plus stage3.6..11."""
    small, tiny = zoo("restv2_small").state_dict(), zoo("restv2_tiny")
    assert set(tiny.state_dict()) <= set(small)
    with pytest.raises(CheckpointMismatchError, match=r"not used by the model: stage3\.6\.") as info:
        load_checkpoint(tiny, small, log=None)
    assert "allow_partial=True" in str(info.value)


@pytest.mark.parametrize("name", VARIANTS, ids=[f"released-{n}" for n in VARIANTS])
def test_released_imagenet_checkpoint_loads_into_its_variant(zoo, released_keys, name):
    keys = released_keys[RELEASED_NAME[name]]
    model = zoo(name)
    report = load_checkpoint(model, _released_ckpt(keys), log=None)
    assert report.checkpoint_arch.startswith(name)
    assert set(report.loaded_keys) == set(keys) & set(model.state_dict())
    assert report.dropped_keys and all(k.startswith("head.") for k in report.dropped_keys)
    prefix = "norm_" if name.startswith("restv2") else ("norm1.", "norm2.", "norm3.")
    assert report.missing_keys and all(k.startswith(prefix) for k in report.missing_keys)
    expected_unused = ["norm.bias", "norm.weight"] if name.startswith("restv2") else []
    assert sorted(report.unexpected_keys) == expected_unused


@pytest.mark.parametrize("name", ["restv2_tiny", "restv2_small"])
def test_released_imagenet_checkpoint_loads_into_cwin_model(zoo, released_keys, name):
    model = zoo(name, "cwin")
    report = load_checkpoint(model, _released_ckpt(released_keys[name]), log=None)
    assert {k.split(".")[0] for k in report.missing_keys} == {
        "cwin_convs", "norm_1", "norm_2", "norm_3", "norm_4"}


# --------------------------------------------------------------------------- key-level cases
def _sd(**kw):
    return {k: v.clone() for k, v in _tiny(**kw).state_dict().items()}


def _with(sd, **changes):
    out = dict(sd)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


KEY_CASES = {
    "one-shape-differs": (
        lambda sd: _with(sd, **{"stage2.0.mlp.fc1.weight": torch.zeros(64, 32)}),
        {}, r"1 shape mismatches.*stage2\.0\.mlp\.fc1\.weight: checkpoint \(64, 32\) vs model \(128, 32\)"),
    "one-weight-missing": (
        lambda sd: _with(sd, **{"stage1.0.attn.q.weight": None}),
        {}, r"lacks 1 weights of ResTv2: stage1\.0\.attn\.q\.weight.*allow_partial=True"),
    "unknown-backbone-key": (
        lambda sd: _with(sd, **{"stage1.0.attn.extra.weight": torch.zeros(3)}),
        {}, r"1 backbone weights of the checkpoint are not used by the model: "
            r"stage1\.0\.attn\.extra\.weight"),
    "cwin-checkpoint-into-global-model": (
        lambda sd: _sd(attn_mode="cwin"),
        {}, r"trained with attn_mode='cwin'.*cwin_convs\.0\.weight"),
    "not-a-rest-state-dict": (
        lambda sd: {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)},
        {}, r"holds no ResT backbone.*only 0 of the model's"),
    "resnet-like-with-backbone-prefix": (
        lambda sd: {"backbone.conv1.weight": torch.zeros(3)},
        {}, r"no ResT backbone"),
    "strict-with-unused-classifier-norm": (
        lambda sd: _with(sd, **{"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128)}),
        {"strict": True}, r"strict loading failed.*norm\.weight"),
    "shape-mismatch-even-with-allow-partial": (
        lambda sd: _with(sd, **{"stem.proj.6.weight": torch.zeros(16, 16, 3, 3)}),
        {"allow_partial": True}, r"shape mismatches.*stem\.proj\.6\.weight"),
    "v1-checkpoint-into-v2": (
        lambda sd: _tiny(ResTv1).state_dict(),
        {}, r"holds an unregistered ResTv1 .* but the model is an unregistered ResTv2"),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_key_level_mismatch(case):
    make, kwargs, pattern = KEY_CASES[case]
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=pattern):
        load_checkpoint(model, make(_sd()), log=None, **kwargs)
    # nothing was loaded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


GOOD_CASES = {
    "deeper-with-allow-partial": (
        dict(arch=dict(TINY_ARCH, depths=(1, 1, 2, 1))), {},
        {"allow_partial": True}, dict(unexpected_prefix="stage3.1.", missing=0)),
    "shallower-with-allow-partial": (
        {}, dict(arch=dict(TINY_ARCH, depths=(1, 1, 2, 1))),
        {"allow_partial": True}, dict(missing_prefix="stage3.1.")),
    "dense-checkpoint-into-model-emitting-fewer-stages": (
        {}, dict(out_indices=(3, 1)), {}, dict(unexpected_prefix=("norm_1.", "norm_3."), missing=0)),
    "global-checkpoint-into-cwin-model": (
        {}, dict(attn_mode="cwin"), {}, dict(missing_prefix="cwin_convs.")),
    "half-precision-checkpoint": (
        {}, {}, {"half": True}, dict(missing=0)),
    # a file of parameters and statistics only: BatchNorm's step counters are no weights
    "without-num-batches-tracked": (
        {}, {}, {"no_counters": True}, dict(missing=0)),
    "d2-fpn-state-dict-bottom-up-prefix": (
        {}, {}, {"bottom_up": True}, dict(missing=0)),
    "nan-in-dropped-classifier-head": (
        {}, {}, {"nan_head": True}, dict(missing=0)),
}


@pytest.mark.parametrize("case", list(GOOD_CASES))
def test_key_level_accepted(case):
    src_kw, model_kw, opts, expect = GOOD_CASES[case]
    opts, src_kw, model_kw = dict(opts), dict(src_kw), dict(model_kw)
    source = _tiny(**src_kw).state_dict()
    torch.manual_seed(1)
    model = ResTv2(arch=dict(model_kw.pop("arch", TINY_ARCH)), **model_kw)
    if opts.pop("half", False):
        source = {k: v.half() if v.is_floating_point() else v for k, v in source.items()}
    if opts.pop("no_counters", False):
        source = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
        opts["strict"] = True
    if opts.pop("bottom_up", False):
        source = {**{"bottom_up." + k: v for k, v in source.items()},
                  "fpn_lateral2.weight": torch.zeros(8, 16, 1, 1)}
    if opts.pop("nan_head", False):
        source = {**source, "head.weight": torch.full((10, 128), float("nan"))}
    report = load_checkpoint(model, {"model": source}, log=None, **opts)
    own = model.state_dict()
    assert report.loaded_keys
    for k in report.loaded_keys:
        ref = source.get(k, source.get("bottom_up." + k))
        torch.testing.assert_close(own[k], ref.to(own[k].dtype), rtol=0, atol=0)
    if "missing" in expect:
        assert len(report.missing_keys) == expect["missing"], report.missing_keys
    if "missing_prefix" in expect:
        assert report.missing_keys and all(k.startswith(expect["missing_prefix"])
                                           for k in report.missing_keys)
    if "unexpected_prefix" in expect:
        assert report.unexpected_keys and all(k.startswith(expect["unexpected_prefix"])
                                              for k in report.unexpected_keys)


# --------------------------------------------------------------------------- bad values
def _poke(key, fn):
    def make(sd):
        out = dict(sd)
        out[key] = fn(out[key].clone())
        return out
    return make


def _set_first(value):
    def fn(t):
        t.view(-1)[0] = value
        return t
    return fn


VALUE_CASES = {
    "nan-weight": (_poke("stage2.0.attn.q.weight", _set_first(float("nan"))),
                   r"stage2\.0\.attn\.q\.weight \(1 NaN\)"),
    "inf-bias": (_poke("patch_3.proj.bias", _set_first(float("-inf"))),
                 r"patch_3\.proj\.bias \(1 inf\)"),
    "nan-bn-running-mean": (_poke("stem.proj.1.running_mean", _set_first(float("nan"))),
                            r"stem\.proj\.1\.running_mean \(1 NaN\)"),
    "inf-bn-running-var": (_poke("stem.proj.4.running_var", _set_first(float("inf"))),
                           r"stem\.proj\.4\.running_var \(1 inf\)"),
    "negative-bn-running-var": (_poke("stem.proj.4.running_var", _set_first(-1.0)),
                                r"running_var tensor\(s\) hold negative values: stem\.proj\.4\.running_var"),
    "int64-for-float-weight": (_poke("norm_2.weight", lambda t: t.long()),
                               r"not floating point.*norm_2\.weight \(int64, model float32\)"),
    "complex-for-float-weight": (_poke("norm_2.weight", lambda t: t.to(torch.complex64)),
                                 r"not floating point.*norm_2\.weight \(complex64, model float32\)"),
    "bool-for-float-weight": (_poke("norm_2.bias", lambda t: t > 0),
                              r"norm_2\.bias \(bool, model float32\)"),
    "meta-tensor": (_poke("stage4.0.mlp.fc2.bias", lambda t: torch.empty(t.shape, device="meta")),
                    r"no data \(meta device\): stage4\.0\.mlp\.fc2\.bias"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values_are_refused_with_key_names(case):
    make, pattern = VALUE_CASES[case]
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointValueError, match=pattern):
        load_checkpoint(model, make(_sd()), log=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- files
def _zip_bytes(tmp_path):
    p = tmp_path / "src.pth"
    torch.save({"model": _sd()}, p)
    return p.read_bytes()


def _legacy_bytes(tmp_path):
    p = tmp_path / "src_legacy.pth"
    torch.save({"model": _sd()}, p, _use_new_zipfile_serialization=False)
    return p.read_bytes()


def _safetensors_bytes(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in _sd().items()}, str(p))
    return p.read_bytes()


def _npz_bytes(tmp_path):
    p = tmp_path / "arr.npz"
    np.savez(p, a=np.zeros(3))
    return p.read_bytes()


def _other_zip_bytes(tmp_path):
    p = tmp_path / "other.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    return p.read_bytes()


def _saved(obj):
    def make(tmp_path):
        p = tmp_path / "obj.pth"
        torch.save(obj, p)
        return p.read_bytes()
    return make


# name -> (file name, bytes maker, expected kind or None, exception, message pattern)
FILE_CASES = {
    "empty": ("w.pth", lambda t: b"", "empty", CheckpointFormatError, r"w\.pth.*an empty file"),
    "text": ("w.pth", lambda t: b"these are not weights\n", "text", CheckpointFormatError,
             r"is a text file starting 'these are not weights'"),
    "json": ("w.pth", lambda t: b'{"model": {"stem.proj.0.weight": [1, 2]}}', "json",
             CheckpointFormatError, r"is a JSON file"),
    "html-error-page": ("w.pth", lambda t: b"<!DOCTYPE html><html><body>404</body></html>", "html",
                        CheckpointFormatError, r"is an HTML page \(a failed download\?\)"),
    "git-lfs-pointer": ("w.pth", lambda t: b"version https://git-lfs.github.com/spec/v1\n"
                        b"oid sha256:abc\nsize 123\n", "git-lfs-pointer", CheckpointFormatError,
                        r"Git LFS pointer.*git lfs pull"),
    "gzip": ("w.pth.gz", lambda t: gzip.compress(b"x" * 100), "gzip", CheckpointFormatError,
             r"gzip-compressed"),
    "random-binary": ("w.pth", lambda t: bytes([7, 200, 3, 9, 0, 1, 255, 254] * 8), "unknown",
                      CheckpointFormatError, r"not a checkpoint format.*first bytes 07 c8"),
    "truncated-zip-half": ("w.pth", lambda t: _zip_bytes(t)[: len(_zip_bytes(t)) // 2],
                           "truncated-zip", CheckpointFormatError, r"truncated or damaged zip"),
    "truncated-zip-last-bytes": ("w.pth", lambda t: _zip_bytes(t)[:-10], "truncated-zip",
                                 CheckpointFormatError, r"truncated or damaged zip"),
    "truncated-legacy-torch": ("w.pth", lambda t: _legacy_bytes(t)[:-100], "torch-legacy",
                               CheckpointFormatError, r"legacy.*cannot read \(damaged or truncated\?\)"),
    "truncated-safetensors": ("w.safetensors", lambda t: _safetensors_bytes(t)[:-100],
                              "safetensors", CheckpointFormatError,
                              r"safetensors file that cannot be read \(damaged or truncated\?\)"),
    "safetensors-header-cut": ("w.safetensors", lambda t: _safetensors_bytes(t)[:40],
                               "truncated-safetensors", CheckpointFormatError,
                               r"truncated safetensors file"),
    "safetensors-named-pth": ("w.pth", _safetensors_bytes, "safetensors", CheckpointFormatError,
                              r"is a safetensors file but its name does not end in '\.safetensors'"),
    "torch-zip-named-safetensors": ("w.safetensors", _zip_bytes, "torch-zip", CheckpointFormatError,
                                    r"torch\.save checkpoint \(zip archive\), although it is named "
                                    r"\.safetensors"),
    "numpy-npz": ("w.npz", _npz_bytes, "zip", CheckpointFormatError, r"not a torch\.save checkpoint"),
    "other-zip": ("w.zip", _other_zip_bytes, "zip", CheckpointFormatError,
                  r"zip archive that is not a torch\.save checkpoint"),
    # a plain pickle is read (detectron2's .pkl), with the allow-list: this one holds none
    "plain-pickle": ("w.pkl", lambda t: pickle.dumps({"a": [1, 2]}, protocol=4), "pickle",
                     CheckpointFormatError, r"holds no tensors"),
    "saved-list": ("w.pth", _saved([torch.zeros(2)]), "torch-zip", CheckpointFormatError,
                   r"holds a list, not a state dict"),
    "saved-tensor": ("w.pth", _saved(torch.zeros(2)), "torch-zip", CheckpointFormatError,
                     r"holds a Tensor, not a state dict"),
    "saved-dict-without-tensors": ("w.pth", _saved({"epoch": 3, "meta": {"a": 1}}), "torch-zip",
                                   CheckpointFormatError, r"holds no tensors \(top-level entries: "
                                                          r"epoch, meta\)"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_unreadable_files_say_what_they_are(tmp_path, case):
    name, make, kind, exc, pattern = FILE_CASES[case]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    assert checkpoint_file_kind(path) == kind
    with pytest.raises(exc, match=pattern) as info:
        load_checkpoint(_tiny(), str(path), log=None)
    assert name in str(info.value)


GOOD_FILES = {
    "torch-zip": ("w.pth", _zip_bytes),
    "torch-legacy": ("w.pt", _legacy_bytes),
    "safetensors": ("w.safetensors", _safetensors_bytes),
    "zip-with-odd-extension": ("w.bin", _zip_bytes),
}


@pytest.mark.parametrize("case", list(GOOD_FILES))
def test_readable_files_load(tmp_path, case):
    name, make = GOOD_FILES[case]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    model = ResTv2(arch=dict(TINY_ARCH))
    report = load_checkpoint(model, path, log=None)
    expected = _sd()
    assert sorted(report.loaded_keys) == sorted(expected) and not report.missing_keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_missing_file_is_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nope" / "restv2_tiny.pth"
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope/restv2_tiny\.pth.* does not exist"):
        load_checkpoint(_tiny(), path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_state_dict(tmp_path)


def test_source_of_wrong_type():
    with pytest.raises(TypeError, match="file path or a state dict.*int"):
        read_state_dict(42)


def test_weights_only_stays_the_default(tmp_path):
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"model": _sd(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(_tiny(), path, log=None)
    assert load_checkpoint(_tiny(), path, weights_only=False, log=None).loaded_keys


def test_infer_arch_names_registered_and_unregistered(zoo):
    assert infer_arch(zoo("restv1_large").state_dict()).name == "restv1_large"
    guess = infer_arch(_sd())
    assert guess.name is None and guess.family == "restv2"
    assert guess.embed_dims == TINY_ARCH["embed_dims"] and guess.depths == (1, 1, 1, 1)
    assert guess.sr_ratios == TINY_ARCH["sr_ratios"]


def test_whole_model_checkpoint_values_are_checked_beyond_the_backbone():
    """A detector's checkpoint with NaN in a head (or a negative BatchNorm variance in the
    neck) is refused naming the entry, as the backbone's own entries are; evaluation or
    inference would otherwise run to "complete" on nothing."""
    from rest_dense.models import check_model_checkpoint

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResTv2(arch=TINY_ARCH)
            self.neck = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

    model = Detector()
    good = model.state_dict()
    assert check_model_checkpoint(model, good, complete=True).matched
    for key, value, named in (("head.weight", float("nan"), r"head\.weight \(12 NaN\)"),
                              ("neck.running_var", -1.0, r"running_var.*negative|negative.*neck")):
        bad = {k: v.clone() for k, v in good.items()}
        bad[key].fill_(value)
        with pytest.raises(CheckpointValueError, match=f"outside the backbone.*({named})"):
            check_model_checkpoint(model, bad, complete=True)


def test_init_weights_resets_batchnorm_statistics():
    """Re-initialising a trained (or loaded) model gives a new model's BatchNorm state, also
    after conversion to SyncBatchNorm."""
    fresh = ResTv2(arch=dict(TINY_ARCH)).state_dict()
    for sync in (False, True):
        model = ResTv2(arch=dict(TINY_ARCH)).train()
        if sync:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model.eval()  # SyncBatchNorm trains only in a process group: set the stats by hand
            for m in model.modules():
                if isinstance(m, nn.SyncBatchNorm):
                    m.running_mean.add_(1.0)
                    m.num_batches_tracked.add_(3)
        else:
            model(torch.randn(2, 3, 32, 32))
        stats = [k for k in fresh if "running_" in k or "num_batches" in k]
        assert stats and any(not torch.equal(model.state_dict()[k], fresh[k]) for k in stats)
        model.init_weights()
        own = model.state_dict()
        for k in stats:
            assert torch.equal(own[k], fresh[k]), (sync, k)
