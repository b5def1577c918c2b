"""rest_dense.distributed without a process group, the stages DDP needs frozen (those
past out_indices), detectron2's FPN on stage1..stage3, and the launcher scripts' checks."""
import os
import socket
import subprocess

import pytest
import torch
from mmengine.config import Config

from rest_dense import distributed
from rest_dense.models import ResTv1, ResTv2

from conftest import REPO, TINY_ARCH

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(120, func_only=True)


def _ran(calls):
    def job(x, y):
        calls.append((x, y))
    return job


# ------------------------------------------------------------------ helpers, one process
def test_backend_and_ports():
    # nccl only where CUDA runs the job (GPU machines); gloo on CPU-only ones and for "cpu"
    assert distributed.default_backend() == ("nccl" if distributed.cuda_usable() else "gloo")
    assert distributed.default_backend("cpu") == "gloo"
    assert not distributed.cuda_usable("cpu")
    port = distributed.find_free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind((distributed.LOCALHOST, port))  # really free
    url = distributed.local_dist_url()
    assert url.startswith("tcp://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0


def test_outside_a_process_group():
    distributed.close_process_group()  # nothing to close: a no-op
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model) is model
    assert distributed.ddp_device_ids(model) is None
    assert distributed.assert_replicas_in_sync(model) == 0
    assert distributed.local_process_group() is None


def test_launch_one_process_runs_in_place_and_checks_arguments():
    calls = []
    distributed.launch(_ran(calls), 1, args=(1, "a"))
    assert calls == [(1, "a")]
    with pytest.raises(ValueError, match="at least one process"):
        distributed.launch(_ran(calls), 0)
    with pytest.raises(ValueError, match="machine_rank 2 is not in 0..1"):
        distributed.launch(_ran(calls), 1, num_machines=2, machine_rank=2)
    with pytest.raises(ValueError, match="only works on one machine"):
        distributed.launch(_ran(calls), 2, num_machines=2, dist_url="auto")
    assert calls == [(1, "a")]


def test_init_from_env_needs_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.*torchrun"):
        distributed.init_from_env()


def _mm_cfg(**extra):
    cfg = Config(dict(
        model=dict(type="EncoderDecoder", backbone=dict(type="ResTv2"),
                   decode_head=dict(norm_cfg=dict(type="SyncBN", requires_grad=True)),
                   auxiliary_head=[dict(norm_cfg=dict(type="MMSyncBN"))]),
        env_cfg=dict(dist_cfg=dict(backend="nccl", timeout=60)), **extra))
    return cfg


def test_prepare_mm_config_on_cpu():
    cfg = _mm_cfg(launcher="pytorch", sync_bn="torch")
    changes = distributed.prepare_mm_config(cfg, cuda=False)
    assert cfg.env_cfg.dist_cfg == dict(backend="gloo", timeout=60)
    assert cfg.model_wrapper_cfg == dict(type="MMDistributedDataParallel", broadcast_buffers=False,
                                         find_unused_parameters=False, device_ids=None)
    # SyncBN became BN: rank 0's statistics everywhere after each iteration, as SyncBN
    # keeps them equal (mmengine's validation does not pass through DDP's forward)
    assert cfg.custom_hooks == [dict(type="RestBroadcastBuffersHook")]
    assert cfg.model.decode_head.norm_cfg.type == "BN"
    assert cfg.model.auxiliary_head[0].norm_cfg.type == "BN"
    assert cfg.sync_bn is None
    text = "\n".join(changes)
    assert "'gloo'" in text and "device_ids=None" in text
    assert "model.decode_head.norm_cfg: SyncBN" in text and "auxiliary_head[0]" in text
    assert "sync_bn='torch' dropped" in text and "RestBroadcastBuffersHook" in text
    assert distributed.prepare_mm_config(cfg, cuda=False) == []  # idempotent
    assert cfg.custom_hooks == [dict(type="RestBroadcastBuffersHook")]
    # without SyncBN the buffers stay each process's, as in any BatchNorm job
    plain = _mm_cfg(launcher="pytorch")
    plain.model.decode_head.norm_cfg.type = "BN"
    plain.model.auxiliary_head[0].norm_cfg.type = "BN"
    distributed.prepare_mm_config(plain, cuda=False)
    assert not plain.get("custom_hooks")


def test_prepare_mm_config_reverts_the_core_spelling_of_syncbn():
    cfg = _mm_cfg(launcher="pytorch")
    cfg.model.neck = dict(type="VTFPN", in_channels=[8, 16], norm_layer="SyncBN")
    changes = distributed.prepare_mm_config(cfg, cuda=False)
    assert cfg.model.neck.norm_layer == "bn"
    assert any("model.neck.norm_layer: SyncBN" in line for line in changes), changes


def test_revert_sync_batchnorm_keeps_tensors_and_outputs(one_thread):
    """SyncBatchNorm layers (of the VT-FPN token path: 3-D inputs; of a conv net: 4-D)
    become BatchNormXd holding the same tensors: an optimizer built before keeps them,
    state dict keys stay, and training-mode outputs equal plain BatchNorm's."""
    from rest_dense.models import VTFPN

    torch.manual_seed(0)
    neck = VTFPN(in_channels=(8, 16), out_channels=16, num_tokens=4, token_channels=32,
                 num_heads=2, norm_layer="syncbn")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4))
    for model, inputs in ((neck, [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]),
                          (net, torch.randn(2, 3, 5, 5))):
        model.train()
        params = dict(model.named_parameters())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected = model(inputs)
        model.load_state_dict(state)  # running statistics as before the pass
        sync_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        out, found = distributed.revert_sync_batchnorm(model)
        assert out is model and found == sync_names and found
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        assert all(isinstance(model.get_submodule(n), distributed.BatchNormXd) for n in found)
        assert all(p is params[n] for n, p in model.named_parameters())
        assert model.state_dict().keys() == state.keys()
        got = model(inputs)
        for a, b in zip(got if isinstance(got, (list, tuple)) else [got],
                        expected if isinstance(expected, (list, tuple)) else [expected]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a layer given alone comes back new; inputs of one dimension are refused by name
    bn, found = distributed.revert_sync_batchnorm(torch.nn.SyncBatchNorm(3))
    assert isinstance(bn, distributed.BatchNormXd) and found == ["(the module)"]
    with pytest.raises(ValueError, match="2 or more dimensions"):
        bn(torch.randn(3))
    # outside a process group nothing is changed
    sync = torch.nn.Sequential(torch.nn.SyncBatchNorm(3))
    assert distributed.revert_sync_batchnorm_on_cpu(sync) is sync
    assert isinstance(sync[0], torch.nn.SyncBatchNorm)


def test_prepare_mm_config_keeps_gpu_and_single_process_configs():
    for cfg, cuda in ((_mm_cfg(launcher="pytorch"), True), (_mm_cfg(launcher="none"), False),
                      (_mm_cfg(), False)):
        before = cfg.to_dict()
        assert distributed.prepare_mm_config(cfg, cuda=cuda) == []
        assert cfg.to_dict() == before
    # a wrapper of the user's: device_ids filled in only for DDP wrappers, never overridden
    cfg = _mm_cfg(launcher="pytorch", model_wrapper_cfg=dict(type="MMDistributedDataParallel",
                                                             find_unused_parameters=True))
    distributed.prepare_mm_config(cfg, cuda=False)
    assert cfg.model_wrapper_cfg == dict(type="MMDistributedDataParallel",
                                         find_unused_parameters=True, device_ids=None)
    cfg = _mm_cfg(launcher="pytorch", model_wrapper_cfg=dict(type="MMFullyShardedDataParallel"))
    distributed.prepare_mm_config(cfg, cuda=False)
    assert cfg.model_wrapper_cfg == dict(type="MMFullyShardedDataParallel")


def test_setup_mm_distributed_single_process_does_nothing():
    cfg = _mm_cfg(launcher="none")
    assert distributed.setup_mm_distributed(cfg) == []
    assert not torch.distributed.is_initialized()


# ------------------------------------------------- stages past out_indices: no gradient
@pytest.mark.parametrize("cls,kwargs,unused", [
    (ResTv2, dict(out_indices=(0, 1, 2)), ("stage4.", "patch_4.")),
    (ResTv2, dict(out_indices=(0, 1), attn_mode="cwin", window_size=8),
     ("stage3.", "stage4.", "patch_3.", "patch_4.", "cwin_convs.2.", "cwin_convs.3.")),
    (ResTv2, dict(out_indices=(1, 2, 3)), ()),
    (ResTv1, dict(out_indices=(0, 1, 2)), ("stage4.", "patch_embed_4.", "norm.")),
    (ResTv1, dict(out_indices=(3,)), ()),
])
def test_stages_past_out_indices_are_frozen(cls, kwargs, unused, one_thread):
    model = cls(arch=dict(TINY_ARCH), **kwargs)
    full = cls(arch=dict(TINY_ARCH), **{k: v for k, v in kwargs.items() if k != "out_indices"})
    for _ in range(2):  # as built, and after .train()
        frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        assert frozen == sorted(n for n, _ in model.named_parameters() if n.startswith(unused))
        model.train()
    # every trainable parameter gets a gradient (what DDP without find_unused_parameters needs)
    out = model(torch.randn(2, 3, 64, 96))
    sum(o.square().mean() for o in out).backward()
    assert distributed.params_without_grad(model) == []
    # the weights stay: a full model's checkpoint loads strictly (the emitted norms aside)
    missing, unexpected = model.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("norm_") for k in unexpected)
    if unused:  # made trainable again, they get no gradient, and that is detected
        name = next(n for n, _ in model.named_parameters() if n.startswith(unused[0]))
        dict(model.named_parameters())[name].requires_grad_(True)
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(1, 3, 64, 96))
        sum(o.square().mean() for o in out).backward()
        assert distributed.params_without_grad(model) == [name]


def test_frozen_stages_and_unused_stages_together():
    model = ResTv2(arch=dict(TINY_ARCH), out_indices=(0, 1), frozen_stages=1).train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"stage2", "patch_2", "norm_2"}


# ------------------------------------------------------------------ detectron2 FPN
def test_d2_fpn_on_stage1_to_stage3_pools_its_last_level(one_thread):
    from detectron2.modeling import build_backbone

    from rest_dense.d2.engine import setup_yaml_config

    config = str(REPO / "configs" / "detectron2" / "toy" / "mask_rcnn_restv2_toy.yaml")
    tiny = ["MODEL.DEVICE", "cpu", "MODEL.RESTV2.ARCH.EMBED_DIMS", "[16, 32, 64, 128]",
            "MODEL.RESTV2.ARCH.DEPTHS", "[1, 1, 1, 1]"]
    feats = '["stage1", "stage2", "stage3"]'
    # the config describes a model: its RPN reads the four levels this FPN gives
    cfg = setup_yaml_config(config, tiny + ["MODEL.RESTV2.OUT_FEATURES", feats,
                                            "MODEL.FPN.IN_FEATURES", feats,
                                            "MODEL.RPN.IN_FEATURES", '["p2", "p3", "p4", "p5"]'])
    fpn = build_backbone(cfg)
    assert fpn.top_block.in_feature == "p4"
    out = fpn(torch.randn(1, 3, 64, 96))
    assert list(out) == ["p2", "p3", "p4", "p5"]
    assert out["p5"].shape[-2:] == (2, 3) and out["p4"].shape[-2:] == (4, 6)
    # all four stages: P6 from p5, as detectron2's own builders do
    assert build_backbone(setup_yaml_config(config, tiny)).top_block.in_feature == "p5"


# --------------------------------------------------------------------- launcher scripts
@pytest.mark.parametrize("script,args,env,message", [
    ("dist_train.sh", [], {}, "usage:"),
    ("dist_train.sh", ["cfg.py", "two"], {}, "NUM_PROCESSES must be a positive integer, got 'two'"),
    ("dist_train.sh", ["cfg.py", "0"], {}, "NUM_PROCESSES must be a positive integer"),
    ("dist_train.sh", ["cfg.py", "2"], {"NNODES": "2"}, "multi-node jobs need PORT"),
    ("dist_test.sh", ["cfg.py", "ckpt.pth"], {}, "usage:"),
    ("dist_test.sh", ["cfg.py", "ckpt.pth", "-1"], {}, "NUM_PROCESSES must be a positive integer"),
    ("dist_test.sh", ["cfg.py", "ckpt.pth", "2"], {"NNODES": "3"}, "multi-node jobs need PORT"),
])
def test_launcher_scripts_refuse_bad_arguments(script, args, env, message):
    full_env = {k: v for k, v in os.environ.items() if k not in ("PORT", "NNODES")}
    full_env.update(env)
    proc = subprocess.run(["bash", str(REPO / "tools" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script,args,env", [
    ("dist_train.sh", ["cfg.py", "2", "--work-dir", "w", "a.b=1"], {}),
    ("dist_test.sh", ["cfg.py", "ck.pth", "2", "--tta"], {}),
    ("dist_test.sh", ["cfg.py", "ck.pth", "8"],
     {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "PORT": "29511"}),
])
def test_launcher_scripts_command_line(tmp_path, script, args, env):
    """What the scripts run: torchrun (as ``$PYTHON -m torch.distributed.run``) with a free
    127.0.0.1 port on one machine, ``rest-dense train|test ... --launcher pytorch``."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then exec python3 "$@"; fi\n'
                    'echo "$@"\n')
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PORT", "NNODES", "NODE_RANK", "MASTER_ADDR")}
    full_env.update(env, PYTHON=str(fake))
    proc = subprocess.run(["bash", str(REPO / "tools" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:2] == ["-m", "torch.distributed.run"]
    opts = dict(w.split("=", 1) for w in words[2:7])
    assert opts["--nnodes"] == env.get("NNODES", "1")
    assert opts["--node_rank"] == env.get("NODE_RANK", "0")
    assert opts["--master_addr"] == env.get("MASTER_ADDR", "127.0.0.1")
    port = opts["--master_port"]
    assert int(port) > 0 and port == env.get("PORT", port)
    command = "train" if script == "dist_train.sh" else "test"
    n_files = 1 if command == "train" else 2
    assert opts["--nproc_per_node"] == args[n_files]
    assert words[7:] == ["-m", "rest_dense.cli", command, *args[:n_files], "--launcher", "pytorch",
                         *args[n_files + 1:]]


def test_worker_errors_of_the_input_are_one_line_and_bugs_keep_their_traceback():
    from rest_dense.distributed import worker_problem

    report = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent "
              "call last):\n  File \"x.py\", line 1, in f\nrest_dense.configs.ConfigBuildError: "
              "the config does not build: Dataset 'toy_train' is empty!\n")
    assert worker_problem(report) == \
        "process 1: the config does not build: Dataset 'toy_train' is empty!"
    assert worker_problem(report.replace("rest_dense.configs.ConfigBuildError",
                                         "FileNotFoundError")).startswith("process 1: the config")
    assert worker_problem(report.replace("rest_dense.configs.ConfigBuildError",
                                         "ZeroDivisionError")) is None
    assert worker_problem("") is None


@pytest.mark.slow
def test_d2_two_cpu_processes_on_an_empty_dataset_is_one_line(tmp_path, capsys):
    """A worker of a multi-process detectron2 run that stops on the input (here: a training
    set without images) is reported as single-process runs report it, not with
    torch.multiprocessing's traceback of the worker."""
    from rest_dense.cli import main as cli
    from rest_dense.data.toy import generate_toy_dataset

    root = tmp_path / "toy"
    generate_toy_dataset(root, num_train=2, num_val=1, size=64)
    for image in (root / "images" / "training").glob("*.png"):
        image.unlink()
    code = cli(["train", "detectron2/toy/sem_seg_restv2_vt_fpn_toy.yaml", "--num-gpus", "2",
                "--toy-root", str(root), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "the config does not build: Dataset 'toy_sem_seg_train' is empty" in err
    assert "Traceback" not in err and "ProcessRaisedException" not in err
