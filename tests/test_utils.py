"""Small shared helpers (rest_dense.utils)."""
import warnings

import os

import pytest

from rest_dense.utils import env_var


def test_env_var_one_prefix_and_the_deprecated_spelling(monkeypatch):
    monkeypatch.delenv("REST_DENSE_TOY_ROOT", raising=False)
    monkeypatch.delenv("RESTDENSE_TOY_ROOT", raising=False)
    assert env_var("TOY_ROOT") is None and env_var("TOY_ROOT", "data/toy") == "data/toy"
    monkeypatch.setenv("RESTDENSE_TOY_ROOT", "/old")
    with pytest.warns(DeprecationWarning, match="RESTDENSE_TOY_ROOT is deprecated; set "
                                                "REST_DENSE_TOY_ROOT"):
        assert env_var("TOY_ROOT", "data/toy") == "/old"
    monkeypatch.setenv("REST_DENSE_TOY_ROOT", "/new")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling wins, silently
        assert env_var("TOY_ROOT") == "/new" and env_var("REST_DENSE_TOY_ROOT") == "/new"



def test_number_argument_types_name_the_bad_value():
    import argparse

    from rest_dense.utils import fraction, non_negative_float, positive_int

    assert positive_int("3") == 3 and non_negative_float("0") == 0.0 and fraction("1") == 1.0
    assert fraction("0.999") == 0.999 and non_negative_float(" 2.5 ") == 2.5
    for parse, text in ((positive_int, "0"), (positive_int, "2.5"), (non_negative_float, "-5"),
                        (non_negative_float, "nan"), (non_negative_float, "inf"),
                        (fraction, "2"), (fraction, "-0.1"), (fraction, "abc")):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)


@pytest.mark.parametrize("argv,named", [
    (["bench", "restv2_tiny", "--min-time", "-5"], "--min-time"),
    (["export-model", "c.py", "k.pth", "--out", "m.onnx", "--seg-agreement", "2"],
     "--seg-agreement"),
    (["export-model", "c.py", "k.pth", "--out", "m.onnx", "--box-atol", "-1"], "--box-atol"),
    (["export-model", "c.py", "k.pth", "--out", "m.onnx", "--mask-iou", "1.5"], "--mask-iou"),
])
def test_cli_refuses_out_of_range_numbers(capsys, argv, named):
    from rest_dense.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and named in capsys.readouterr().err


def test_error_text_says_a_path_once():
    from rest_dense.utils import error_text

    missing = FileNotFoundError(2, "checkpoint '/x.pth' does not exist", "/x.pth")
    assert error_text(missing) == "checkpoint '/x.pth' does not exist"
    assert error_text(PermissionError(13, "Permission denied", "/y")) == "Permission denied: /y"
    assert error_text(KeyError("no key 'a'")) == "no key 'a'"
    assert error_text(ValueError("plain")) == "plain"


def test_check_output_path(tmp_path):
    from rest_dense.utils import check_output_path

    (tmp_path / "afile").write_text("x")
    (tmp_path / "ckpt.pth").write_text("weights")
    check_output_path(tmp_path / "new" / "m.json", "--save-metrics")  # missing folders: fine
    check_output_path(tmp_path / "new" / "sub", "--work-dir", folder=True)
    assert not (tmp_path / "new").exists()  # checked, not created
    cases = [
        (dict(path=str(tmp_path / "afile") + "/", what="--work-dir", folder=True), "is a file"),
        (dict(path=tmp_path / "afile" / "x", what="--work-dir", folder=True), "which is a file"),
        (dict(path=str(tmp_path / "newdir") + "/", what="--save-metrics"), "is a folder"),
        (dict(path=tmp_path, what="--save-metrics"), "is a folder"),
        (dict(path=tmp_path, what="--out", example="m.onnx"), "give a file name inside it .e.g. "),
        (dict(path="", what="--out"), "an empty path"),
        (dict(path=tmp_path / "." / "ckpt.pth", what="--save-metrics",
              inputs=[tmp_path / "ckpt.pth"]), "same file as the input"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_output_path(**kwargs)


def test_check_output_path_as_the_system_resolves_it(tmp_path):
    """Paths that only look fine once normalised, names too long for the file system, and
    files a rename would replace are refused before any work (a hostile tester's cases)."""
    from rest_dense.utils import check_output_path

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        check_output_path(f"{tmp_path}/afile/../x.pth", "the destination")
    with pytest.raises(ValueError, match="too long"):
        check_output_path(tmp_path / ("c" * 300 + ".pth"), "--out")
    check_output_path(tmp_path / ("a" * 240 + ".pth"), "--out")  # long, but legal
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for replaced in (True, False):  # a rename would replace it; open() would block on it
        with pytest.raises(ValueError, match="not a regular file"):
            check_output_path(fifo, "the destination", replaced=replaced)
    with pytest.raises(ValueError, match="an empty path"):
        check_output_path("", "--save-metrics")
    with pytest.raises(ValueError, match="too long .* bytes"):  # bytes, not characters
        check_output_path(tmp_path / ("中" * 100 + ".pth"), "--out")


def test_check_output_path_checks_what_a_link_points_to(tmp_path):
    """The writers write through links, so a link's target is checked: below a file, a
    loop, an input; a link into a missing folder is fine (its folders are made)."""
    from rest_dense.utils import check_output_path, make_parent_folder

    (tmp_path / "afile").write_text("x")
    (tmp_path / "into_file.pth").symlink_to(tmp_path / "afile" / "x.pth")
    with pytest.raises(ValueError, match="which is a file"):
        check_output_path(tmp_path / "into_file.pth", "the destination")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    with pytest.raises(ValueError, match="a loop"):
        check_output_path(tmp_path / "loop_a", "--markdown")
    (tmp_path / "cfg.py").write_text("x = 1")
    (tmp_path / "to_cfg.md").symlink_to(tmp_path / "cfg.py")
    with pytest.raises(ValueError, match="same file as the input|links to the input"):
        check_output_path(tmp_path / "to_cfg.md", "--markdown", [tmp_path / "cfg.py"])
    far = tmp_path / "far.md"
    far.symlink_to(tmp_path / "new" / "sub" / "t.md")
    check_output_path(far, "--markdown")
    with open(make_parent_folder(far), "w") as f:
        f.write("table")
    assert (tmp_path / "new" / "sub" / "t.md").read_text() == "table" and far.is_symlink()


def test_missing_folders_and_remove_if_empty(tmp_path):
    from rest_dense.utils import missing_folders, remove_if_empty, removed_if_left_empty

    deep = tmp_path / "a" / "b" / "c"
    assert missing_folders(deep) == [str(deep), str(deep.parent), str(deep.parent.parent)]
    assert missing_folders(tmp_path) == []
    with pytest.raises(RuntimeError):
        with removed_if_left_empty(deep):
            deep.mkdir(parents=True)
            raise RuntimeError("the command failed")
    assert not (tmp_path / "a").exists()  # every folder it made, not only the deepest
    (deep / "kept").mkdir(parents=True)
    remove_if_empty(missing_folders(deep))  # nothing missing: nothing removed
    remove_if_empty([str(deep), str(deep.parent)])  # not empty: kept
    assert (deep / "kept").is_dir()


def test_staged_file_folders_and_links(tmp_path):
    """StagedFile creates the missing folders of its file and removes them again when the
    file is not committed; a link is written through, as open() would."""
    from rest_dense.run_files import StagedFile

    dst = tmp_path / "new" / "sub" / "out.bin"
    with StagedFile(dst) as staged:
        assert dst.parent.is_dir()
    assert not (tmp_path / "new").exists()
    with StagedFile(dst) as staged:
        open(staged.path, "w").write("data")
        staged.commit()
    assert dst.read_text() == "data"
    target = tmp_path / "target.bin"
    target.write_text("old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with StagedFile(link) as staged:
        open(staged.path, "w").write("new")
        staged.commit()
    assert link.is_symlink() and target.read_text() == "new"


def test_make_parent_folder(tmp_path):
    from rest_dense.utils import make_parent_folder

    path = tmp_path / "a" / "b" / "f.txt"
    assert make_parent_folder(path) == str(path)
    assert (tmp_path / "a" / "b").is_dir() and not path.exists()


class _OwnError(Exception):
    """An error of a module of one's own (its traceback line is module-qualified)."""


class _Files:
    """A dataset whose items are files to open (the second is missing or unreadable)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if str(self.paths[i]).endswith(".own"):
            raise _OwnError("line one\nline two")
        if str(self.paths[i]).endswith(".json"):
            import json

            return json.loads(open(self.paths[i]).read())["x"]
        with open(self.paths[i], "rb") as f:
            return len(f.read())


@pytest.mark.timeout(120)
def test_error_text_of_a_data_loader_worker_is_the_workers_error(tmp_path):
    """torch re-raises a worker's error with the worker's traceback as its message: the
    one-line report keeps the error and says where it happened."""
    import torch

    from rest_dense.utils import error_text

    good = tmp_path / "a.png"
    good.write_bytes(b"x")
    cases = [(tmp_path / "gone.png", FileNotFoundError,
              f"No such file or directory: '{tmp_path / 'gone.png'}' (in DataLoader worker process 0)")]
    bad_json = tmp_path / "b.json"
    bad_json.write_text("{}")
    cases.append((bad_json, KeyError, "x (in DataLoader worker process 0)"))
    cases.append((tmp_path / "c.own", _OwnError, "line one line two (in DataLoader worker process 0)"))
    for path, kind, expected in cases:
        loader = torch.utils.data.DataLoader(_Files([good, path]), batch_size=None, num_workers=1)
        with pytest.raises(kind) as info:
            list(loader)
        assert "Original Traceback" in str(info.value)  # what torch gives
        text = error_text(info.value)
        assert text == expected, text
        assert "\n" not in text and "Traceback" not in text
    # other errors are as before
    assert error_text(ValueError("Caught nothing")) == "Caught nothing"


class _LoadImages:
    """Images decoded the way the toolboxes do: mmcv's LoadImageFromFile, or PIL."""

    def __init__(self, path, how):
        self.path, self.how = str(path), how

    def __len__(self):
        return 1

    def __getitem__(self, i):
        if self.how == "mmcv":
            from mmcv.transforms import LoadImageFromFile

            return LoadImageFromFile()(dict(img_path=self.path))["img"].shape
        from PIL import Image

        with Image.open(self.path) as img:
            return img.convert("RGB").size


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["mmcv", "pil"])
@pytest.mark.parametrize("workers", [0, 1])
def test_reading_images_names_an_image_that_cannot_be_decoded(tmp_path, how, workers):
    """A corrupt image met while training or testing (mmcv's assertion, PIL's error; in the
    main process or in a DataLoader worker) is one ImageReadError, naming the file where the
    toolbox names it; other errors pass unchanged."""
    import numpy as np
    import torch
    from PIL import Image

    from rest_dense.utils import ImageReadError, reading_images

    good = tmp_path / "good.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])  # a PNG cut inside its header
    loader = torch.utils.data.DataLoader(_LoadImages(bad, how), batch_size=None,
                                         num_workers=workers)
    with pytest.raises(ImageReadError) as info:
        with reading_images():
            list(loader)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    if how == "mmcv":
        assert text == f"cannot decode the image {bad} (a corrupt file, or not an image)"
    else:
        assert text.startswith("an image of the dataset cannot be decoded")
    assert list(torch.utils.data.DataLoader(_LoadImages(good, how), batch_size=None))
    for other in (AssertionError("x"), FileNotFoundError(2, "gone", "/x"), OSError("disk")):
        with pytest.raises(type(other)):
            with reading_images():
                raise other
