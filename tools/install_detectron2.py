#!/usr/bin/env python
"""Install a working detectron2 (0.5, pure Python, patched) into the current Python environment.

detectron2 is not on PyPI and GitHub may be unreachable. PyPI's ``detectron2-cdo==0.5`` is a
re-upload of detectron2 0.5's Python sources and model-zoo configs, without the C++/CUDA sources
(so no ``detectron2._C``) and with stale pins (black==21.4b2, fvcore<0.1.6, iopath<0.1.10). This
script downloads that sdist, applies mechanical fixes for torch >= 2.x / numpy 2 / Pillow >= 10,
and installs the result as a regular distribution named ``detectron2`` (version ``0.5+restdenseN``),
so ``pip show detectron2`` / ``pip uninstall detectron2`` work.

What works without ``_C``: everything standard Mask R-CNN / Faster R-CNN / RetinaNet / semantic
segmentation need (torchvision provides roi_align and nms). What does not: rotated boxes
(nms_rotated, ROIAlignRotated, box_iou_rotated) and deformable convolution; those raise ImportError
with a clear message on first use. COCOEvaluator falls back to the official pycocotools COCOeval.

Usage:  python tools/install_detectron2.py [--force] [--sdist PATH] [--keep-workdir]
"""
import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap

SDIST_REQ = "detectron2-cdo==0.5"
SDIST_NAME = "detectron2_cdo-0.5.tar.gz"
SDIST_SHA256 = "53c9e79e9cc943e80419c588ea44b5479507a8628ed14a4e06bd093e29311b18"
# Bump PATCH_LEVEL whenever the patches below change: an installed build with an older level is
# replaced on the next run.
PATCH_LEVEL = 1
DIST_VERSION = "0.5+restdense%d" % PATCH_LEVEL
# pip >= 26.3 refuses to even download a PyPI sdist whose metadata declares a direct-URL dependency;
# detectron2-cdo's `all` extra has one (panopticapi @ https://github.com/...). Fallback pip version.
FALLBACK_PIP = "pip==26.2.1"

TEST_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"

# Runtime dependencies (unpinned; recorded in the metadata so that `pip check` sees them). They are
# installed by `pip install -e ".[d2]"` of this repository; this script installs with --no-deps.
RUNTIME_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.6",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5",
    "iopath>=0.1.7",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}


def log(msg):
    print("[detectron2] " + msg, flush=True)


# pip warns about every package missing from this machine's extra local indexes: noise.
_PIP_NOISE = re.compile(r"^WARNING: Location 'file://.*' is ignored")


def run(cmd, env=None, check=True, capture=False):
    """Run `cmd`; output is returned (capture=True) or printed without pip's index noise."""
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    if not capture:
        out = "".join(l for l in proc.stdout.splitlines(True) if not _PIP_NOISE.match(l))
        sys.stdout.write(out)
        sys.stdout.flush()
    if check and proc.returncode != 0:
        if capture:
            sys.stdout.write(proc.stdout)
        raise SystemExit("[detectron2] command failed (%d): %s" % (proc.returncode, " ".join(cmd)))
    return proc


# --------------------------------------------------------------------------- installed state
_PROBE = r"""
import json, os, sys
out = {}
try:
    from importlib import metadata
    try:
        out["dist_version"] = metadata.version("detectron2")
    except metadata.PackageNotFoundError:
        out["dist_version"] = None
    try:
        out["cdo_version"] = metadata.version("detectron2-cdo")
    except metadata.PackageNotFoundError:
        out["cdo_version"] = None
    import detectron2
    out["file"] = detectron2.__file__
    try:
        from detectron2 import _restdense
        out["patch_level"] = _restdense.PATCH_LEVEL
    except ImportError:
        out["patch_level"] = None
    import importlib.util
    spec = importlib.util.find_spec("detectron2._C")
    out["compiled_C"] = bool(spec and spec.origin and not spec.origin.endswith(".py"))
    from detectron2 import model_zoo
    out["config_ok"] = os.path.isfile(model_zoo.get_config_file(%r))
    from detectron2.modeling import build_model  # noqa: F401
    out["import_ok"] = True
except Exception as e:  # noqa: BLE001
    out["error"] = "%%s: %%s" %% (type(e).__name__, e)
print("PROBE" + json.dumps(out))
""" % TEST_CONFIG


def probe():
    import json

    proc = run([sys.executable, "-c", _PROBE], check=False, capture=True)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[len("PROBE"):])
    return {"error": proc.stdout[-2000:]}


# --------------------------------------------------------------------------- download
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(dest):
    """`pip download` the sdist (its metadata step imports torch, hence --no-build-isolation)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--no-binary", "detectron2-cdo", "--quiet", "-d", dest, SDIST_REQ]
    proc = run(cmd, check=False, capture=True)
    if proc.returncode != 0:
        if "direct URL dependencies" not in proc.stdout:
            sys.stdout.write(proc.stdout)
            raise SystemExit("[detectron2] pip download %s failed" % SDIST_REQ)
        # pip >= 26.3 rejects the sdist's metadata (see FALLBACK_PIP); use an older pip for this
        # one download, installed into a throwaway directory.
        log("this pip rejects the sdist's direct-URL extra; downloading with %s" % FALLBACK_PIP)
        pip_dir = os.path.join(dest, "_pip")
        run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", pip_dir, FALLBACK_PIP])
        env = dict(os.environ, PYTHONPATH=pip_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        run(cmd + ["--disable-pip-version-check"], env=env)
    path = os.path.join(dest, SDIST_NAME)
    if not os.path.isfile(path):
        raise SystemExit("[detectron2] expected %s after pip download" % path)
    return path


def unpack(sdist, dest):
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        raise SystemExit("[detectron2] sha256 mismatch for %s: %s (expected %s)"
                         % (sdist, digest, SDIST_SHA256))
    with tarfile.open(sdist) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tf.extractall(dest)
    (root,) = [d for d in os.listdir(dest) if d.startswith("detectron2_cdo-")]
    return os.path.join(dest, root)


# --------------------------------------------------------------------------- patches
# numpy removed the aliases np.bool/np.int/np.float/np.str/np.object (1.24). Only the bare alias is
# rewritten: np.float32, np.bool_, np.int64, np.object_ ... are untouched ((?!\w) look-ahead), and
# so is e.g. `xnp.int` or `foo.np.int` ((?<![\w.]) look-behind).
_NP_ALIAS = re.compile(r"(?<![\w.])np\.(bool|int|float|str|object)(?!\w)")

_C_STUB = '''\
"""Stand-in for detectron2's compiled extension, which this build does not have.

detectron2 was installed from PyPI's detectron2-cdo 0.5 sources (no C++/CUDA sources) by
rest_dense's tools/install_detectron2.py. Standard Mask R-CNN / Faster R-CNN / RetinaNet and
semantic segmentation use torchvision's roi_align / nms and work; rotated-box ops
(nms_rotated, ROIAlignRotated, box_iou_rotated), deformable convolution and the fast C++
COCO evaluation are unavailable.
"""

RESTDENSE_STUB = True


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise ImportError(
        "detectron2._C.%s is not available: this detectron2 build (installed by rest_dense's "
        "tools/install_detectron2.py from PyPI's detectron2-cdo 0.5 sources) has no compiled "
        "extension. Rotated boxes and deformable convolution need detectron2 built from source "
        "(pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git')."
        % name
    )
'''

_MARKER = '''\
"""Marker: detectron2 patched and installed by rest_dense's tools/install_detectron2.py."""
PATCH_LEVEL = %d
SOURCE = "%s"
''' % (PATCH_LEVEL, SDIST_REQ)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _replace_once(root, rel, old, new):
    path = os.path.join(root, rel)
    text = _read(path)
    if text.count(old) != 1:
        raise SystemExit("[detectron2] patch anchor not found exactly once in %s: %r" % (rel, old))
    _write(path, text.replace(old, new))


def apply_patches(root):
    """Apply all fixes to the unpacked sdist at `root`. Returns a list of human-readable notes."""
    notes = []
    py_files = []
    for top in ("detectron2", "projects"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            py_files += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]

    n_np = n_img = 0
    for path in py_files:
        text = _read(path)
        new, k = _NP_ALIAS.subn(lambda m: m.group(1), text)
        n_np += k
        # Pillow 10 removed Image.LINEAR (an alias of BILINEAR).
        k2 = len(re.findall(r"\bImage\.LINEAR\b", new))
        new = re.sub(r"\bImage\.LINEAR\b", "Image.BILINEAR", new)
        n_img += k2
        if new != text:
            _write(path, new)
    for path in py_files:  # nothing left behind (comments included)
        left = _NP_ALIAS.findall(_read(path)) or re.findall(r"\bImage\.LINEAR\b", _read(path))
        if left:
            raise SystemExit("[detectron2] unpatched aliases remain in %s: %s" % (path, left))
    notes.append("np.bool/np.int/np.float/np.str -> builtins (%d places)" % n_np)
    notes.append("Image.LINEAR -> Image.BILINEAR (%d places)" % n_img)

    # numpy 2: np.array(..., copy=False) raises when a copy is needed.
    _replace_once(root, "detectron2/layers/mask_ops.py",
                  "mask = np.array(mask, copy=False)", "mask = np.asarray(mask)")
    notes.append("mask_ops: np.array(copy=False) -> np.asarray (numpy 2)")

    # pkg_resources is gone from setuptools >= 81 (and torch 2.13 requires setuptools >= 77).
    _replace_once(root, "detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "")
    _replace_once(
        root, "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n'
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        '    )',
        'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
    )
    notes.append("model_zoo.get_config_file: pkg_resources -> path next to the module")

    # No compiled extension: a module whose attributes raise a clear ImportError.
    _write(os.path.join(root, "detectron2", "_C.py"), _C_STUB)
    notes.append("detectron2/_C.py stub (module __getattr__ raises ImportError)")

    # COCOEvaluator defaults to the C++ COCOeval (detectron2._C); use pycocotools' official one.
    _replace_once(
        root, "detectron2/evaluation/coco_evaluation.py",
        "coco_eval = (COCOeval_opt if use_fast_impl else COCOeval)(coco_gt, coco_dt, iou_type)",
        "from detectron2 import _C as _d2_C\n"
        "    if getattr(_d2_C, 'RESTDENSE_STUB', False):\n"
        "        use_fast_impl = False  # no compiled extension in this build (rest_dense)\n"
        "    coco_eval = (COCOeval_opt if use_fast_impl else COCOeval)(coco_gt, coco_dt, iou_type)",
    )
    _replace_once(
        root, "detectron2/evaluation/coco_evaluation.py",
        "        self._use_fast_impl = use_fast_impl\n",
        "        from detectron2 import _C as _d2_C  # rest_dense: no compiled COCOeval in this build\n"
        "        self._use_fast_impl = use_fast_impl and not getattr(_d2_C, 'RESTDENSE_STUB', False)\n",
    )
    notes.append("COCOEvaluator falls back to pycocotools COCOeval (no _C)")

    # nms_rotated calls torch.ops.detectron2.* (registered by _C): fail with the stub's ImportError.
    _replace_once(
        root, "detectron2/layers/nms.py",
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)\n",
        "    from detectron2._C import nms_rotated as _check  # noqa: F401  (rest_dense: clear error)\n"
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)\n",
    )
    notes.append("nms_rotated: clear ImportError instead of a torch.ops AttributeError")

    # torch >= 2.x warns on every call without `indexing`; "ij" is the old default.
    _replace_once(root, "detectron2/modeling/anchor_generator.py",
                  "torch.meshgrid(shifts_y, shifts_x)",
                  'torch.meshgrid(shifts_y, shifts_x, indexing="ij")')
    notes.append('anchor_generator: torch.meshgrid(..., indexing="ij") (same result, no warning)')

    # detectron2.export imports caffe2 (gone from PyTorch) at import time; keep TracingAdapter and
    # the TorchScript helpers importable (detectron2.utils.analysis, i.e. FLOP counting, needs them).
    _replace_once(
        root, "detectron2/export/__init__.py",
        "from .api import *\n",
        "try:\n"
        "    from .api import *\n"
        "except ImportError as _e:  # caffe2 is not part of modern PyTorch (rest_dense patch)\n"
        "    if \"caffe2\" not in str(_e):\n"
        "        raise\n",
    )
    notes.append("detectron2.export: caffe2-based API optional (TracingAdapter, analysis work)")

    _write(os.path.join(root, "detectron2", "_restdense.py"), _MARKER)
    return notes


def write_setup(root):
    """Replace the sdist's setup.py (which wants to compile csrc/ and pins black etc.)."""
    for stale in ("detectron2_cdo.egg-info", "build"):
        shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    if os.path.exists(os.path.join(root, "setup.py")):
        os.replace(os.path.join(root, "setup.py"), os.path.join(root, "setup_cdo_orig.py.txt"))
    cfg_dir = os.path.join(root, "detectron2", "model_zoo", "configs")
    n_yaml = sum(f.endswith(".yaml") for _, _, fs in os.walk(cfg_dir) for f in fs)
    if not os.path.isfile(os.path.join(cfg_dir, TEST_CONFIG)) or n_yaml < 50:
        raise SystemExit("[detectron2] model-zoo configs missing from the sdist (%s)" % cfg_dir)
    _write(os.path.join(root, "setup.py"), textwrap.dedent('''\
        # Generated by rest_dense tools/install_detectron2.py: pure-Python detectron2 0.5.
        from setuptools import find_packages, setup

        PROJECTS = %r

        setup(
            name="detectron2",
            version=%r,
            description="detectron2 0.5 (from PyPI detectron2-cdo sources, patched for "
            "torch 2 / numpy 2, no compiled ops)",
            url="https://github.com/facebookresearch/detectron2",
            license="Apache-2.0",
            python_requires=">=3.8",
            packages=find_packages(include=["detectron2", "detectron2.*"],
                                   exclude=["detectron2.model_zoo.configs*"])
            + list(PROJECTS),
            package_dir=PROJECTS,
            package_data={"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml",
                                                   "configs/**/*.py"]},
            include_package_data=False,
            install_requires=%r,
            zip_safe=False,
        )
        ''') % (PROJECTS, DIST_VERSION, RUNTIME_REQUIRES))
    # setuptools must not pick up setup.cfg's [egg_info] or an old MANIFEST from the sdist
    if os.path.exists(os.path.join(root, "MANIFEST.in")):
        os.remove(os.path.join(root, "MANIFEST.in"))


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="reinstall even if already installed")
    ap.add_argument("--sdist", default=os.environ.get("DETECTRON2_CDO_SDIST"),
                    help="use this local %s instead of downloading it" % SDIST_NAME)
    ap.add_argument("--keep-workdir", action="store_true", help="keep the unpacked, patched tree")
    args = ap.parse_args()

    state = probe()
    if not args.force:
        if (state.get("import_ok") and state.get("config_ok")
                and state.get("patch_level") == PATCH_LEVEL
                and state.get("dist_version") == DIST_VERSION):
            log("detectron2 %s already installed (%s)" % (DIST_VERSION, state["file"]))
            return 0
        if state.get("import_ok") and state.get("config_ok") and state.get("compiled_C"):
            log("found a compiled detectron2 %s at %s; keeping it (--force replaces it)"
                % (state.get("dist_version"), state["file"]))
            return 0
    if "error" in state and "No module named 'detectron2'" not in state["error"]:
        log("current detectron2 not usable: %s" % state["error"].strip().splitlines()[-1])

    try:
        import torch  # noqa: F401  (the sdist's setup.py imports torch during `pip download`)
    except ImportError:
        raise SystemExit("[detectron2] install torch first")

    work = tempfile.mkdtemp(prefix="d2_install_")
    try:
        if args.sdist:
            sdist = os.path.abspath(args.sdist)
            log("using local sdist %s" % sdist)
        else:
            log("downloading %s" % SDIST_REQ)
            sdist = download_sdist(work)
        root = unpack(sdist, os.path.join(work, "src"))
        for note in apply_patches(root):
            log("patch: " + note)
        write_setup(root)

        for old in ("detectron2-cdo", "detectron2"):
            if (old == "detectron2-cdo" and state.get("cdo_version")) or (
                    old == "detectron2" and state.get("dist_version")):
                log("uninstalling previous %s" % old)
                run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", old])
        log("installing detectron2 %s" % DIST_VERSION)
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", "--no-cache-dir", root])
    finally:
        if args.keep_workdir:
            log("work dir kept: %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    state = probe()
    if not (state.get("import_ok") and state.get("config_ok")
            and state.get("patch_level") == PATCH_LEVEL):
        raise SystemExit("[detectron2] installed, but the import check failed: %s" % state)
    log("ok: detectron2 %s at %s" % (state["dist_version"], os.path.dirname(state["file"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
