"""Every shipped MMDetection / MMSegmentation config parses, follows the papers' recipes
and builds its model; full-size parameter counts match the authors' models."""
import re

import pytest
from mmengine.config import Config

from rest_dense.mm import MMResTv1, MMResTv2
from rest_dense.mm.utils import count_parameters, detect_framework

from _mm_utils import CONFIG_DIR, build, load, model_cfg, shipped_configs, shrink

from conftest import without_logging_errors

CONFIGS = shipped_configs()
IDS = [str(p.relative_to(CONFIG_DIR)) for p in CONFIGS]
VARIANT = {"t": ("tiny", 0.1), "s": ("small", 0.2), "b": ("base", 0.3)}
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def test_every_family_is_shipped():
    names = {p.name for p in CONFIGS}
    for v in "tsb":
        for sched in ("1x", "3x"):
            assert f"mask-rcnn_restv2-{v}_fpn_amp-ms-{sched}_coco.py" in names
        assert f"upernet_restv2-{v}_8xb2-160k_ade20k-512x512.py" in names
        assert f"upernet_restv2-{v}_8xb2-160k_ade20k-512x512_ms-flip.py" in names
    for mode in ("win", "cwin", "hwin"):
        assert f"mask-rcnn_restv2-t-{mode}_fpn_amp-ms-1x_coco.py" in names
    for neck in ("fpn", "vt-fpn"):
        assert f"{neck}_restv2-t_8xb2-160k_ade20k-512x512.py" in names
    for name in ("restv2-t_fpn_amp-ms-1x", "restv2-t_fpn_amp-ms-3x", "rest-s_fpn_amp-ms-1x",
                 "rest-b_fpn_amp-ms-1x"):
        assert f"retinanet_{name}_coco.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_recipe_and_build(path):
    cfg = Config.fromfile(str(path))
    family = path.parent.name
    framework = "mmseg" if family in ("upernet", "sem_fpn") else "mmdet"
    assert cfg.default_scope == framework == detect_framework(cfg)
    assert cfg.custom_imports == dict(imports=["rest_dense.mm"], allow_failed_imports=False)

    model = model_cfg(cfg)
    pre = model.data_preprocessor
    assert (pre.mean, pre.std, pre.bgr_to_rgb) == (MEAN, STD, True)
    backbone = model.backbone

    if family == "retinanet" and "_rest-" in path.name:
        variant = re.search(r"_rest-([sb])_", path.name).group(1)
        assert backbone.type == "ResTv1"
        assert backbone.arch == {"s": "small", "b": "base"}[variant]
        assert backbone.init_cfg.checkpoint == f"checkpoints/rest_{backbone.arch}.pth"
    else:
        m = re.search(r"_restv2-([tsb])(?:-(win|cwin|hwin))?_", path.name)
        arch, dpr = VARIANT[m.group(1)]
        assert backbone.type == "ResTv2"
        assert (backbone.arch, backbone.drop_path_rate) == (arch, dpr)
        assert backbone.attn_mode == (m.group(2) or "global")
        assert backbone.init_cfg == dict(type="Pretrained",
                                         checkpoint=f"checkpoints/restv2_{arch}_224.pth")

    optim = cfg.optim_wrapper
    if framework == "mmdet":
        assert cfg.train_dataloader.dataset.data_root == "data/coco/"
        assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
        resize = cfg.train_dataloader.dataset.pipeline[2]
        assert resize.type == "RandomChoiceResize" and resize.keep_ratio
        assert [s[1] for s in resize.scales] == list(range(480, 801, 32))
        assert {s[0] for s in resize.scales} == {1333}
        assert cfg.train_dataloader.dataset.pipeline[3] == dict(type="RandomFlip", prob=0.5)
        assert optim.type == "AmpOptimWrapper"
        assert (optim.optimizer.type, optim.optimizer.lr, optim.optimizer.weight_decay) == \
            ("AdamW", 1e-4, 0.05)
        epochs = 36 if "-3x_" in path.name else 12
        assert cfg.train_cfg.max_epochs == epochs
        assert cfg.param_scheduler[1].milestones == ([28, 33] if epochs == 36 else [8, 11])
    else:
        assert cfg.train_dataloader.dataset.data_root == "data/ade/ADEChallengeData2016"
        assert cfg.train_dataloader.batch_size == 2 and cfg.train_cfg.max_iters == 160000
        assert (optim.optimizer.type, optim.optimizer.lr, optim.optimizer.weight_decay) == \
            ("AdamW", 1.5e-4, 0.05)
        assert optim.constructor == "ResTLayerDecayOptimizerConstructor"
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.end, poly.type, poly.begin, poly.end) == \
            ("LinearLR", 1500, "PolyLR", 1500, 160000)
        if family == "sem_fpn":  # mmseg's semantic FPN head, no auxiliary head
            assert model.neck.type == ("VTFPN" if path.name.startswith("vt-fpn_") else "FPN")
            assert model.neck.in_channels == [96, 192, 384, 768] and model.neck.out_channels == 256
            head = model.decode_head
            assert (head.type, head.channels, head.num_classes, head.in_channels) == \
                ("FPNHead", 128, 150, [256] * 4)
            assert model.get("auxiliary_head") is None
        else:
            assert model.decode_head.channels == 512 and model.decode_head.num_classes == 150
            aux = model.auxiliary_head
            assert (aux.in_index, aux.channels, aux.num_classes) == (2, 256, 150)
        if path.name.endswith("_ms-flip.py"):
            assert cfg.model.type == "SegTTAModel"

    built = build(shrink(cfg))
    core = getattr(built, "module", built).backbone
    assert isinstance(core, MMResTv1 if backbone.type == "ResTv1" else MMResTv2)
    if backbone.type == "ResTv2":
        assert core.attn_mode == backbone.attn_mode
    assert core.init_cfg is None and not core.is_init


# full-size models: the figures of the authors' code (shared/ENV.md)
FULL = {
    "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py": 49.941,
    "mask_rcnn/mask-rcnn_restv2-t-cwin_fpn_amp-ms-1x_coco.py": 49.955,
    "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py": 62.088,
}


@pytest.mark.parametrize("rel", sorted(FULL))
def test_full_size_parameter_count(rel):
    model = build(load(rel))
    assert round(count_parameters(model) / 1e6, 3) == FULL[rel]


def test_override_of_a_config_variable_says_where_its_value_went():
    """`max_iters=3` on a config that wrote `train_cfg = dict(max_iters=max_iters)` changes
    the variable only: a warning names the field to override (it trained 600 silently)."""
    import logging

    from mmengine.logging import MMLogger

    from rest_dense.mm.utils import load_config

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger, handler = MMLogger.get_current_instance(), Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        cfg = load_config(str(CONFIG_DIR / "toy/mask_rcnn_restv2_toy.py"),
                          ["max_iters=3", "train_cfg.val_interval=5", "model.backbone.with_cp=True"])
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert "max_iters is a variable of the config" in text and "train_cfg.max_iters" in text, text
    assert "val_interval" not in text and "with_cp" not in text  # fields: no warning
    assert cfg.max_iters == 3 and cfg.train_cfg.max_iters != 3  # what the warning is about


def test_user_configs_inherit_shipped_and_toolbox_configs(tmp_path, capsys):
    """A config of one's own inherits a shipped one as `rest_dense::NAME` (as `mmdet::NAME`
    works for MMDetection's), and an MMDetection config by `mmdet::` (mmengine finds it
    through pkg_resources: the pinned setuptools keeps it); both build and run."""
    import torch

    from rest_dense.cli import main
    from rest_dense.configs import config_framework
    from rest_dense.mm.utils import load_config

    ours = tmp_path / "mine.py"
    ours.write_text("_base_ = 'rest_dense::toy/mask_rcnn_restv2_toy.py'\n"
                    "model = dict(backbone=dict(drop_path_rate=0.1))\n")
    cfg = load_config(str(ours))
    assert cfg.default_scope == "mmdet" and config_framework(str(ours)) == "mmdet"
    assert cfg.model.backbone.type == "ResTv2" and cfg.model.backbone.drop_path_rate == 0.1
    assert cfg.model.backbone.arch.embed_dims == (32, 64, 128, 256)  # the base's values

    theirs = tmp_path / "theirs.py"
    theirs.write_text(
        "_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'\n"
        "custom_imports = dict(imports=['rest_dense.mm'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(_delete_=True, type='ResTv2', arch='restv2_tiny'),\n"
        "             neck=dict(in_channels=[96, 192, 384, 768]))\n")
    model = build(load_config(str(theirs)))
    feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert len(feats) == 5 and all(torch.isfinite(f).all() for f in feats)

    # a name that is not shipped, a missing _base_ file, a syntax error (framework given or
    # not): one line naming it, without the --framework hint, which would not help
    bad = tmp_path / "bad.py"
    bad.write_text("_base_ = 'rest_dense::toy/no_such_config.py'\n")
    gone = tmp_path / "gone.py"
    gone.write_text("_base_ = 'nothere.py'\n")
    broken = tmp_path / "broken.py"
    broken.write_text("_base_ = ['x.py'\nmodel = dict(\n")
    base5 = tmp_path / "base5.py"
    base5.write_text("_base_ = 5\n")
    on_base5 = tmp_path / "on_base5.yaml"
    on_base5.write_text("_base_: ./base5.py\n")
    unbuildable = tmp_path / "unbuildable.py"
    unbuildable.write_text("_base_ = 'rest_dense::toy/mask_rcnn_restv2_toy.py'\n"
                           "model = dict(backbone=dict(attn_mode='swin'))\n")
    raising = tmp_path / "raising.py"
    raising.write_text("_base_ = 'rest_dense::toy/vt_fpn_restv2_toy.py'\n"
                       "train_cfg = dict(max_iters=1 / 0)\n")
    for argv, named in ((["flops", bad], "no shipped config 'toy/no_such_config.py'"),
                        (["train", bad], "no shipped config 'toy/no_such_config.py'"),
                        (["flops", gone], str(tmp_path / "nothere.py")),
                        (["train", gone], str(tmp_path / "nothere.py")),
                        (["train", broken, "--framework", "openmmlab"], "is not valid Python"),
                        (["train", broken], "is not valid Python"),
                        (["train", raising], f"ZeroDivisionError: division by zero (at {raising}:2)"),
                        (["flops", raising], "ZeroDivisionError"),
                        (["bench", "--configs", raising, "--shape", "32x32"], "ZeroDivisionError"),
                        (["bench", "--configs", unbuildable, "--shape", "32x32", "--no-progress"],
                         "the config does not build: unknown attn_mode 'swin'"),
                        (["flops", unbuildable], "the config does not build: unknown attn_mode"),
                        (["flops", base5], "_base_ must be a config file name or a list"),
                        (["train", base5], "_base_ must be a config file name or a list"),
                        (["flops", on_base5], f"config {base5}: _base_ must be")):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit:
            rc = exit.code
        err = without_logging_errors(capsys.readouterr().err)
        assert rc != 0 and named in err, (argv, err)
        assert "Traceback" not in err and "--framework" not in err, (argv, err)
        assert len(err.strip().splitlines()) <= 2, err  # argparse may print its usage line
        if argv[0] == "bench":  # a config that fails to load and one that fails to build
            assert err.startswith("rest-dense bench: error: "), err
