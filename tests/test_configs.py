"""Shipped configs: found by name, loadable with their whole base chain, listed by the CLI."""
import os
import re

import pytest

from rest_dense.cli import main
from rest_dense.configs import config_framework, configs_root, get_config_path, list_configs

from conftest import CONFIG_DIR


def test_root_is_the_checkout_configs_in_a_clone():
    assert configs_root() == CONFIG_DIR


def test_list_configs_covers_every_runnable_config():
    names = list_configs()
    on_disk = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*")
                     if p.suffix in (".py", ".yaml") and "_base_" not in p.parts and "deploy" not in p.parts
                     and not p.name.startswith("Base-") and "__pycache__" not in p.parts)
    assert names == on_disk and len(names) >= 30
    assert list_configs("mask_rcnn/*") and all(n.startswith("mask_rcnn/") for n in list_configs("mask_rcnn/*"))
    assert {config_framework(n) for n in names} == {"mmdet", "mmseg", "detectron2"}
    assert all(config_framework(n) == "mmseg" for n in list_configs(framework="mmseg"))


@pytest.mark.parametrize("name", ["mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py",
                                  "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py",
                                  "toy/mask_rcnn_restv2_toy.py"])
def test_mm_config_loads_with_base_chain(name):
    from mmengine.config import Config

    cfg = Config.fromfile(get_config_path(name))
    assert cfg.model.backbone.type == "ResTv2"
    assert cfg.custom_imports == dict(imports=["rest_dense.mm"], allow_failed_imports=False)
    assert "train_dataloader" in cfg and "optim_wrapper" in cfg  # from _base_ files


def test_d2_yaml_and_lazy_configs_load():
    from detectron2.config import LazyConfig, get_cfg

    import rest_dense.d2 as d2

    cfg = get_cfg()
    d2.add_restv2_config(cfg)
    cfg.merge_from_file(get_config_path("detectron2/mask_rcnn_restv2_tiny_3x.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == "build_restv2_fpn_backbone"
    assert cfg.MODEL.RESTV2.NAME == "restv2_tiny"
    lazy = LazyConfig.load(get_config_path("detectron2/lazy/mask_rcnn_restv2_tiny_3x.py"))
    assert "model" in lazy and "optimizer" in lazy


@pytest.mark.parametrize("bad, hint", [("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_cocoo.py",
                                        "mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"),
                                       ("nothing/at/all.py", "rest-dense configs")])
def test_unknown_config_names_close_matches(bad, hint):
    with pytest.raises(FileNotFoundError) as info:
        get_config_path(bad)
    assert bad in str(info.value) and hint in str(info.value)


def test_existing_path_and_configs_prefix_accepted(tmp_path):
    own = tmp_path / "mine.py"
    own.write_text("x = 1\n")
    assert get_config_path(str(own)) == str(own)
    assert get_config_path("configs/toy/upernet_restv2_toy.py") == str(CONFIG_DIR / "toy" / "upernet_restv2_toy.py")


def test_cli_configs(capsys):
    assert main(["configs", "upernet/*"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512\.py +mmseg$", out, re.M)
    assert "mask_rcnn" not in out
    assert main(["configs", "--path", "toy/upernet_restv2_toy.py"]) == 0
    assert os.path.isfile(capsys.readouterr().out.strip())
    assert main(["configs", "zzz*"]) == 1
