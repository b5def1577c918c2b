"""Training survives being killed (MMDetection, MMSegmentation, detectron2).

Real ``rest-dense train`` processes on the toy configs (tiny backbone, 8 toy images,
6 iterations, a checkpoint every 2) are SIGKILLed at chosen points and resumed with
``--resume``:

1. killed while the second checkpoint is being written (``REST_DENSE_TEST_SAVE_PAUSE``
   holds the save between the complete temporary file and its rename): the first
   checkpoint and the ``last_checkpoint`` pointer stay intact, the second never appears
   under its name;
2. resumed from there and killed between two saves, after the log shows the iterations
   (mmdet, detectron2; mmseg runs mmdet's checkpoint code and skips this step): the
   interrupted save's temporary file is gone;
3. the work dir is copied elsewhere (its ``last_checkpoint`` names files of the original
   folder) and a damaged "newer" checkpoint is planted in the copy; ``--resume`` there
   skips the damaged file with a warning naming it, resumes from the copy's own newest
   good checkpoint and trains to the end: the final checkpoint holds ``max_iters`` and
   loads without trust, and the original folder is left alone.

Plus, in-process: the toy configs' schedules scale with an overridden ``max_iters``,
``--resume`` with nothing to resume from says so, and the building blocks (atomic writes,
stale temporaries, resume candidates of moved folders, fallback past damaged files, the
order of work of the atomic mmengine checkpoint hook).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch

from rest_dense import safe_load
from rest_dense.run_files import SAVE_PAUSE_ENV, resume_candidates

from conftest import REPO, TINY_ARCH, without_logging_errors

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(1200, func_only=True)

MAX_ITERS = 6
DIMS = list(TINY_ARCH["embed_dims"])
TINY_MM = [f"model.backbone.arch.embed_dims={tuple(DIMS)}",
           f"model.backbone.arch.depths={tuple(TINY_ARCH['depths'])}"]
COMMON_MM = ["default_hooks.checkpoint.interval=2", "default_hooks.logger.interval=1",
             "train_dataloader.batch_size=1", "val_cfg=None", "val_dataloader=None",
             "val_evaluator=None"]


# ----------------------------------------------------------------------------- the jobs
class Framework:
    """How to start, watch and check a training job of one framework."""

    name = ""
    #: when to kill the job that has written the second checkpoint
    iterations_after_second_save = 0

    def checkpoint(self, n: int) -> str:
        """The file of the n-th save (one every 2 iterations)."""
        raise NotImplementedError

    def command(self, work: Path, toy_root: Path, resume: bool) -> List[str]:
        raise NotImplementedError

    def iterations_done(self, log: str) -> int:
        raise NotImplementedError

    def resumed_at(self, log: str) -> Optional[int]:
        """The iteration the job continued from, read from its log."""
        raise NotImplementedError

    def final_iteration(self, work: Path) -> int:
        raise NotImplementedError


class MM(Framework):
    iterations_after_second_save = 5

    def __init__(self, name: str, config: str, extra: List[str]):
        self.name, self.config, self.extra = name, config, extra

    def checkpoint(self, n: int) -> str:
        return f"iter_{2 * n}.pth"

    def command(self, work, toy_root, resume):
        root = f"{toy_root}/"
        return [sys.executable, "-m", "rest_dense.cli", "train", self.config, "--work-dir",
                str(work), "--threads", "1", *(["--resume"] if resume else []),
                "--cfg-options", f"train_cfg.max_iters={MAX_ITERS}", *TINY_MM, *COMMON_MM,
                f"train_dataloader.dataset.data_root={root}", *self.extra]

    def iterations_done(self, log):
        done = re.findall(r"Iter\(train\) \[\s*(\d+)/", log)
        return int(done[-1]) if done else 0

    def resumed_at(self, log):
        found = re.search(r"resumed epoch: \d+, iter: (\d+)", log)
        return int(found.group(1)) if found else None

    def final_iteration(self, work):
        ckpt = safe_load.load_checkpoint_file(work / f"iter_{MAX_ITERS}.pth", trusted=False)
        assert ckpt["state_dict"] and ckpt["optimizer"]["state"]
        return int(ckpt["meta"]["iter"])


class D2(Framework):
    name = "detectron2"
    iterations_after_second_save = 4  # its log tells iterations at saves only

    def checkpoint(self, n: int) -> str:
        return f"model_{2 * n - 1:07d}.pth"

    def command(self, work, toy_root, resume):
        return [sys.executable, "-m", "rest_dense.cli", "train",
                "detectron2/toy/mask_rcnn_restv2_toy.yaml", "--work-dir", str(work),
                "--threads", "1", "--toy-root", str(toy_root), *(["--resume"] if resume else []),
                "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", str(MAX_ITERS),
                "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "1",
                "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
                "MODEL.RESTV2.ARCH.EMBED_DIMS", str(DIMS),
                "MODEL.RESTV2.ARCH.DEPTHS", str(list(TINY_ARCH["depths"]))]

    def iterations_done(self, log):
        # detectron2 logs every 20 iterations: count the checkpoints saved instead
        saved = re.findall(r"Saving checkpoint to .*model_(\d+)\.pth", log)
        return int(saved[-1]) + 1 if saved else 0

    def resumed_at(self, log):
        found = re.findall(r"Starting training from iteration (\d+)", log)
        return int(found[-1]) if found else None

    def final_iteration(self, work):
        ckpt = safe_load.load_checkpoint_file(work / "model_final.pth", trusted=False)
        assert ckpt["model"] and ckpt["trainer"]["_trainer"]["optimizer"]["state"]
        return int(ckpt["iteration"]) + 1  # detectron2 counts from 0


FRAMEWORKS = {
    "mmdet": MM("mmdet", "toy/mask_rcnn_restv2_toy.py",
                [f"model.neck.in_channels={DIMS}"]),
    "mmseg": MM("mmseg", "toy/upernet_restv2_toy.py",
                [f"model.decode_head.in_channels={DIMS}",
                 f"model.auxiliary_head.in_channels={DIMS[2]}",
                 "train_dataloader.batch_size=2"]),  # BatchNorm after 1x1 pooling
    "detectron2": D2(),
}


class Job:
    """A training process whose output goes to a file."""

    def __init__(self, cmd: List[str], log: Path, env: dict, cwd: Path):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return "\n".join(self.text().splitlines()[-40:])

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (rc {self.proc.returncode}) before {what}:\n"
                            f"{self.tail()}")
            if time.monotonic() > end:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._out.close()

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not finish in {timeout} s:\n{self.tail()}")
        self._out.close()
        return rc


def _temporaries(folder: Path, name: str) -> List[Path]:
    return sorted(folder.glob(f".{name}.tmp-*"))


def kill_and_resume(fw: Framework, toy_root: Path, tmp_path: Path, subprocess_env: dict,
                    kill_between_saves: bool = True) -> None:
    """The runs of the module docstring for one framework (step 2 only with
    ``kill_between_saves``); fails the test with the job's log on any deviation."""
    work = tmp_path / "run"
    first, second = fw.checkpoint(1), fw.checkpoint(2)

    # 1. killed in the middle of writing the second checkpoint
    tmp_path.mkdir()
    job = Job(fw.command(work, toy_root, resume=False), tmp_path / "1.log",
              {**subprocess_env, SAVE_PAUSE_ENV: "1.5"}, tmp_path)
    job.wait_for(f"the save of {second}", lambda: bool(_temporaries(work, second)))
    job.kill()
    partial = _temporaries(work, second)
    assert partial and not (work / second).exists(), sorted(os.listdir(work))
    assert (work / first).is_file()
    assert (work / "last_checkpoint").read_text().strip().endswith(first)
    assert resume_candidates(work, r"(?:iter|model)_(\d+)\.pth") == [str(work / first)]
    good = 1  # the newest complete checkpoint (number of saves)

    # 2. resumed (from the first checkpoint), killed between two saves
    if kill_between_saves:
        job = Job(fw.command(work, toy_root, resume=True), tmp_path / "2.log", subprocess_env,
                  tmp_path)
        job.wait_for("the second checkpoint and one more iteration",
                     lambda: (work / second).is_file()
                     and fw.iterations_done(job.text()) >= fw.iterations_after_second_save)
        job.kill()
        log = job.text()
        assert fw.resumed_at(log) == 2, log[-3000:]
        assert not any(p.exists() for p in partial), "the interrupted save's temporary file is left"
        good = 2

    # 3. a copy of the work dir with a damaged newer checkpoint resumes to the end
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    damaged = copy / fw.checkpoint(good + 1)
    data = (copy / fw.checkpoint(good)).read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # truncated
    before = sorted(os.listdir(work))
    job = Job(fw.command(copy, toy_root, resume=True), tmp_path / "3.log", subprocess_env,
              tmp_path)
    assert job.finish() == 0, job.tail()
    log = job.text()
    assert re.search(rf"skipping checkpoint {re.escape(str(damaged))}", log), log[-3000:]
    assert fw.resumed_at(log) == 2 * good, log[-3000:]
    assert fw.final_iteration(copy) == MAX_ITERS
    assert sorted(os.listdir(work)) == before, "resuming the copy wrote into the original"
    assert not list(copy.glob(".*.tmp-*"))


@pytest.mark.slow
def test_killed_training_resumes_to_the_end(toy_root, tmp_path, subprocess_env):
    """mmdet, mmseg and detectron2 side by side (their jobs are mostly start-up time)."""
    import rest_dense.mm  # noqa: F401  (HistoryBuffer on the allow-list, to read the results)

    with ThreadPoolExecutor(len(FRAMEWORKS)) as pool:
        # mmseg shares mmdet's checkpoint code (mmengine): it skips the second kill
        futures = {name: pool.submit(kill_and_resume, fw, toy_root, tmp_path / name,
                                     subprocess_env, kill_between_saves=name != "mmseg")
                   for name, fw in FRAMEWORKS.items()}
    failures = []
    for name, future in futures.items():
        try:
            future.result()
        except BaseException as err:  # pytest.fail raises a BaseException
            failures.append(f"[{name}] {type(err).__name__}: {err}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


# ----------------------------------------------------------------------------- in-process
def test_toy_schedules_scale_with_max_iters():
    from rest_dense.mm.runner import train_config

    cfg = train_config("toy/mask_rcnn_restv2_toy.py", work_dir="/nonexistent/w",
                       cfg_options=["train_cfg.max_iters=60", "default_hooks.logger.interval=3"])
    assert cfg.train_cfg.max_iters == 60 and cfg.train_cfg.val_interval == 60
    assert cfg.default_hooks.checkpoint.interval == 15            # 150 of 600
    assert cfg.default_hooks.logger.interval == 3                 # set explicitly: kept
    warmup, cosine = cfg.param_scheduler
    assert (warmup.begin, warmup.end) == (0, 10)                  # 100 of 600
    assert (cosine.begin, cosine.end, cosine.T_max) == (10, 60, 50)
    full = train_config("toy/upernet_restv2_toy.py", work_dir="/nonexistent/w")
    assert full.default_hooks.checkpoint.interval == 150 and full.param_scheduler[0].end == 50
    other = train_config("upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py",
                         work_dir="/nonexistent/w", cfg_options=["train_cfg.max_iters=100"])
    assert other.train_cfg.max_iters == 100                       # not opted in: only that
    assert other.default_hooks.checkpoint.interval == 16000

    from rest_dense.d2.engine import setup_yaml_config

    d2 = setup_yaml_config(str(Path(__file__).parents[2] / "configs/detectron2/toy/"
                               "mask_rcnn_restv2_toy.yaml"),
                           ["SOLVER.MAX_ITER", "30", "SOLVER.WARMUP_ITERS", "7"])
    assert d2.SOLVER.MAX_ITER == 30 and d2.SOLVER.STEPS == (25,)
    assert d2.SOLVER.CHECKPOINT_PERIOD == 10 and d2.SOLVER.WARMUP_ITERS == 7


def test_lr_reaches_its_peak_in_a_scaled_run():
    """A warm-up of 100 of 600 iterations scaled to 8 iterations still reaches the lr (a
    1-iteration LinearLR would stay at its start_factor)."""
    import torch
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR

    from rest_dense.mm.runner import train_config

    cfg = train_config("toy/upernet_restv2_toy.py", work_dir="/nonexistent/w",
                       cfg_options=["train_cfg.max_iters=8"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheds = []
    for s in cfg.param_scheduler:
        kw = {k: v for k, v in s.items() if k != "type"}
        scheds.append({"LinearLR": LinearLR, "CosineAnnealingLR": CosineAnnealingLR}[s.type](
            opt, **kw))
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        for s in scheds:
            s.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[1] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] < 2e-4


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    from mmengine.logging import MMLogger

    from rest_dense.mm.runner import train_config

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        cfg = train_config("toy/upernet_restv2_toy.py", work_dir=tmp_path / "empty",
                           resume=True)
    finally:
        logger.removeHandler(handler)
    assert cfg.resume is False and not cfg.get("load_from")
    assert any("no checkpoint in" in m and "starting from scratch" in m for m in messages), messages


def test_d2_resume_with_nothing_to_resume_says_so(tmp_path, caplog):
    from torch import nn

    from rest_dense.d2.checkpointer import RestDetectionCheckpointer

    ckpt = RestDetectionCheckpointer(nn.Linear(2, 2), save_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume_or_load("", resume=True) == {}
    assert "no checkpoint in" in caplog.text and "starting from scratch" in caplog.text
    assert not ckpt.has_checkpoint()


# ----------------------------------------------------------------------------- building blocks
def test_atomic_save_leaves_old_file_or_new_one(tmp_path, monkeypatch):
    from rest_dense import run_files

    path = tmp_path / "ckpt.pth"
    run_files.atomic_save({"v": 1}, path)
    assert run_files.atomic_save({"v": 2}, path) == str(path)
    assert safe_load.load_checkpoint_file(path)["v"] == 2

    def broken(obj, f):  # dies half-way through writing
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_files.torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        run_files.atomic_save({"v": 3}, path)
    assert safe_load.load_checkpoint_file(path)["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # no temporary left
    run_files.atomic_write_text(tmp_path / "last_checkpoint", "ckpt.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "ckpt.pth"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    from rest_dense import run_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".iter_4.pth.tmp-{dead}-ab12cd34"
    staged = tmp_path / f".m.onnx.tmp-{dead}-ab12cd34.onnx"  # a StagedFile's, format suffix
    alive = tmp_path / f".iter_6.pth.tmp-{os.getpid()}-ab12cd34"
    other = tmp_path / ".hidden.tmp-x"
    for p in (stale, staged, alive, other):
        p.write_bytes(b"x")
    assert sorted(run_files.remove_stale_temporaries(tmp_path)) == sorted([str(stale),
                                                                          str(staged)])
    assert alive.exists() and other.exists()
    assert run_files.remove_stale_temporaries(tmp_path / "missing") == []


def test_staged_file_is_removed_on_sigterm(tmp_path):
    """A command killed by SIGTERM while its output is staged (a scheduler's cancel,
    `kill`) leaves neither the temporary file nor a file under the final name."""
    import signal

    script = (
        "import sys, time\n"
        "from rest_dense.run_files import StagedFile\n"
        f"with StagedFile({str(tmp_path / 'out.onnx')!r}, '.onnx') as s:\n"
        "    open(s.path, 'wb').write(b'x' * 1000)\n"
        "    print('staged', flush=True)\n"
        "    time.sleep(60)\n"
        "    s.commit()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    assert len(list(tmp_path.iterdir())) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_resume_candidates_and_pointer_of_a_moved_folder(tmp_path):
    from rest_dense import run_files

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for n in (2, 4, 10):
        run_files.atomic_save({"meta": {"iter": n}}, old / f"iter_{n}.pth")
    (old / "best_mIoU_iter_4.pth").write_bytes(b"not a candidate")
    run_files.atomic_write_text(old / "last_checkpoint", str(old / "iter_4.pth"))  # lags
    pattern = r"(?:iter|epoch)_(\d+)\.pth"
    assert run_files.resume_candidates(old, pattern) == [
        str(old / "iter_10.pth"), str(old / "iter_4.pth"), str(old / "iter_2.pth")]
    shutil.copytree(old, new)  # the pointer still names old/iter_4.pth, which exists
    assert run_files.read_pointer(new) == str(new / "iter_4.pth")
    shutil.rmtree(old)
    assert run_files.read_pointer(new) == str(new / "iter_4.pth")
    (new / "last_checkpoint").write_text("/elsewhere/custom_name.pth")
    assert run_files.read_pointer(new) is None
    (new / "custom_name.pth").write_bytes(b"x")
    assert run_files.resume_candidates(new, pattern)[0] == str(new / "custom_name.pth")
    assert run_files.resume_candidates(tmp_path / "missing", pattern) == []
    (new / "last_checkpoint").write_bytes(b"\x00\xff garbage")  # not text: no pointer
    assert run_files.read_pointer(new) is None
    assert run_files.resume_candidates(new, pattern)[0] == str(new / "iter_10.pth")
    # detectron2's layout: a file name, model_final above the numbered ones
    d2 = tmp_path / "d2"
    for name in ("model_0000009.pth", "model_final.pth", "model_0000019.pth"):
        run_files.atomic_save({}, d2 / name)
    (d2 / "last_checkpoint").write_text("model_final.pth")
    assert [Path(p).name for p in run_files.resume_candidates(
        d2, r"model_(\d+)\.pth", final_names=["model_final.pth"])] == [
        "model_final.pth", "model_0000019.pth", "model_0000009.pth"]


def test_select_resume_checkpoint(tmp_path, caplog):
    from rest_dense import run_files

    good = tmp_path / "iter_2.pth"
    run_files.atomic_save({"meta": {"iter": 2}}, good)
    bad = tmp_path / "iter_4.pth"
    bad.write_bytes(good.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="rest_dense.run_files"):
        assert run_files.select_resume_checkpoint([str(bad), str(good)]) == str(good)
    assert f"skipping checkpoint {bad}" in caplog.text and f"resuming from {good}" in caplog.text
    assert run_files.select_resume_checkpoint([]) is None
    with pytest.raises(run_files.ResumeError, match="iter_4.pth"):
        run_files.select_resume_checkpoint([str(bad)])
    foreign = tmp_path / "iter_6.pth"  # complete, but needs full unpickling: not skipped
    torch.save({"x": logging.Handler}, foreign)
    with pytest.raises(safe_load.UntrustedCheckpointError, match="--trust-checkpoint"):
        run_files.select_resume_checkpoint([str(foreign), str(good)])


def test_atomic_checkpoint_hook_removes_the_old_checkpoint_last(tmp_path, monkeypatch):
    """mmengine deletes the oldest of max_keep_ckpts before writing the new checkpoint; the
    atomic hook only once the new one and the pointer are in place."""
    from mmengine.hooks import CheckpointHook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    from rest_dense.mm.run_files import AtomicCheckpointHook, make_checkpoint_hooks_atomic

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x, mode="loss"):
            return {"loss": (self.w * x.float()[:, None]).sum()}

    runner = Runner(
        model=Tiny(), work_dir=str(tmp_path / "w"), experiment_name="atomic_hook",
        train_dataloader=dict(dataset=[dict(x=float(i)) for i in range(4)], batch_size=2, num_workers=0,
                              sampler=dict(type="InfiniteSampler"),
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=3),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=False,
                                           max_keep_ckpts=1), logger=None),
        default_scope="mmengine")
    assert make_checkpoint_hooks_atomic(runner) == 1
    hook = next(h for h in runner.hooks if isinstance(h, CheckpointHook))
    assert type(hook) is AtomicCheckpointHook
    removed = []
    real_remove = os.remove

    def remove(path):
        if str(path).endswith(".pth"):
            step = int(re.search(r"iter_(\d+)", str(path)).group(1))
            newer = tmp_path / "w" / f"iter_{step + 1}.pth"
            assert newer.is_file(), "removed before the new checkpoint was complete"
            assert (tmp_path / "w" / "last_checkpoint").read_text().endswith(newer.name)
            removed.append(step)
        real_remove(path)

    monkeypatch.setattr(os, "remove", remove)
    runner.train()
    assert removed == [1, 2]
    assert sorted(p.name for p in (tmp_path / "w").glob("*.pth")) == ["iter_3.pth"]


def test_config_formatting_is_memoized(monkeypatch):
    """mmengine formats the config with yapf for every checkpoint; the cache keeps the text
    identical and formats it once."""
    import mmengine.config.config as mm_config

    from rest_dense.mm.utils import install_config_format_cache
    from rest_dense.mm.runner import train_config

    cfg = train_config("toy/upernet_restv2_toy.py", work_dir="/nonexistent/w")
    calls = []
    original = mm_config.FormatCode
    reference = cfg.pretty_text

    def counting(text, *args, **kwargs):
        calls.append(text)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(mm_config, "FormatCode", counting)
    install_config_format_cache()
    assert cfg.pretty_text == reference and cfg.pretty_text == reference
    assert len(calls) == 1
    install_config_format_cache()  # idempotent
    cfg.train_cfg.max_iters = 7
    assert "max_iters=7" in cfg.pretty_text and len(calls) == 2


def test_training_never_writes_over_its_own_config(tmp_path, capsys):
    """--work-dir = the config's folder: training would replace the user's config with the
    config as run (mmengine: <work dir>/<config name>; detectron2: <output dir>/config.yaml)."""
    from rest_dense.cli import main as cli

    mm = tmp_path / "mm" / "my.py"
    mm.parent.mkdir()
    shutil.copy(REPO / "configs/toy/mask_rcnn_restv2_toy.py", mm)
    d2 = tmp_path / "d2" / "config.yaml"
    d2.parent.mkdir()
    base = REPO / "configs/detectron2/Base-RCNN-FPN-ResTv2.yaml"
    d2.write_text((REPO / "configs/detectron2/toy/mask_rcnn_restv2_toy.yaml").read_text()
                  .replace('"../Base-RCNN-FPN-ResTv2.yaml"', f'"{base}"'))
    for config, extra in ((mm, ["train_cfg.max_iters=2"]),
                          (d2, ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2"])):
        before = config.read_bytes()
        code = cli(["train", str(config), "--work-dir", str(config.parent), *extra])
        err = capsys.readouterr().err
        assert code == 2 and f"holds the config file {config}" in err and "would overwrite" in err, err
        assert config.read_bytes() == before
        assert sorted(p.name for p in config.parent.iterdir()) == [config.name]


def test_launcher_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    from rest_dense.cli import main as cli

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code = cli(["train", "toy/mask_rcnn_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "--launcher", "pytorch"])
    err = without_logging_errors(capsys.readouterr().err)
    assert code == 2 and "start the job with torchrun" in err and "Traceback" not in err, err


def test_iteration_counts_past_a_c_int_are_refused(tmp_path, capsys):
    """2**64 iterations crashed after the first one (the loggers' ETA takes a C int)."""
    from rest_dense.cli import main as cli

    huge = str(2 ** 64)
    for args in (["toy/mask_rcnn_restv2_toy.py", f"train_cfg.max_iters={huge}"],
                 ["detectron2/toy/mask_rcnn_restv2_toy.yaml", "MODEL.DEVICE", "cpu",
                  "SOLVER.MAX_ITER", huge]):
        code = cli(["train", args[0], "--work-dir", str(tmp_path / "w"), *args[1:]])
        err = capsys.readouterr().err
        assert code == 2 and "must be at most 2147483647" in err, err
        assert not (tmp_path / "w").exists() or not list((tmp_path / "w").glob("*.pth"))


def test_resume_or_test_with_a_folder_names_it(tmp_path, capsys):
    from rest_dense.cli import main as cli

    code = cli(["train", "toy/mask_rcnn_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory, not a file" in err and "--resume without a value" in err
    code = cli(["test", "toy/mask_rcnn_restv2_toy.py", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint '{tmp_path}' is a directory, not a file" in err, err


@pytest.mark.parametrize("command", ["train", "test"])
def test_a_dataset_without_samples_is_named(tmp_path, capsys, command):
    """An MMEngine dataset whose annotation file lists no images (or none left after
    filter_cfg) failed in numpy ("need at least one array to concatenate"), naming nothing."""
    import json

    from rest_dense.cli import main as cli

    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    classes = [{"id": i + 1, "name": n} for i, n in enumerate(("square", "circle", "triangle"))]
    (root / "annotations" / "empty.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": classes}))
    sets = ("train_dataloader", "val_dataloader", "test_dataloader")
    options = [f"{s}.dataset.{k}={v}" for s in sets
               for k, v in (("data_root", f"{root}/"), ("ann_file", "annotations/empty.json"))]
    options.append(f"val_evaluator.ann_file={root}/annotations/empty.json")
    options.append(f"test_evaluator.ann_file={root}/annotations/empty.json")
    checkpoint = tmp_path / "model.pth"
    if command == "test":
        from rest_dense.configs import get_config_path
        from rest_dense.mm.utils import build_model, load_config

        model = build_model(load_config(str(get_config_path("toy/mask_rcnn_restv2_toy.py"))))
        torch.save({"state_dict": model.state_dict(), "meta": {}}, checkpoint)
    argv = (["train", "toy/mask_rcnn_restv2_toy.py", "--work-dir", str(tmp_path / "w")]
            if command == "train" else
            ["test", "toy/mask_rcnn_restv2_toy.py", str(checkpoint), "--work-dir",
             str(tmp_path / "w")])
    code = cli([*argv, "--cfg-options", *options])
    err = capsys.readouterr().err
    assert code != 0
    assert "dataset CocoDataset holds no samples" in err and "annotations/empty.json" in err, err
    assert "need at least one array" not in err


def test_class_names_that_match_no_category_are_named(tmp_path, capsys, toy_root):
    """A COCO file of one's own whose category names differ from the config's classes
    leaves the dataset empty: the message says so, naming both, instead of blaming the
    annotations."""
    import json

    from rest_dense.cli import main as cli

    data = json.loads((toy_root / "annotations" / "instances_train.json").read_text())
    for category in data["categories"]:
        category["name"] = "pet_" + category["name"]
    ann = tmp_path / "renamed.json"
    ann.write_text(json.dumps(data))
    code = cli(["train", "toy/mask_rcnn_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "--cfg-options", f"train_dataloader.dataset.data_root={toy_root}/",
                f"train_dataloader.dataset.ann_file={ann}"])
    err = without_logging_errors(capsys.readouterr().err)
    assert code != 0 and "none of its classes ['circle', 'square', 'triangle']" in err, err
    assert str(ann) in err and "pet_circle" in err and "metainfo=dict(classes=" in err
    assert "Traceback" not in err


def test_a_segmentation_folder_without_images_is_named(tmp_path, capsys):
    from rest_dense.cli import main as cli

    root = tmp_path / "seg"
    for sub in ("images/training", "annotations/training"):
        (root / sub).mkdir(parents=True)
    (root / "images" / "training" / "notes.txt").write_text("not an image")
    code = cli(["train", "toy/upernet_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "--cfg-options", f"train_dataloader.dataset.data_root={root}/"])
    err = capsys.readouterr().err
    assert code != 0 and "dataset BaseSegDataset holds no samples" in err, err
    assert f"{root}/images/training" in err and "need at least one array" not in err
