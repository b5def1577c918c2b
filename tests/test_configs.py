"""Configs: shipped ones found by name (and ``pkg::path``), loadable with their whole base
chain, listed by the CLI; which framework a config is for (one function, one vocabulary);
what ``--cfg-options`` values mean (one parser, mmengine DictAction's rules)."""
import os
import re

import pytest

from rest_dense.cli import main
from rest_dense.configs import (config_framework, configs_root, d2_opts, framework_family,
                                get_config_path, list_configs, parse_cfg_options, parse_cfg_value)

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
    assert {config_framework(n) for n in names} == {"mmdet", "mmseg", "d2", "d2-lazy"}
    assert all(config_framework(n) == "mmseg" for n in list_configs(framework="mmseg"))
    assert list_configs(framework="detectron2") == \
        sorted(list_configs(framework="d2") + list_configs(framework="d2-lazy"))


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
    # --path: a shipped config only, of the framework asked for
    capsys.readouterr()
    assert main(["configs", "--path", ""]) == 2
    assert "--path needs a config name" in capsys.readouterr().err
    assert main(["configs", "--path", "../pyproject.toml"]) == 2  # beside the configs folder
    assert "no config file '../pyproject.toml'" in capsys.readouterr().err
    assert main(["configs", "--framework", "d2", "--path", "toy/upernet_restv2_toy.py"]) == 2
    assert "is a mmseg config, not d2" in capsys.readouterr().err
    assert main(["configs", "--framework", "openmmlab", "--path", "toy/upernet_restv2_toy.py"]) == 0
    # a fragment of no one framework is printed whatever --framework says
    assert main(["configs", "--framework", "mmdet", "--path", "_base_/schedules/adamw_1x.py"]) == 0
    # a word without wildcards matches the names that contain it; a folder is named as one
    capsys.readouterr()
    assert main(["configs", "toy"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert listed and all("toy" in name for name in listed)
    assert "toy/upernet_restv2_toy.py" in listed and "detectron2/toy/mask_rcnn_restv2_toy.yaml" in listed
    for folder in ("mask_rcnn", "toy/"):
        assert main(["configs", "--path", folder]) == 2
        assert f"'{folder}' is a folder of configs" in capsys.readouterr().err


def test_cli_output_to_a_closed_pipe_is_quiet():
    """`rest-dense configs | head -1`: the first line, and no traceback when head leaves."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")  # each line written at once: head leaves early
    proc = subprocess.run(f"{sys.executable} -m rest_dense.cli configs | head -1", shell=True,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.count("\n") == 1 and proc.stdout.strip(), proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ which framework
def _expected_framework(name):
    """An oracle independent of the rule: where the shipped config lies and what it is."""
    if name.startswith("detectron2/"):
        return "d2-lazy" if name.endswith(".py") else "d2"
    seg = name.split("/")[0] in ("upernet", "sem_fpn") or re.search(r"(upernet|sem_fpn|vt_fpn)_", name)
    detector = re.search(r"(mask_rcnn|retinanet)_", name)  # detectors with a VT-FPN neck
    return "mmseg" if seg and not detector else "mmdet"


def test_every_shipped_config_has_its_framework():
    for name in list_configs():
        assert config_framework(name) == _expected_framework(name), name
        assert config_framework(get_config_path(name)) == _expected_framework(name), name


@pytest.mark.parametrize("files, framework", [
    # detectron2 yacs: _BASE_ or upper-case sections (or nothing at all)
    ({"c.yaml": "_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.1\n"}, "d2"),
    ({"c.yml": "MODEL:\n  DEVICE: cpu\n"}, "d2"),
    ({"c.yaml": "# only a comment\n"}, "d2"),
    # an mmengine yaml config
    ({"c.yaml": "model:\n  type: MaskRCNN\ndefault_scope: mmdet\n"}, "mmdet"),
    ({"c.yaml": "model:\n  type: EncoderDecoder\n"}, "mmseg"),
    # LazyConfig: names, a detectron2 import, or only relative imports of another LazyConfig
    ({"c.py": "from common import dataloader, lr_multiplier, model, train\n"}, "d2-lazy"),
    ({"c.py": "import detectron2\nmodel = None\ntrain = dict(max_iter=1)\n"}, "d2-lazy"),
    ({"c.py": "from .base import *\ntrain.max_iter = 10\n",
      "base.py": "from detectron2.config import LazyCall as L\nmodel = L(dict)()\n"}, "d2-lazy"),
    ({"c.py": "from .base import model, train, optimizer\n",
      "base.py": "dataloader = None\nlr_multiplier = None\n"}, "d2-lazy"),  # analysis said mm
    # OpenMMLab: default_scope along the _base_ chain first, then the model type
    ({"c.py": "_base_ = ['b.py']\nmodel = dict(type='MaskRCNN')\n",
      "b.py": "default_scope = 'mmseg'\n"}, "mmseg"),
    ({"c.py": "_base_ = './b.py'\n", "b.py": "model = dict(type='EncoderDecoder')\n"}, "mmseg"),
    ({"c.py": "model = dict(type='EncoderDecoder')\n"}, "mmseg"),  # bare: by model type
    ({"c.py": "model = dict(type='RetinaNet')\n"}, "mmdet"),
    ({"c.py": "model = dict(type='mmseg.EncoderDecoder')\n"}, "mmseg"),
    ({"c.py": "model = dict(type='SegTTAModel', module=dict(type='EncoderDecoder'))\n"}, "mmseg"),
    ({"c.py": "_base_ = ['mmseg::_base_/default_runtime.py']\nmodel = dict(type='X')\n"}, "mmseg"),
    ({"c.py": "from mmengine.config import read_base\nwith read_base():\n    from .b import *\n"
              "model.update(x=1)\n", "b.py": "default_scope = 'mmdet'\nmodel = dict(type='X')\n"},
     "mmdet"),
    # a model type no table knows: the installed registries decide (mmseg's SegFormer head...)
    ({"c.py": "_base_ = []\nmodel = dict(type='DepthEstimator')\n"}, "mmseg"),
    ({"c.py": "_base_ = []\nmodel = dict(type='YOLOV3')\n"}, "mmdet"),
])
def test_config_framework_cases(tmp_path, files, framework):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert config_framework(str(tmp_path / next(iter(files)))) == framework


def test_config_framework_of_loaded_configs():
    from mmengine.config import Config

    assert config_framework(Config(dict(model=dict(type="EncoderDecoder")))) == "mmseg"
    assert config_framework(Config(dict(default_scope="mmdet", model=dict(type="X")))) == "mmdet"
    assert config_framework({"MODEL": {}, "SOLVER": {}}) == "d2"  # a yacs CfgNode is a dict
    with pytest.raises(ValueError, match="default_scope"):
        config_framework(Config(dict(model=dict(type="NoSuchModel"))))


@pytest.mark.parametrize("name, text, match", [
    ("none.py", None, "no config file"),
    ("x.json", "{}", r"\.py .*or \.yaml"),
    ("odd.py", "x = 1\n", "fits no framework"),
    ("broken.py", "model = dict(\n", "not valid Python"),
])
def test_config_framework_errors_name_the_problem(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        config_framework(str(tmp_path / name))


def test_package_configs_everywhere_a_config_is_accepted():
    path = get_config_path("mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py")
    assert path.endswith("swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py") and os.path.isfile(path)
    assert config_framework("mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py") == "mmdet"
    assert config_framework("mmseg::upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py") == "mmseg"
    with pytest.raises(FileNotFoundError, match="no such config in mmdet"):
        get_config_path("mmdet::swin/nothing.py")
    with pytest.raises(FileNotFoundError, match="not installed"):
        get_config_path("no_such_pkg::a.py")


def test_framework_family():
    assert [framework_family(f) for f in ("mmdet", "mmseg", "d2", "d2-lazy")] == \
        ["openmmlab", "openmmlab", "detectron2", "detectron2"]
    with pytest.raises(ValueError, match="not one of"):
        framework_family("mm")


# ------------------------------------------------------------------ --cfg-options
_NAN = float("nan")


@pytest.mark.parametrize("text, value", [
    # issue 17: the same text means the same in every command
    ("false", False), ("False", False), ("TRUE", True), ("true", True),
    ("1,2", [1, 2]), ("[1,2]", [1, 2]), ("(1,2)", (1, 2)), ("(1)", (1,)), ("[1,]", [1]),
    ("1", 1), ("-3", -3), ("1_000", 1000), ("0.5", 0.5), ("1e-3", 1e-3), (".5", 0.5),
    ("inf", float("inf")), ("nan", _NAN),  # numbers: checked where they are used
    ("None", None), ("none", "none"), ("null", "null"),
    ("[]", []), ("()", ()), ("[(1,2),[a,b],c]", [(1, 2), ["a", "b"], "c"]),
    ("[[1, 2], [3, 4]]", [[1, 2], [3, 4]]), ("1, 2 ,3", [1, 2, 3]),
    ("text", "text"), ("a b", "ab"), ("", ""), ("0x10", "0x10"), ("cwin", "cwin"),
    # quoted: the string as written (DictAction would parse '1' as the int 1)
    ("'1'", "1"), ('"true"', "true"), ("'a, b'", "a, b"), ("['x',2]", ["x", 2]),
    ("'x", "x"),  # a stray quote goes, as in DictAction
])
def test_cfg_option_values(text, value):
    got = parse_cfg_value(text)
    if value is _NAN:
        assert got != got
    else:
        assert got == value and type(got) is type(value)
    if "'" not in text and '"' not in text:  # the same as mmengine's own DictAction
        from mmengine.config import DictAction

        theirs = DictAction._parse_iterable(text)
        assert repr(theirs) == repr(got)


@pytest.mark.parametrize("value", [
    # a dict as `repr` writes it (what tests and users pass for a whole sub-config):
    # DictAction has no dicts (it recurses forever on them); here they are dicts
    {"embed_dims": (16, 32, 64, 128), "depths": (1, 1, 2, 1), "_delete_": True},
    {"_delete_": True, "type": "ResTv1", "arch": {"embed_dims": (32, 64), "sr_ratios": (8, 4)},
     "out_indices": (1, 2, 3), "init_cfg": None, "name": "a b, c", 1: [1.5, {"x": "y"}]},
    {}, [{"a": 1}, {"b": (2,)}],
])
def test_cfg_option_dict_values(value):
    assert parse_cfg_value(repr(value)) == value
    assert parse_cfg_options([f"model.backbone={value!r}"]) == {"model.backbone": value}


@pytest.mark.parametrize("text, value", [
    ("f(1,2)", "f(1,2)"), ("a{1,2}", "a{1,2}"),  # commas only inside brackets: a string
])
def test_cfg_option_values_never_recurse_forever(text, value):
    assert parse_cfg_value(text) == value


@pytest.mark.parametrize("text, match", [
    ("{'a'}", "'a'.* is not key: value"), ("{'a': 1", "unbalanced"), ("{'a': (1, 2}", "unbalanced"),
    ("{[1]: 2}", "cannot be a key"),
])
def test_cfg_option_dict_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_cfg_value(text)


@pytest.mark.parametrize("options, result", [
    (None, {}), ([], {}), ({"a.b": 1}, {"a.b": 1}), ("a=1", {"a": 1}),
    (["a.b=3", "c=[1,2]", "d=x", "a.b=4"], {"a.b": 4, "c": [1, 2], "d": "x"}),
    (["model.backbone.attn_mode=win"], {"model.backbone.attn_mode": "win"}),
    (["x=a=b"], {"x": "a=b"}),
])
def test_parse_cfg_options(options, result):
    assert parse_cfg_options(options) == result


@pytest.mark.parametrize("options, match", [
    (["MODEL.DEVICE", "cpu"], "'MODEL.DEVICE' is not KEY=VALUE"),
    (["=1"], "is not KEY=VALUE"),
    (["a b=1"], "not a dotted key"),
    (["a=[1,2"], "unbalanced brackets"),
    (["a=(1,2))"], "unbalanced brackets"),
    (["a=['x,1]"], "unbalanced quotes"),
])
def test_parse_cfg_options_errors(options, match):
    with pytest.raises(ValueError, match=re.escape(match) if "'" in match else match):
        parse_cfg_options(options)


@pytest.mark.parametrize("options, framework, opts", [
    (["MODEL.DEVICE=cpu", "SOLVER.MAX_ITER", "3"], "d2", ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "3"]),
    ({"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.1}, "d2", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.1"]),
    (["train.max_iter=10"], "d2-lazy", ["train.max_iter=10"]),
])
def test_d2_opts_keep_detectron2_semantics(options, framework, opts):
    assert d2_opts(options, framework) == opts


def test_d2_opts_errors():
    with pytest.raises(ValueError, match="has no value"):
        d2_opts(["MODEL.DEVICE"], "d2")
    with pytest.raises(ValueError, match="key=value"):
        d2_opts(["train.max_iter", "10"], "d2-lazy")


def test_a_shipped_readme_is_no_config(capsys, tmp_path, monkeypatch):
    """configs/README.md sits in the configs folder but is no config."""
    monkeypatch.chdir(tmp_path)  # no README.md of the user's here
    with pytest.raises(FileNotFoundError, match="no config file 'README.md'"):
        get_config_path("README.md")
    assert main(["configs", "--path", "detectron2/README.md"]) == 2
