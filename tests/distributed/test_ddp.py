"""Multi-process training on this machine (2 processes, gloo on CPU): DDP without
``find_unused_parameters`` keeps the replicas bit-identical for the mmdet Mask R-CNN, the
mmseg UperNet and the detectron2 Mask R-CNN around the ResT backbones (and for the VT-FPN
toy models of the three frameworks), over the attention
modes, frozen stages, gradient checkpointing, stochastic depth and the ``out_indices`` a
neck may use; ``tools/dist_train.sh`` and detectron2's ``--num-gpus 2`` train, save and
evaluate end to end; SyncBN configs train in a single process.

The jobs themselves live in ``_ddp_jobs.py`` (spawned workers import them by name).
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import _ddp_jobs as jobs
from rest_dense import distributed

from conftest import REPO

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200, func_only=True)]

#: (name, setting): backbone options of one DDP run. Independent options share a run, to
#: keep the time down; together they cover every attention mode, frozen stages, both
#: with_cp levels, drop_path_rate > 0 and the out_indices necks use, in each framework.
MMDET_SETTINGS = [
    ("global", {}),
    ("win+with_cp", {"attn_mode": "win", "with_cp": True}),
    ("cwin+drop_path", {"attn_mode": "cwin", "drop_path_rate": 0.3}),
    ("hwin+frozen_stages=1", {"attn_mode": "hwin", "depths": (2, 2, 2, 2), "frozen_stages": 1}),
    ("out(1,2,3)+with_cp=mlp", {"out_indices": (1, 2, 3), "with_cp": "mlp"}),
    ("out(2,3)", {"out_indices": (2, 3)}),
    ("out(3,)", {"out_indices": (3,)}),
    ("out(0,1,2)+cwin", {"out_indices": (0, 1, 2), "attn_mode": "cwin"}),
    ("v1:out(0,1,2)+with_cp+drop_path+frozen_stages=1",
     {"v1": True, "out_indices": (0, 1, 2), "with_cp": True, "drop_path_rate": 0.2,
      "frozen_stages": 1}),
]
MMSEG_SETTINGS = [
    ("global+SyncBN heads", {"sync_bn": True}),
    ("hwin+with_cp+drop_path+frozen_stages=2",
     {"attn_mode": "hwin", "depths": (2, 2, 2, 2), "with_cp": True, "drop_path_rate": 0.3,
      "frozen_stages": 2}),
    ("out(0,1,2)+cwin", {"out_indices": (0, 1, 2), "attn_mode": "cwin"}),
    ("out(2,3)+win", {"out_indices": (2, 3), "attn_mode": "win"}),
    ("out(3,)", {"out_indices": (3,)}),
    ("v1:out(1,2,3)+drop_path", {"v1": True, "out_indices": (1, 2, 3), "drop_path_rate": 0.2}),
]
D2_SETTINGS = [
    ("global", {}),
    ("cwin+with_cp+drop_path+freeze_at=2",
     {"attn_mode": "cwin", "with_cp": True, "drop_path_rate": 0.3, "frozen_stages": 1}),
    ("hwin", {"attn_mode": "hwin", "depths": (2, 2, 2, 2)}),
    ("out(1,2,3)+win", {"out_indices": (1, 2, 3), "attn_mode": "win"}),
    ("out(3,)", {"out_indices": (3,)}),
    ("out(0,1,2)", {"out_indices": (0, 1, 2)}),
    ("v1:out(0,1,2)+with_cp", {"v1": True, "out_indices": (0, 1, 2), "with_cp": True}),
]
#: the VT-FPN toy models (issue 18): the visual-token neck in place of the FPN, in each
#: framework; a windowed attention mode with checkpointing and drop path besides global
VT_FPN_SETTINGS = {
    "mmseg_vt_fpn": [("global", {}),
                     ("hwin+with_cp+drop_path", {"attn_mode": "hwin", "with_cp": True,
                                                 "drop_path_rate": 0.3})],
    "mmdet_vt_fpn": [("global", {})],
    "d2_vt_fpn": [("global+SyncBatchNorm", {"sync_bn_modules": True}),
                  ("cwin+with_cp+drop_path", {"attn_mode": "cwin", "with_cp": True,
                                              "drop_path_rate": 0.3})],
}
PLAN = [("mmdet", MMDET_SETTINGS), ("mmseg", MMSEG_SETTINGS), ("d2", D2_SETTINGS),
        *VT_FPN_SETTINGS.items()]

TINY_MM_OPTIONS = ["model.backbone.arch.embed_dims=[16,32,64,128]",
                   "model.backbone.arch.depths=[1,1,1,1]"]


def _check_records(records, settings, prefix):
    assert [r["name"] for r in records] == [f"{prefix}:{name}" for name, _ in settings]
    for record, (_, setting) in zip(records, settings):
        name = record["name"]
        # every parameter (frozen ones too) was compared, and all were equal on both ranks
        assert record["compared"] == record["n_params"] > 0, name
        assert record["finite"], name
        assert len(record["losses"]) == jobs.STEPS
        assert all(math.isfinite(v) and v > 0 for v in record["losses"]), record
        # training moved (nearly) every trainable value and no frozen one
        assert record["trainable_changed"] >= 0.9 * record["n_trainable"] > 0, record
        assert record["frozen_unchanged"], name
        unused_stages = max(setting.get("out_indices", (3,))) < 3
        if setting.get("frozen_stages", -1) >= 0 or unused_stages:
            assert record["n_frozen"] > 0, name
        else:
            assert record["n_frozen"] == 0, name
    return records


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """All DDP runs, in one 2-process gloo group (one start-up for the three frameworks)."""
    out = tmp_path_factory.mktemp("ddp") / "records.json"
    distributed.launch(jobs.job, 2, args=(PLAN, str(out)), backend="gloo")
    return json.loads(out.read_text())


# ------------------------------------------------------------- replicas stay in sync
def test_replica_check_reports_differences(ddp_results):
    sanity = ddp_results["sanity"]
    assert "differ between ranks 0 and 1: 0.bias" in sanity["error"]
    assert sanity["after_ddp"] == 3 * 2 + 2 + 2 * 2 + 2


def test_mmdet_mask_rcnn_ddp_replicas_identical(ddp_results):
    _check_records(ddp_results["mmdet"]["records"], MMDET_SETTINGS, "mmdet")


def test_mmseg_upernet_ddp_replicas_identical(ddp_results):
    records = _check_records(ddp_results["mmseg"]["records"], MMSEG_SETTINGS, "mmseg")
    # the SyncBN heads ran as BN under gloo (rest_dense.distributed.prepare_mm_config)
    assert any("SyncBN -> BN" in c for c in records[0]["changes"])


def test_detectron2_mask_rcnn_ddp_replicas_identical(ddp_results):
    _check_records(ddp_results["d2"]["records"], D2_SETTINGS, "d2")


@pytest.mark.parametrize("group", sorted(VT_FPN_SETTINGS))
def test_vt_fpn_ddp_replicas_identical(ddp_results, group):
    """The VT-FPN toy models (MMSegmentation semantic FPN head, MMDetection Mask R-CNN,
    detectron2 SemanticSegmentor) keep bit-identical replicas; every neck parameter gets a
    gradient in every step (no ``find_unused_parameters`` needed); a model built with
    SyncBatchNorm layers trains on the CPU, as BatchNorm."""
    records = _check_records(ddp_results[group]["records"], VT_FPN_SETTINGS[group], group)
    for record, (_, setting) in zip(records, VT_FPN_SETTINGS[group]):
        if setting.get("sync_bn_modules"):
            # SyncBatchNorm layers (a lazy config's norm_layer='syncbn') trained as BatchNorm
            assert record["sync_bn_reverted"] > 0, record
            # rank 0's running statistics everywhere, as SyncBatchNorm keeps them equal
            assert record["broadcast_buffers"], record


# ------------------------------------------------------------------------ end to end
def _run(cmd, env, timeout=400):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def _mm_data_options(root):
    return [f"train_dataloader.dataset.data_root={root}/",
            f"val_dataloader.dataset.data_root={root}/",
            f"val_evaluator.ann_file={root}/annotations/instances_val.json"]


def test_dist_train_sh_on_cpu(toy_root, tmp_path, subprocess_env):
    """`bash tools/dist_train.sh CONFIG 2` trains with 2 gloo processes, saves a checkpoint
    and evaluates it (tools/dist_test.sh, the same launch with `rest-dense test`, ran the
    same way by hand; test_distributed_units.py checks its command line)."""
    env = dict(subprocess_env, PYTHON=sys.executable)
    env.pop("PORT", None)
    config = "configs/toy/mask_rcnn_restv2_toy.py"
    work = tmp_path / "work"
    options = TINY_MM_OPTIONS + [
        "model.neck.in_channels=[16,32,64,128]",
        "train_cfg.max_iters=3", "train_cfg.val_interval=3", "default_hooks.checkpoint.interval=3",
        "default_hooks.logger.interval=1", "train_dataloader.batch_size=2",
        "val_dataloader.batch_size=2", "model.test_cfg.rcnn.score_thr=0.0"]
    log = _run(["bash", "tools/dist_train.sh", config, "2", "--work-dir", str(work), "--threads",
                "1", "--cfg-options", *options, *_mm_data_options(toy_root)], env)
    assert "dist backend 'nccl' -> 'gloo'" in log
    assert "Distributed training: True" in log and "GPU number: 2" in log
    assert re.search(r"Iter\(train\) \[3/3\]", log), log[-3000:]
    # both ranks end their process group before exit (none aborts after training: torchrun
    # exits 0), and the job says it is done once
    assert log.count("rest-dense train: done") == 1 and "terminate called" not in log
    ckpt = work / "iter_3.pth"
    assert ckpt.is_file() and ckpt.stat().st_size > 0
    scalars = list(work.glob("*/vis_data/scalars.json"))
    assert len(scalars) == 1
    metrics = [json.loads(line) for line in scalars[0].read_text().splitlines()]
    val = [m for m in metrics if "coco/bbox_mAP" in m]
    assert val and 0.0 <= val[-1]["coco/bbox_mAP"] <= 1.0 and 0.0 <= val[-1]["coco/segm_mAP"] <= 1.0


BN_PROBE = """
import json, os
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class BNProbeHook(Hook):
    priority = "LOW"  # after the package's hooks, before the checkpoint is saved

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = getattr(runner.model, "module", runner.model)
        sums = [float(b.double().sum()) for n, b in model.named_buffers() if "running" in n]
        with open(os.path.join(os.environ["BN_PROBE_DIR"], f"rank{dist.get_rank()}.jsonl"),
                  "a") as f:
            f.write(json.dumps(sums) + "\\n")
"""


def test_dist_train_sh_syncbn_on_cpu_keeps_one_model(toy_root, tmp_path, subprocess_env):
    """SyncBN layers train as BatchNorm in a CPU job: after every iteration each process
    holds rank 0's statistics (what it validates with, what rank 0 saves), as SyncBN keeps
    them equal; a probe hook records them per rank."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "bnprobe.py").write_text(BN_PROBE)
    env = dict(subprocess_env, PYTHON=sys.executable, BN_PROBE_DIR=str(probe),
               PYTHONPATH=f"{probe}{os.pathsep}{subprocess_env['PYTHONPATH']}")
    env.pop("PORT", None)
    config = tmp_path / "syncbn_vt_fpn.py"  # a config of one's own on a shipped one
    config.write_text(
        "_base_ = 'rest_dense::toy/vt_fpn_restv2_toy.py'\n"
        "custom_imports = dict(imports=['rest_dense.mm', 'bnprobe'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='BNProbeHook')]\n"
        "model = dict(neck=dict(norm_cfg=dict(type='SyncBN')),\n"
        "             decode_head=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)))\n")
    work = tmp_path / "work"
    log = _run(["bash", "tools/dist_train.sh", str(config), "2", "--toy-root",
                str(toy_root), "--work-dir", str(work), "--threads", "1", "--cfg-options",
                *TINY_MM_OPTIONS, "model.neck.in_channels=[16,32,64,128]",
                "train_cfg.max_iters=3", "train_cfg.val_interval=3",
                "default_hooks.checkpoint.interval=3"], env)
    assert "SyncBN -> BN" in log and "RestBroadcastBuffersHook" in log
    ranks = [[json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and ranks[0][0], ranks
    assert ranks[0] == ranks[1]  # the same statistics in both processes at every iteration
    assert ranks[0][0] != ranks[0][-1]  # and they were trained
    assert (work / "iter_3.pth").is_file()


def test_detectron2_num_gpus_2_on_cpu(toy_root, tmp_path, subprocess_env):
    """`rest-dense train <d2 config> --num-gpus 2` on a CPU machine: gloo workers train,
    rank 0 saves, both evaluate (COCO results from the gathered predictions)."""
    out = tmp_path / "d2"
    tiny = jobs.TINY
    log = _run([sys.executable, "-m", "rest_dense.cli", "train",
                "detectron2/toy/mask_rcnn_restv2_toy.yaml", "--num-gpus", "2", "--dist-url", "auto",
                "--toy-root", str(toy_root), "--work-dir", str(out), "--threads", "1",
                "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4",
                "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "3",
                "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                "MODEL.RESTV2.ARCH.EMBED_DIMS", str(list(tiny["embed_dims"])),
                "MODEL.RESTV2.ARCH.DEPTHS", str(list(tiny["depths"])),
                "MODEL.FPN.OUT_CHANNELS", "32"], subprocess_env)
    assert (out / "model_final.pth").is_file()
    assert (out / "log.txt.rank1").is_file()  # the second worker ran
    assert "on 2 devices" in log  # inference split over both workers
    results = json.loads((out / "inference" / "toy_val" / "coco_instances_results.json")
                         .read_text())
    assert results, "no predictions"
    ap = re.findall(r"copypaste: ([-0-9.nan]+),", log)
    assert ap and all(math.isfinite(float(v)) for v in ap), log[-3000:]


# -------------------------------------------------------------- SyncBN in one process
def test_syncbn_config_trains_in_a_single_process(toy_root, tmp_path, one_thread):
    """A config with SyncBN heads trains without a process group (launcher none)."""
    from mmengine.config import Config

    from rest_dense.mm import runner

    cfg = Config.fromfile(str(REPO / "configs" / "toy" / "upernet_restv2_toy.py"))
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type="SyncBN", requires_grad=True)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None  # training is the point
    options = TINY_MM_OPTIONS + [
        "model.decode_head.in_channels=[16,32,64,128]", "model.auxiliary_head.in_channels=64",
        "model.decode_head.channels=32", "model.auxiliary_head.channels=16",
        "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2",
        "train_dataloader.batch_size=2", f"train_dataloader.dataset.data_root={toy_root}/"]
    assert not distributed.get_world_size() > 1
    model = runner.train(cfg, work_dir=tmp_path / "w", cfg_options=options)
    import torch

    # mmengine turned the SyncBN layers into plain BatchNorm for the single process
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "w" / "iter_2.pth").is_file()
