"""The toy dataset registered in detectron2: a short CPU training run of the shipped toy config
(through RestTrainer, with COCO evaluation) clearly improves box AP."""
import importlib
import json
import os

import pytest

from _d2_utils import config_path  # noqa: F401,I100

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from rest_dense.d2 import register_toy_datasets  # noqa: E402
from rest_dense.d2.engine import RestTrainer, setup_yaml_config  # noqa: E402

toy = importlib.import_module("rest_dense.data.toy")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    toy.generate_toy_dataset(root, num_train=48, num_val=12)
    return root


def test_register_toy_datasets(toy_root):
    names = register_toy_datasets(toy_root, prefix="d2test_toy")
    assert set(names) == {"d2test_toy_train", "d2test_toy_val"}
    register_toy_datasets(toy_root, prefix="d2test_toy")  # idempotent
    dicts = DatasetCatalog.get("d2test_toy_val")
    assert len(dicts) == 12 and all(d["annotations"] for d in dicts)
    assert MetadataCatalog.get("d2test_toy_val").thing_classes == ["circle", "square", "triangle"]


def test_toy_training_improves_ap(toy_root, tmp_path):
    register_toy_datasets(toy_root, prefix="d2test_toy")
    cfg = setup_yaml_config(config_path("toy/mask_rcnn_restv2_toy.yaml"), [
        "MODEL.DEVICE", "cpu",
        "DATASETS.TRAIN", "('d2test_toy_train',)", "DATASETS.TEST", "('d2test_toy_val',)",
        "SOLVER.MAX_ITER", "50", "SOLVER.STEPS", "(40,)", "SOLVER.WARMUP_ITERS", "10",
        "SOLVER.BASE_LR", "0.002", "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    trainer = RestTrainer(cfg)  # creates OUTPUT_DIR
    trainer.resume_or_load(resume=False)
    before = RestTrainer.test(cfg, trainer.model)["bbox"]["AP"]
    after = trainer.train()["bbox"]["AP"]  # evaluated at the end of training
    with open(tmp_path / "out" / "metrics.json") as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert losses[-1] < losses[0], losses
    print(f"toy bbox AP: untrained {before:.2f}, after 50 iterations {after:.2f}")
    assert after > before + 10.0, (before, after)  # measured: 0.0 -> 30.0
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
