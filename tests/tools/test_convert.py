"""Checkpoint conversion (rest_dense.convert, ``rest-dense convert``) between the released,
MMDetection/MMSegmentation, detectron2 and core layouts."""
import hashlib
import json
import os

import pytest
import torch

from conftest import fixture_path

from rest_dense.cli import main
from rest_dense.convert import convert_checkpoint, infer_model_name
from rest_dense.models import CheckpointMismatchError, canonical_name, create_model, read_state_dict


@pytest.fixture(scope="module")
def imagenet_ckpt(tmp_path_factory):
    """A released-layout ImageNet checkpoint of ResTv2-T (random fp16 values; every key and
    shape of the authors' file, head and final norm included)."""
    shapes = json.loads(fixture_path("official_imagenet_checkpoint_keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=gen).half() for k, s in shapes["restv2_tiny"].items()}
    for k in sd:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(3)
        elif k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    path = tmp_path_factory.mktemp("ckpt") / "restv2_tiny_224.pth"
    torch.save({"model": sd}, path)
    return path, sd


def _released_shapes(name):
    """Empty tensors with every key and shape of a released ImageNet checkpoint."""
    shapes = json.loads(fixture_path("official_imagenet_checkpoint_keys.json").read_text())
    return {k: torch.empty(s) for k, s in shapes[name].items()}


def _cli(argv, capsys):
    rc = main(["convert", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _leftovers(folder):
    """Hidden temporary files a conversion might have left."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_cli_round_trip_imagenet_mmdet_d2_core(imagenet_ckpt, tmp_path, capsys):
    src, sd = imagenet_ckpt
    mm, d2, core = tmp_path / "mm.pth", tmp_path / "d2.safetensors", tmp_path / "core.pth"
    rc, out, _ = _cli([src, mm, "--to", "mmdet"], capsys)
    assert rc == 0
    assert "model: restv2_tiny" in out and "270 tensors written" in out
    assert "head.weight" in out and "norm_1.weight" in out  # dropped / dense-only listed
    assert f"sha256: {hashlib.sha256(mm.read_bytes()).hexdigest()}" in out
    assert _cli([mm, d2, "--to", "d2"], capsys)[0] == 0
    assert _cli([d2, core, "--to", "core"], capsys)[0] == 0

    expected = {k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))}
    mm_sd = torch.load(mm, weights_only=True)
    assert set(mm_sd) == {"backbone." + k for k in expected}
    from safetensors.torch import load_file

    d2_sd = load_file(str(d2))
    assert set(d2_sd) == {"backbone.bottom_up." + k for k in expected}
    core_sd = torch.load(core, weights_only=True)
    assert set(core_sd) == set(expected)
    for k, v in expected.items():
        for got in (mm_sd["backbone." + k], d2_sd["backbone.bottom_up." + k], core_sd[k]):
            assert got.dtype == v.dtype and torch.equal(got, v), k
    assert not _leftovers(tmp_path)
    # every output has the mode of a newly created file (safetensors creates its file 0600)
    mask = os.umask(0)
    os.umask(mask)
    for path in (mm, d2, core):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, (path, oct(os.stat(path).st_mode))


def test_dense_cwin_checkpoint_uses_released_d2_norm_spelling(tmp_path):
    model = create_model("restv2_tiny", attn_mode="cwin")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    d2 = tmp_path / "d2.pth"
    res = convert_checkpoint(dense, d2, to="d2")
    assert (res.model, res.attn_mode, res.layout) == ("restv2_tiny", "cwin", "d2")
    assert res.num_tensors == len(dense) and not res.missing_dense_only and not res.dropped
    assert res.sha256 == hashlib.sha256(d2.read_bytes()).hexdigest()
    d2_sd = torch.load(d2, weights_only=True)
    assert "backbone.bottom_up.norm_1.0.weight" in d2_sd
    assert "backbone.bottom_up.cwin_convs.0.weight" in d2_sd
    assert not any(".norm_1.weight" in k for k in d2_sd)
    # and on to the mmseg layout (safetensors), bit-identical to the model's own tensors
    mmseg = tmp_path / "seg.safetensors"
    res = convert_checkpoint(str(d2), str(mmseg), to="mmseg", model="restv2_tiny")
    assert res.attn_mode == "cwin"
    back = read_state_dict(str(mmseg))
    assert set(back) == {"backbone." + k for k in dense}
    assert all(torch.equal(back["backbone." + k], v) for k, v in dense.items())


def test_wrong_arch_refused_and_nothing_written(imagenet_ckpt, tmp_path, capsys):
    src, _ = imagenet_ckpt
    with pytest.raises(CheckpointMismatchError, match="restv2_small"):
        convert_checkpoint(src, tmp_path / "x.pth", to="core", model="restv2_small")
    with pytest.raises(CheckpointMismatchError, match="shape"):
        convert_checkpoint(src, tmp_path / "x.pth", to="core", model="restv2_large")
    assert not (tmp_path / "x.pth").exists() and not _leftovers(tmp_path)
    # through the CLI: exit status 1, the reason on stderr, an existing file left alone
    (tmp_path / "old.pth").write_bytes(b"previous")
    rc, _, err = _cli([src, tmp_path / "old.pth", "--to", "mmdet", "--model", "rest_lite"], capsys)
    assert rc == 1 and "not written" in err and "restv1_lite" in err
    assert (tmp_path / "old.pth").read_bytes() == b"previous" and not _leftovers(tmp_path)


def test_deeper_checkpoint_is_not_cut_down_to_a_shallower_variant(tmp_path, capsys):
    """ResTv2-S has ResTv2-T's widths and six more stage-3 blocks: converting it with
    --model restv2_tiny would silently drop real backbone blocks (and then load cleanly)."""
    torch.manual_seed(0)
    src = tmp_path / "small.pth"
    torch.save(create_model("restv2_small").state_dict(), src)
    with pytest.raises(CheckpointMismatchError, match="wrong variant"):
        convert_checkpoint(src, tmp_path / "x.pth", to="core", model="restv2_tiny")
    rc, _, err = _cli([src, tmp_path / "x.pth", "--to", "d2", "--model", "restv2_tiny"], capsys)
    assert rc == 1 and "stage3.6" in err and "not written" in err
    assert sorted(os.listdir(tmp_path)) == ["small.pth"]
    # its own variant converts, and twice the same bytes (no temporary name inside the file)
    a = convert_checkpoint(src, tmp_path / "a.pth", to="mmdet")
    b = convert_checkpoint(src, tmp_path / "b.pth", to="mmdet")
    assert a.model == "restv2_small" and a.sha256 == b.sha256
    # safetensors too (the library writes its metadata in hash order; the header is sorted)
    c = convert_checkpoint(src, tmp_path / "c.safetensors", to="core")
    d = convert_checkpoint(src, tmp_path / "d.safetensors", to="core")
    assert c.sha256 == d.sha256
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "layout": "core", "model": "restv2_small"}
    assert read_state_dict(tmp_path / "c.safetensors").keys() == create_model(
        "restv2_small").state_dict().keys()


def test_failed_bit_check_leaves_no_file(imagenet_ckpt, tmp_path, monkeypatch):
    """A writer that corrupts one tensor: the read-back comparison fails, no file remains."""
    import rest_dense.convert as conv

    real_save = conv.save_state_dict

    def corrupting_save(sd, path, metadata=None):
        sd = dict(sd)
        key = next(k for k in sd if k.endswith("attn.q.weight"))
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] += 1
        real_save(sd, path, metadata)

    monkeypatch.setattr(conv, "save_state_dict", corrupting_save)
    src, _ = imagenet_ckpt
    dst = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointMismatchError, match="differs from the source"):
        convert_checkpoint(src, dst, to="mmseg")
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_bad_input_is_named(imagenet_ckpt, tmp_path):
    src, _ = imagenet_ckpt
    with pytest.raises(ValueError, match="unknown layout"):
        convert_checkpoint(src, tmp_path / "x.pth", to="detectron")
    with pytest.raises(ValueError, match="unknown model"):
        convert_checkpoint(src, tmp_path / "x.pth", to="core", model="restv3_tiny")
    with pytest.raises(ValueError, match="same file"):
        convert_checkpoint(src, src, to="core")
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "x.pth")
    with pytest.raises(CheckpointMismatchError, match="not a ResT backbone"):
        infer_model_name({"conv1.weight": torch.zeros(8, 3, 3, 3)})
    shallower = {k: v for k, v in _released_shapes("restv2_tiny").items()
                 if not k.startswith("stage3.5.")}  # 5 blocks in stage 3: no such variant
    with pytest.raises(CheckpointMismatchError, match="no registered variant"):
        infer_model_name(shallower)
    assert not (tmp_path / "x.pth").exists()


def test_output_loads_through_mm_init_cfg(imagenet_ckpt, tmp_path):
    from rest_dense.mm.backbones import load_pretrained_cfg

    src, sd = imagenet_ckpt
    mm = tmp_path / "mm.safetensors"
    convert_checkpoint(src, mm, to="mmdet")
    model = create_model("restv2_tiny")
    report = load_pretrained_cfg(model, dict(type="Pretrained", checkpoint=str(mm)))
    assert sorted(report.missing_keys) == sorted(f"norm_{i}.{p}" for i in range(1, 5)
                                                 for p in ("weight", "bias"))
    assert torch.equal(model.stage3[0].attn.q.weight, sd["stage3.0.attn.q.weight"].float())


def test_infer_model_name_covers_every_released_variant():
    names = list(json.loads(fixture_path("official_imagenet_checkpoint_keys.json").read_text()))
    assert len(names) == 8
    for name in names:
        sd = _released_shapes(name)
        assert infer_model_name(sd) == canonical_name(name), name
        # the same tensors in the detectron2 wrapping
        wrapped = {"model": {"backbone.bottom_up." + k: v for k, v in sd.items()}}
        assert infer_model_name(wrapped) == canonical_name(name), name



def test_detectron2_model_zoo_pickle_converts(tmp_path, capsys):
    """A detectron2 .pkl (numpy arrays in a dict, as the model zoo ships) converts like a
    .pth, 0-d entries included; a pickle that would run code is refused, nothing run."""
    import pickle

    model = create_model("restv2_tiny")
    sd = {"backbone.bottom_up." + k: v.numpy() for k, v in model.state_dict().items()}
    src = tmp_path / "zoo.pkl"
    with open(src, "wb") as f:
        pickle.dump({"model": sd, "__author__": "someone"}, f)
    out = tmp_path / "core.pth"
    assert main(["convert", str(src), str(out), "--to", "core"]) == 0
    got = read_state_dict(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "evil.pkl"), str(tmp_path / "e.pth"),
                 "--to", "core"]) != 0
    assert "allow-list" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "e.pth").exists()
