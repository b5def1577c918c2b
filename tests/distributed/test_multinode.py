"""Beyond one machine (issue 17): two launches on 127.0.0.1 stand in for two machines of
one process each (gloo on CPU) and train, checkpoint and resume, for both launchers:

* ``tools/dist_train.sh`` with ``NNODES=2``, ``NODE_RANK=0/1``, ``MASTER_ADDR`` and ``PORT``
  (torchrun; the toy Mask R-CNN of MMDetection);
* ``rest-dense train <detectron2 config> --num-machines 2 --machine-rank 0/1
  --dist-url tcp://127.0.0.1:PORT`` (the toy detectron2 Mask R-CNN).

Every process saves its parameters when training starts (after ``--resume`` loaded its
checkpoint) and when it ends (``_multinode_probe.py``): both "machines" must start the
resumed run from the checkpoint and end with bit-identical parameters, equal to the
checkpoint that rank 0 writes. Then the ways a user gets a multi-node launch wrong are
refused with a message that says so, before anything waits for a machine that never comes.

The runs are tiny (a 16..128-channel backbone with one block per stage, 2 + 2 iterations,
no evaluation) and take about a minute on two cores.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from rest_dense.distributed import find_free_port

from conftest import REPO

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).resolve().parent
PROBE = HERE / "_multinode_probe.py"
DET = REPO / "configs" / "toy" / "mask_rcnn_restv2_toy.py"
D2 = "detectron2/toy/mask_rcnn_restv2_toy.yaml"

TINY_MM = ["model.backbone.arch.embed_dims=[16,32,64,128]", "model.backbone.arch.depths=[1,1,1,1]",
           "model.neck.in_channels=[16,32,64,128]"]
TINY_D2 = ["MODEL.RESTV2.ARCH.EMBED_DIMS", "[16,32,64,128]", "MODEL.RESTV2.ARCH.DEPTHS",
           "[1,1,1,1]", "MODEL.FPN.OUT_CHANNELS", "32"]


# ------------------------------------------------------------------------------ helpers
def _env(subprocess_env: Dict[str, str], **extra: str) -> Dict[str, str]:
    env = dict(subprocess_env, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    for key in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "RANK", "WORLD_SIZE",
                "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _start(cmd: Sequence[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = f  # type: ignore[attr-defined]
    return proc


def _finish(procs: List[subprocess.Popen], timeout: float,
            stop_on_failure: bool = True) -> List[str]:
    """Wait for every process; return the logs. Once one of them fails (``stop_on_failure``),
    or at the deadline, the process groups left are killed (a node whose peer is gone would
    wait for it for the process group's timeout)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or (
                    stop_on_failure and any(c not in (None, 0) for c in codes)):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
            p.log_file.close()
    return [Path(p.log_file.name).read_text(errors="replace") for p in procs]


def _two_nodes(make_cmd, env_of, tmp: Path, tag: str, timeout: float = 150) -> List[str]:
    procs = [_start(make_cmd(rank), env_of(rank), tmp / f"{tag}-node{rank}.log")
             for rank in (0, 1)]
    logs = _finish(procs, timeout)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank} of {tag} exited {p.returncode}:\n{log[-5000:]}"
    return logs


def _params(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_params(path: Path, names) -> Dict[str, torch.Tensor]:
    from rest_dense.checkpoint_reader import read_model_checkpoint

    sd = read_model_checkpoint(path).state_dict
    return {n: sd[n] for n in names}


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} parameters differ, e.g. {differ[:3]}"


def _check_replicas(probe: Path, start_ckpt: Path, end_ckpt: Path) -> None:
    """Both ranks started the resumed run from ``start_ckpt`` and ended equal to each other
    and to ``end_ckpt``; training moved the parameters."""
    start = [_params(probe / f"start_rank{r}.pt") for r in (0, 1)]
    end = [_params(probe / f"end_rank{r}.pt") for r in (0, 1)]
    names = list(end[0])
    assert len(names) > 50
    _assert_same(start[0], _checkpoint_params(start_ckpt, names), "rank 0 at the resume")
    _assert_same(start[1], _checkpoint_params(start_ckpt, names), "rank 1 at the resume")
    _assert_same(end[0], end[1], "ranks 0 and 1 (two machines) after training")
    _assert_same(end[0], _checkpoint_params(end_ckpt, names), "rank 0 and the last checkpoint")
    moved = sum(not torch.equal(start[0][k], end[0][k]) for k in names)
    assert moved >= 0.5 * len(names), f"only {moved} of {len(names)} parameters trained"


# ------------------------------------------------------------------------------ mm: torchrun
def _mm_config(tmp: Path, probe: Path) -> Path:
    """The toy Mask R-CNN with the probe hook (a wrapper config, as a user's own would be)."""
    cfg = tmp / "mask_rcnn_probe.py"
    cfg.write_text(
        f"_base_ = [{str(DET)!r}]\n"
        "custom_imports = dict(imports=['rest_dense.mm', '_multinode_probe'], "
        "allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='ReplicaProbeHook', out_dir={str(probe)!r})]\n")
    return cfg


def _mm_options(root: Path) -> List[str]:
    r = f"{root}/"
    return TINY_MM + [
        f"train_dataloader.dataset.data_root={r}", f"val_dataloader.dataset.data_root={r}",
        f"test_dataloader.dataset.data_root={r}",
        f"val_evaluator.ann_file={r}annotations/instances_val.json",
        f"test_evaluator.ann_file={r}annotations/instances_val.json",
        "train_dataloader.batch_size=1", "train_cfg.val_begin=1000",
        "default_hooks.logger.interval=1", "default_hooks.checkpoint.interval=2"]


def _dist_train_cmd(config: Path, work: Path, options: Sequence[str], resume: bool = False):
    return ["bash", "tools/dist_train.sh", config, "1", "--work-dir", work, "--threads", "1",
            *(["--resume"] if resume else []), "--cfg-options", *options]


@pytest.mark.timeout(360)
def test_dist_train_sh_two_nodes_train_checkpoint_resume(make_toy_root, tmp_path,
                                                         subprocess_env):
    root = make_toy_root(num_train=2, num_val=2)
    work, probe = tmp_path / "work", tmp_path / "probe"
    config = _mm_config(tmp_path, probe)
    for phase, iters in (("train", 2), ("resume", 4)):
        port = str(find_free_port())

        def env_of(rank, port=port):
            return _env(subprocess_env, NNODES="2", NODE_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", PORT=port)

        logs = _two_nodes(
            lambda rank: _dist_train_cmd(config, work, _mm_options(root) + [
                f"train_cfg.max_iters={iters}"], resume=phase == "resume"),
            env_of, tmp_path, phase)
        assert "Distributed training: True" in logs[0] and "GPU number: 2" in logs[0], logs[0][-3000:]
        assert f"Iter(train) [{iters}/{iters}]" in logs[0], logs[0][-3000:]
        assert (work / f"iter_{iters}.pth").is_file()
        if phase == "train":
            assert not (work / ".rest-dense.lock").exists()  # released by rank 0
            # the config keeps one checkpoint: a copy for the comparison
            (tmp_path / "iter_2.pth").write_bytes((work / "iter_2.pth").read_bytes())
            continue
        for rank, log in enumerate(logs):  # both machines found the same checkpoint
            assert f"resuming from {work / 'iter_2.pth'}" in log, (rank, log[-3000:])
        assert "Iter(train) [3/4]" in logs[0] and "Iter(train) [1/4]" not in logs[0]
    _check_replicas(probe, tmp_path / "iter_2.pth", work / "iter_4.pth")

    # a work dir that machine 1 does not see (no shared file system): machine 0 would resume
    # while machine 1 starts from scratch; refused on every node before training
    port = str(find_free_port())
    procs = [_start(_dist_train_cmd(config, work if rank == 0 else tmp_path / "local1",
                                    _mm_options(root) + ["train_cfg.max_iters=6"], resume=True),
                    _env(subprocess_env, NNODES="2", NODE_RANK=str(rank),
                         MASTER_ADDR="127.0.0.1", PORT=port), tmp_path / f"unshared{rank}.log")
             for rank in (0, 1)]
    logs = _finish(procs, 150, stop_on_failure=False)  # both refuse: each says so
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode not in (0, None, -9), (rank, p.returncode, log[-3000:])
        assert "would start from different checkpoints" in log, (rank, log[-3000:])
        assert "rank 0: resume iter_4.pth" in log and "rank 1: nothing" in log, log[-3000:]
    assert not (work / "iter_6.pth").exists()


# --------------------------------------------------------------------- detectron2 launcher
def _d2_cmd(rank: int, work: Path, root: Path, port: str, iters: int, resume: bool,
            machines: int = 2):
    return [sys.executable, PROBE, "train", D2, "--num-gpus", "1", "--num-machines",
            str(machines), "--machine-rank", str(rank), "--dist-url", f"tcp://127.0.0.1:{port}",
            "--toy-root", root, "--work-dir", work, "--threads", "1",
            *(["--resume"] if resume else []),
            "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(iters),
            "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST",
            "()", "TEST.EVAL_PERIOD", "0", *TINY_D2]


@pytest.mark.timeout(360)
def test_detectron2_two_machines_train_checkpoint_resume(make_toy_root, tmp_path,
                                                         subprocess_env):
    root = make_toy_root(num_train=2, num_val=2)
    work, probe = tmp_path / "work", tmp_path / "probe"
    env = _env(subprocess_env, REST_DENSE_TEST_PROBE_DIR=str(probe))
    for phase, iters in (("train", 2), ("resume", 4)):
        port = str(find_free_port())
        logs = _two_nodes(lambda rank: _d2_cmd(rank, work, root, port, iters, phase == "resume"),
                          lambda rank: env, tmp_path, phase)
        assert (work / "model_final.pth").is_file() and (work / "log.txt.rank1").is_file()
        assert not (work / ".rest-dense.lock").exists()  # machine 0's lock, released
        ckpt = torch.load(work / "model_final.pth", map_location="cpu", weights_only=False)
        assert ckpt["iteration"] == iters - 1, ckpt["iteration"]
        if phase == "train":
            # kept outside the output folder, where --resume would find it
            (tmp_path / "d2_iter2.pth").write_bytes((work / "model_final.pth").read_bytes())
            continue
        for name in ("log.txt", "log.txt.rank1"):  # both machines loaded the checkpoint
            text = (work / name).read_text()
            assert f"[Checkpointer] Loading from {work / 'model_final.pth'}" in text, text[-3000:]
            assert "Starting training from iteration 2" in text, (name, text[-3000:])
    _check_replicas(probe, tmp_path / "d2_iter2.pth", work / "model_final.pth")


# ------------------------------------------------------------------ a launch gone wrong
@pytest.fixture
def busy_port():
    """A port that a program listens on (as a second job's master would)."""
    import socket

    s = socket.socket()
    s.bind(("", 0))
    s.listen(1)
    yield str(s.getsockname()[1])
    s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "PORT": "29500"},
     "multi-node jobs need NODE_RANK set on every node"),
    ({"NNODES": "2", "NODE_RANK": "1", "PORT": "29500"}, "multi-node jobs need MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1", "PORT": "29500"},
     "NODE_RANK must be an integer in 0..1 (NNODES=2), got '2'"),
    ({"NNODES": "2", "NODE_RANK": "-1", "MASTER_ADDR": "10.0.0.1", "PORT": "29500"},
     "NODE_RANK must be an integer in 0..1"),
    ({"NNODES": "two", "NODE_RANK": "0"}, "NNODES must be a positive integer"),
    ({"NNODES": "0"}, "NNODES must be a positive integer"),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "PORT": "99999"},
     "PORT must be a TCP port number (1..65535), got '99999'"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "PORT": "<busy>"},
     "is in use on this machine"),
    ({"NNODES": "1", "PORT": "<busy>"}, "is in use on this machine"),
], ids=["no-node-rank", "no-master-addr", "node-rank-too-big", "node-rank-negative",
        "nnodes-word", "nnodes-zero", "port-out-of-range", "port-in-use-node0",
        "port-in-use-one-node"])
@pytest.mark.parametrize("script", ["dist_train.sh", "dist_test.sh"])
def test_launcher_scripts_refuse_a_wrong_multinode_setup(script, env, message, busy_port,
                                                         subprocess_env):
    """Refused at once (exit 2) with the variable and what it must be: with a default there,
    the node would wait for the others (or for a master on its own loopback) until the
    rendezvous times out."""
    env = {k: (busy_port if v == "<busy>" else v) for k, v in env.items()}
    args = ["cfg.py", "1"] if script == "dist_train.sh" else ["cfg.py", "ck.pth", "1"]
    proc = subprocess.run(["bash", str(REPO / "tools" / script), *args],
                          env=_env(subprocess_env, **env), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,message", [
    (["--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://127.0.0.1:29500"],
     "--machine-rank 2 is not in 0..1"),
    (["--num-machines", "2", "--machine-rank", "-1", "--dist-url", "tcp://127.0.0.1:29500"],
     "--machine-rank -1 is not in 0..1"),
    (["--num-machines", "2", "--machine-rank", "1"], "--num-machines 2 needs --dist-url"),
    (["--num-machines", "2", "--machine-rank", "1", "--dist-url", "auto"],
     "--num-machines 2 needs --dist-url tcp://HOST:PORT"),
    (["--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://10.0.0.1"],
     "is not tcp://HOST:PORT"),
    (["--num-machines", "0"], "must be at least 1"),
], ids=["rank-too-big", "rank-negative", "no-dist-url", "dist-url-auto", "dist-url-no-port",
        "no-machines"])
def test_detectron2_refuses_a_wrong_machine_setup(args, message, tmp_path, capsys):
    from rest_dense.cli import main as cli

    code = cli(["train", D2, "--work-dir", str(tmp_path / "w"), *args, "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "w" / ".rest-dense.lock").exists()


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, Path(proc.log_file.name).read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher", ["dist_train.sh", "detectron2"])
def test_second_node_started_with_rank_0_is_refused(launcher, make_toy_root, tmp_path,
                                                    subprocess_env):
    """Two launches both given node / machine rank 0 (the second meant to be 1): the second
    is refused at once, naming the cause, while the first waits for its peer."""
    import socket

    root = make_toy_root(num_train=2, num_val=2)
    work, port = tmp_path / "work", str(find_free_port())
    if launcher == "detectron2":
        cmd = _d2_cmd(0, work, root, port, 2, False)
        env = _env(subprocess_env)
    else:
        cmd = _dist_train_cmd(DET, work, _mm_options(root) + ["train_cfg.max_iters=2"])
        env = _env(subprocess_env, NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", PORT=port)
    first = _start(cmd, env, tmp_path / "first.log")
    try:
        if launcher == "detectron2":  # machine 0 holds the output folder
            _wait_for((work / ".rest-dense.lock").exists, first)
            message = f"in use by another live training (pid {first.pid}"
        else:  # node 0's torchrun listens on PORT
            def listening():
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", int(port))) == 0
            _wait_for(listening, first)
            message = f"PORT {port} is in use on this machine"
        second = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and message in second.stderr, second.stderr[-3000:]
        if launcher == "detectron2":
            assert "--machine-rank 0" in second.stderr
    finally:
        _finish([first], 0)
