"""Configs: the shipped ones by name, which framework a config is for, and ``--cfg-options``.

Three rules live here and nowhere else:

* **Where a config is** (:func:`get_config_path`): a file path; a shipped config name, i.e. a
  path relative to the package's configs folder (in an installed wheel
  ``rest_dense/.mim/configs``, in a clone the repository's ``configs/``), e.g.
  ``'mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'``; or ``'pkg::path'``, a config
  shipped inside an installed OpenMMLab package (``'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'``).
* **Which framework a config is for** (:func:`config_framework`), in one vocabulary,
  :data:`FRAMEWORKS`:

  ============  ========================================================
  ``'mmdet'``   MMDetection (mmengine ``.py`` / ``.yaml`` config)
  ``'mmseg'``   MMSegmentation (mmengine config)
  ``'d2'``      detectron2 yacs ``.yaml`` config (``_BASE_``, upper-case sections)
  ``'d2-lazy'`` detectron2 LazyConfig ``.py`` (``dataloader``, ``lr_multiplier``, ...)
  ============  ========================================================

  :data:`OPENMMLAB` and :data:`DETECTRON2` group them; :func:`framework_family` names the
  group (``'openmmlab'`` / ``'detectron2'``, the values of the commands' ``--framework``).
* **What ``--cfg-options key=value`` means** for OpenMMLab configs
  (:func:`parse_cfg_options`): mmengine's ``DictAction`` rules, implemented here in plain
  Python so that detectron2-only installs can use them too. detectron2 yacs configs keep
  their own ``KEY VALUE`` semantics (:func:`d2_opts`).
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import fnmatch
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Union

__all__ = ["FRAMEWORKS", "OPENMMLAB", "DETECTRON2", "configs_root", "get_config_path",
           "list_configs", "config_framework", "framework_family", "parse_cfg_options",
           "parse_cfg_value", "d2_opts", "ConfigBuildError", "ConfigSyntaxError",
           "building_from_config"]

_PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = (".py", ".yaml")
#: folders of parts, not runnable configs: ``_base_`` files and the deployment (export) configs
_NOT_RUNNABLE = ("_base_", "deploy")

#: every value :func:`config_framework` returns
FRAMEWORKS = ("mmdet", "mmseg", "d2", "d2-lazy")
#: the OpenMMLab frameworks (mmengine configs; the registry scope is the name)
OPENMMLAB = ("mmdet", "mmseg")
#: the detectron2 config formats: yacs yaml and LazyConfig
DETECTRON2 = ("d2", "d2-lazy")
_FAMILIES = {"openmmlab": OPENMMLAB, "detectron2": DETECTRON2}

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------ where a config is
class ConfigSyntaxError(ValueError):
    """A config file that cannot be read as one: a ``.py`` config Python cannot parse, a
    ``_base_`` that is no file name."""


class ConfigBuildError(ValueError):
    """A config from which its model, runner or trainer cannot be built: a value the model
    refuses, an unknown type, a key of the wrong type. The message is the refusal's own;
    the commands print it as one line (it is the user's config, not the code, that is
    wrong)."""


@contextlib.contextmanager
def building_from_config(assertions: bool = False) -> Iterator[None]:
    """Turn what building from a config raises for a bad value in it (``ValueError``,
    ``TypeError``, ``KeyError``: the backbones' argument checks, the registries' and yacs'
    refusals) into :class:`ConfigBuildError`; the checkpoint errors of
    :mod:`rest_dense.safe_load` pass unchanged (the commands report them as such).

    Args:
        assertions: also ``AssertionError``: yacs reports an unknown key by assertion, and
            the OpenMMLab models check their config arguments by assertion; off where an
            assertion is the code's own. A bare assertion is shown by its source line.
    """
    errors = (ValueError, TypeError, KeyError) + ((AssertionError,) if assertions else ())
    try:
        yield
    except ConfigBuildError:
        raise
    except errors as e:
        from .safe_load import CheckpointError

        if isinstance(e, CheckpointError):
            raise
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        if isinstance(e, KeyError) and message and " " not in message:
            message = f"no {message!r} where the config asks for it (KeyError)"
        empty = _empty_dataset(e)
        if empty:
            message = empty
        if isinstance(e, AssertionError) and not message:  # a bare assert: show it
            import traceback

            frame = traceback.extract_tb(e.__traceback__)[-1]
            message = f"assertion failed at {frame.filename}:{frame.lineno}: {frame.line}"
        raise ConfigBuildError(f"the config does not build: {message}") from e


def _empty_dataset(error: BaseException) -> Optional[str]:
    """What to say of an error raised while an MMEngine dataset with no samples initialised
    (its serialisation fails with numpy's "need at least one array to concatenate", which
    names neither the dataset nor its files); ``None`` for any other error."""
    tb = error.__traceback__
    while tb is not None:
        dataset = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name in (
            "full_init", "_serialize_data") else None
        data_list = getattr(dataset, "data_list", None)
        if isinstance(data_list, list) and not data_list and hasattr(dataset, "ann_file"):
            filters = getattr(dataset, "filter_cfg", None)
            ann_file = getattr(dataset, "ann_file", None)
            unmatched = _unmatched_classes(dataset, ann_file)
            if unmatched:
                return unmatched
            where = (f"ann_file {ann_file!r}" if ann_file else
                     f"data_prefix {dict(getattr(dataset, 'data_prefix', None) or {})!r}")
            return (f"dataset {type(dataset).__name__} holds no samples ({where}, data_root "
                    f"{getattr(dataset, 'data_root', None)!r}"
                    + (f", after filter_cfg {dict(filters)!r}" if filters else "")
                    + (": check that the annotation file lists images"
                       + (" with annotations" if filters else "") if ann_file
                       else ": no image with the suffix the dataset reads is there") + ")")
        tb = tb.tb_next
    return None


def _unmatched_classes(dataset: Any, ann_file: Optional[str]) -> Optional[str]:
    """An MMDetection COCO dataset left empty because none of the config's class names is a
    category of its annotation file: say so, naming both; ``None`` otherwise."""
    classes = list((getattr(dataset, "metainfo", None) or {}).get("classes") or ())
    cat_ids = getattr(dataset, "cat_ids", None)
    if not classes or cat_ids is None or len(cat_ids) or not ann_file:
        return None
    import json

    try:
        with open(ann_file) as f:
            names = [c.get("name") for c in json.load(f).get("categories", [])]
    except (OSError, ValueError, AttributeError):
        return None
    shown = names[:12] + (["..."] if len(names) > 12 else [])
    return (f"dataset {type(dataset).__name__} holds no samples: none of its classes {classes} "
            f"is a category of {ann_file} (categories: {shown}); set the dataset's "
            "metainfo=dict(classes=(...)) to the file's category names")


def configs_root() -> Path:
    """The folder holding the shipped configs (wheel copy first, then the checkout's)."""
    for root in (_PACKAGE / ".mim" / "configs", _PACKAGE.parent / "configs"):
        if (root / "_base_").is_dir():
            return root
    raise FileNotFoundError(
        f"no shipped configs found: neither {_PACKAGE / '.mim' / 'configs'} (installed wheel) "
        f"nor {_PACKAGE.parent / 'configs'} (checkout) exists")


def list_configs(pattern: str = "*", framework: Optional[str] = None) -> List[str]:
    """Names of the configs users train and test with (``_base_`` parts, ``Base-*.yaml`` and
    the deployment configs under ``deploy/`` left out).

    Args:
        pattern: shell-style filter on the name, e.g. ``'mask_rcnn/*'`` or ``'*toy*'``.
        framework: only configs of this framework (one of :data:`FRAMEWORKS`) or family
            (``'openmmlab'``, ``'detectron2'``).
    """
    if framework is not None and framework not in FRAMEWORKS and framework not in _FAMILIES:
        raise ValueError(f"framework {framework!r} is not one of "
                         f"{', '.join(FRAMEWORKS + tuple(_FAMILIES))}")
    wanted = _FAMILIES.get(framework, (framework,))
    root = configs_root()
    names = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if path.suffix not in _SUFFIXES or "__pycache__" in parts or parts[0] in _NOT_RUNNABLE \
                or "_base_" in parts:
            continue
        if path.name.startswith("Base-"):
            continue
        if not fnmatch.fnmatch(rel, pattern):
            continue
        if framework is not None and config_framework(str(path)) not in wanted:
            continue
        names.append(rel)
    return names


def _package_config(name: str) -> str:
    """``'mmdet::swin/x.py'`` -> the file inside the installed package's ``.mim/configs``."""
    package, rel = name.split("::", 1)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", package) or not rel:
        raise FileNotFoundError(f"config {name!r}: expected PACKAGE::PATH, e.g. "
                                "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py")
    if package == "rest_dense":  # ours: the shipped configs, in a clone too
        path = configs_root() / _shipped_relative(rel)
        if path.is_file() and os.path.realpath(path).startswith(
                os.path.realpath(configs_root()) + os.sep):
            return str(path)
        raise FileNotFoundError(f"config {name!r}: no shipped config {rel!r} under "
                                f"{configs_root()}; `rest-dense configs` lists them")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"config {name!r}: package {package!r} is not installed")
    tried = []
    for folder in spec.submodule_search_locations:
        for root in (Path(folder) / ".mim" / "configs", Path(folder) / "configs"):
            path = root / rel
            tried.append(str(path))
            if path.is_file():
                return str(path)
    raise FileNotFoundError(f"config {name!r}: no such config in {package} (looked for "
                            f"{' and '.join(tried)})")


def install_config_scope() -> None:
    """Let mmengine configs inherit the shipped ones as ``_base_ = 'rest_dense::NAME'`` (as
    ``'mmdet::NAME'`` works for MMDetection's), in a wheel and a clone alike.

    mmengine resolves ``package::`` prefixes only for the OpenMMLab packages it knows; this
    wraps its path lookup so that ``rest_dense::`` goes to :func:`get_config_path` and every
    other path to mmengine unchanged. Importing ``rest_dense.mm`` installs it, so it works
    in the ``rest-dense`` commands and in scripts that import ``rest_dense.mm`` before they
    read the config (``custom_imports`` come too late: mmengine reads ``_base_`` first).
    """
    from mmengine.config import Config

    original = Config.__dict__["_get_cfg_path"].__func__
    if getattr(original, "_rest_dense_scope", False):
        return

    def _get_cfg_path(cfg_path: str, filename: str):
        if isinstance(cfg_path, str) and cfg_path.startswith("rest_dense::"):
            # the shipped configs set their own default_scope: read them as local files
            return get_config_path(cfg_path), None
        return original(cfg_path, filename)

    _get_cfg_path._rest_dense_scope = True  # type: ignore[attr-defined]
    Config._get_cfg_path = staticmethod(_get_cfg_path)


def config_load_error(path: PathLike, error: BaseException) -> "ConfigBuildError":
    """The one-line error for a config file whose own code raised while it was read (a
    typo, a division by zero, an import of something missing): the error and the config's
    line that raised it."""
    import traceback

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    # the config's own frames: not the toolboxes', Python's or this package's
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "site-packages" not in f.filename and os.sep + "lib" + os.sep + "python"
              not in f.filename and not f.filename.startswith(("<", package))]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = str(error)
    cut = text.find(", the current sys.path is")  # mmengine's custom_imports failure
    if cut > 0:
        text = text[:cut] + " (not importable from here: install it or set PYTHONPATH)"
    text = " ".join(text.split())
    return ConfigBuildError(f"the config {os.fspath(path)} does not load: "
                            f"{type(error).__name__}: {text}{where}")


def read_mm_config(path: PathLike):
    """``mmengine.Config.fromfile`` for the package: ``rest_dense::`` bases resolve (see
    :func:`install_config_scope`), and what the file (or a ``_base_`` of it) does wrong is
    one line: :class:`ConfigSyntaxError`, ``FileNotFoundError`` for a missing file, or
    :class:`ConfigBuildError` (:func:`config_load_error`). A missing package that the
    commands know stays an ImportError, which they name with its install hint.

    Returns:
        The ``mmengine.Config``.
    """
    from mmengine.config import Config

    from .utils import missing_package_hint

    install_config_scope()
    path = os.fspath(path)
    try:  # a malformed _base_ (or syntax) anywhere in the chain, named before mmengine trips
        for _ in _chain(os.path.abspath(path), set()):
            pass
    except ConfigSyntaxError:
        raise
    except (ValueError, OSError):
        pass  # what mmengine reads differently, it reports below
    try:
        return Config.fromfile(path)
    except SyntaxError as err:  # the file or one of its _base_ files
        raise ConfigSyntaxError(f"config {path} is not valid Python: {err}") from None
    except FileNotFoundError as err:
        missing = getattr(err, "filename", None)
        if missing and os.path.isfile(path) and os.path.abspath(missing) != os.path.abspath(path):
            raise FileNotFoundError(
                f"config {path}: the _base_ file {os.path.normpath(missing)} does not exist"
            ) from None
        raise
    except ImportError as err:
        if missing_package_hint(err):
            raise
        raise config_load_error(path, err) from err
    except Exception as err:  # noqa: BLE001  a config is Python: anything may come out
        raise config_load_error(path, err) from err


def _shipped_relative(name: str) -> str:
    """``name`` relative to the shipped configs folder (a leading ``configs/`` dropped)."""
    rel = Path(name).as_posix()
    return rel[len("configs/"):] if rel.startswith("configs/") else rel


def get_config_folder(name: PathLike, local: bool = True) -> Optional[str]:
    """Absolute path of a folder of configs: an existing folder (with ``local``), else one
    of the shipped configs folder (``'mask_rcnn'``, ``'configs/upernet'``, in a wheel and a
    clone alike); ``None`` when ``name`` is neither."""
    name = os.fspath(name)
    if local and os.path.isdir(name):
        return os.path.abspath(name)
    root = configs_root()
    rel = _shipped_relative(name).rstrip("/")
    path = root / rel
    if rel and rel != "." and path.is_dir() \
            and os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
        return str(path)
    return None


def get_config_path(name: PathLike) -> str:
    """Absolute path of a config.

    ``mmengine.Config.fromfile`` loads the result with its whole ``_base_`` chain, and
    detectron2's ``merge_from_file`` / ``LazyConfig.load`` follow its ``_BASE_`` files.

    Args:
        name: an existing file; a path relative to the shipped configs folder (see
            :func:`list_configs`, a leading ``configs/`` is allowed); or ``'pkg::path'``,
            a config inside an installed package (``'mmdet::swin/...'``).

    Raises:
        FileNotFoundError: no such config; the message suggests close names.
    """
    name = os.fspath(name)
    if os.path.isfile(name):
        return os.path.abspath(name)
    if "::" in name:
        return _package_config(name)
    shipped = get_config_folder(name, local=False)
    if shipped:
        rel = _shipped_relative(name).rstrip("/")
        raise FileNotFoundError(f"config {name!r} is a folder of configs, not a config file; "
                                f"`rest-dense configs '{rel}/*'` lists them")
    if os.path.isdir(name):
        raise FileNotFoundError(f"config {name!r} is a folder, not a config file")
    root = configs_root()
    rel = _shipped_relative(name)
    path = root / rel
    inside = rel and os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
    if inside and path.is_file() and path.suffix in _SUFFIXES:  # never a file beside the
        return str(path)                                     # configs ('../setup.py') or a README
    close = difflib.get_close_matches(rel, list_configs(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `rest-dense configs` lists them"
    raise FileNotFoundError(f"no config file {name!r} and no shipped config of that name under "
                            f"{root}{hint}")


# ------------------------------------------------------------------ which framework
#: top-level names only a detectron2 LazyConfig defines / only mmengine configs use
_LAZY_NAMES = frozenset({"dataloader", "lr_multiplier"})
_MM_NAMES = frozenset({"_base_", "default_scope", "custom_imports", "train_dataloader",
                       "val_dataloader", "test_dataloader", "train_cfg", "optim_wrapper",
                       "default_hooks", "param_scheduler", "test_evaluator", "val_evaluator",
                       # MMDeploy's deployment configs (mmengine configs without a model)
                       "codebase_config", "backend_config", "onnx_config", "ir_config"})
_MM_MODULES = frozenset({"mmengine", "mmdet", "mmseg", "mmcv"})
#: model types of each OpenMMLab framework that decide without importing it (the registries
#: decide for other types)
_MMSEG_MODELS = frozenset({"EncoderDecoder", "CascadeEncoderDecoder", "SegTTAModel",
                           "DepthEstimator", "MultimodalEncoderDecoder"})
_MMDET_MODELS = frozenset({"MaskRCNN", "FasterRCNN", "RetinaNet", "CascadeRCNN", "DetTTAModel",
                           "HybridTaskCascade", "FCOS", "ATSS", "DETR", "DINO", "RTMDet",
                           "YOLOX", "MaskFormer", "Mask2Former", "SOLOv2", "PointRend"})


class _Facts:
    """What one config file says about its framework, read without running it."""

    def __init__(self) -> None:
        self.family: Optional[str] = None      # 'openmmlab' / 'detectron2' when the file decides
        self.scope: Optional[str] = None       # default_scope = '...'
        self.model_type: Optional[str] = None  # model = dict(type='...')
        self.bases: List[str] = []             # _base_ entries / relatively imported files


def _literal_str(node: ast.AST) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dict_type(node: ast.AST) -> Optional[str]:
    """``dict(type='X', ...)`` / ``{'type': 'X'}`` -> ``'X'``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        for kw in node.keywords:
            if kw.arg == "type":
                return _literal_str(kw.value)
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if k is not None and _literal_str(k) == "type":
                return _literal_str(v)
    return None


def _relative_module_file(path: str, level: int, module: Optional[str]) -> List[str]:
    folder = Path(path).parent
    for _ in range(level - 1):
        folder = folder.parent
    base = folder.joinpath(*(module.split("."))) if module else folder
    found = [str(p) for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()]
    return found[:1]


def _read_py(path: str, text: str) -> _Facts:
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise ConfigSyntaxError(f"config {path} is not valid Python: {err}") from None
    facts = _Facts()
    names: Set[str] = set()
    roots: Set[str] = set()
    read_base = False

    def imports(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                roots.add(a.name.split(".")[0])
                names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                facts.bases += _relative_module_file(path, node.level, node.module)
            else:
                roots.add((node.module or "").split(".")[0])
            names.update(a.asname or a.name for a in node.names if a.name != "*")

    for node in tree.body:
        imports(node)
        if isinstance(node, ast.With):  # mmengine's `with read_base(): from .x import *`
            read_base = read_base or any(
                isinstance(i.context_expr, ast.Call) and isinstance(i.context_expr.func, ast.Name)
                and i.context_expr.func.id == "read_base" for i in node.items)
            for sub in node.body:
                imports(sub)
        targets: List[ast.AST] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets, value = [node.target], node.value
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    names.add(sub.id)
            if not isinstance(target, ast.Name) or value is None:
                continue
            if target.id == "default_scope":
                facts.scope = _literal_str(value) or facts.scope
            elif target.id == "codebase_config" and _dict_type(value) in OPENMMLAB:
                facts.scope = facts.scope or _dict_type(value)  # MMDeploy: codebase = toolbox
            elif target.id == "model":
                facts.model_type = _dict_type(value) or facts.model_type
            elif target.id == "_base_":
                items = value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
                if any(isinstance(item, ast.Constant) and not isinstance(item.value, str)
                       for item in items):
                    raise ConfigSyntaxError(f"config {path}: _base_ must be a config file "
                                            f"name or a list of them, got {ast.unparse(value)}")
                for item in items:
                    s = _literal_str(item)
                    if s:
                        facts.bases.append(s if "::" in s else
                                           os.path.normpath(os.path.join(os.path.dirname(path), s)))
    if names & _MM_NAMES or roots & _MM_MODULES or read_base:
        facts.family = "openmmlab"
    elif names & _LAZY_NAMES or "detectron2" in roots:
        facts.family = "detectron2"
    return facts


def _read_yaml(path: str, text: str) -> _Facts:
    facts = _Facts()
    keys = re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:", text, flags=re.MULTILINE)
    if not keys or any(k == "_BASE_" or k.isupper() for k in keys):
        facts.family = "detectron2"
        base = re.search(r"^_BASE_\s*:\s*[\"']?([^\"'#\n]+?)[\"']?\s*(#.*)?$", text,
                         flags=re.MULTILINE)
        if base:  # detectron2 expands ~ and resolves it against the file's folder
            facts.bases.append(os.path.normpath(os.path.join(
                os.path.dirname(path), os.path.expanduser(base.group(1).strip()))))
        return facts
    facts.family = "openmmlab"
    try:
        import yaml

        data = yaml.safe_load(text) or {}
    except Exception as err:  # noqa: BLE001 -- any parse error: say which file
        raise ValueError(f"config {path} is not valid YAML: {err}") from None
    if isinstance(data, dict):
        if isinstance(data.get("default_scope"), str):
            facts.scope = data["default_scope"]
        model = data.get("model")
        if isinstance(model, dict) and isinstance(model.get("type"), str):
            facts.model_type = model["type"]
        bases = data.get("_base_") or []
        if not isinstance(bases, (str, list)) or not all(isinstance(b, str) for b in
                                                          ([bases] if isinstance(bases, str)
                                                           else bases)):
            raise ConfigSyntaxError(f"config {path}: _base_ must be a config file name or a "
                                    f"list of them, got {bases!r}")
        for s in [bases] if isinstance(bases, str) else list(bases):
            if isinstance(s, str):
                facts.bases.append(s if "::" in s else
                                   os.path.normpath(os.path.join(os.path.dirname(path), s)))
    return facts


def _file_facts(path: str) -> _Facts:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".py", ".yaml", ".yml"):
        raise ValueError(f"config {path}: a config is a .py (MMDetection / MMSegmentation / "
                         "detectron2 LazyConfig) or .yaml (detectron2, mmengine) file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config {path} is not a text file") from None
    return _read_py(path, text) if ext == ".py" else _read_yaml(path, text)


def _chain(path: str, seen: Set[str]) -> Iterable[tuple]:
    """(path, facts) of a config and of the files it builds on, nearest first."""
    if path in seen:
        return
    seen.add(path)
    facts = _file_facts(path)
    yield path, facts
    for base in facts.bases:
        if "::" in base:
            package = base.split("::", 1)[0]
            try:
                base = _package_config(base)
            except FileNotFoundError:
                # an uninstalled package's config: its name is what we learn
                if package in OPENMMLAB:
                    fact = _Facts()
                    fact.family, fact.scope = "openmmlab", package
                    yield base, fact
                continue
        if os.path.isfile(base):
            yield from _chain(base, seen)


def config_files(config: PathLike) -> List[str]:
    """The files a config is read from: the file itself and the files it builds on
    (``_base_`` / ``_BASE_`` chains, files a LazyConfig imports relatively). A command's
    output must be none of them (:func:`rest_dense.utils.check_output_path`). Unreadable
    configs give what can be named (the file, if it exists): their loading reports them."""
    try:
        path = os.path.abspath(get_config_path(config))
        return [p for p, _ in _chain(path, set()) if os.path.isfile(p)]
    except (ValueError, OSError, SyntaxError):
        return [os.fspath(config)] if os.path.isfile(os.fspath(config)) else []


def _framework_of_model_type(model_type: Any) -> Optional[str]:
    if not isinstance(model_type, str):
        return None
    prefix, _, short = model_type.rpartition(".")
    if prefix in OPENMMLAB:
        return prefix
    if short in _MMSEG_MODELS:
        return "mmseg"
    if short in _MMDET_MODELS:
        return "mmdet"
    found = []
    for framework in OPENMMLAB:  # the registries know the rest (imports the frameworks)
        try:
            registry = importlib.import_module(f"{framework}.registry")
            if registry.MODELS.get(short) is not None:
                found.append(framework)
        except Exception:  # noqa: BLE001 -- not installed / broken install: no evidence
            continue
    return found[0] if len(found) == 1 else None


def _loaded_framework(cfg: Mapping, where: str) -> str:
    """The framework of a loaded config (``mmengine.Config``, a dict, a yacs ``CfgNode``)."""
    keys = [k for k in cfg.keys() if isinstance(k, str)]
    if keys and all(k.isupper() for k in keys):
        return "d2"  # a yacs CfgNode
    if "dataloader" in keys and "default_scope" not in keys:
        return "d2-lazy"
    scope = cfg.get("default_scope")
    if scope in OPENMMLAB:
        return scope
    model = cfg.get("model") or {}
    model_type = model.get("type") if hasattr(model, "get") else None
    if isinstance(model_type, str) and model_type.endswith("TTAModel") and hasattr(model, "get"):
        inner = model.get("module") or {}
        model_type = inner.get("type", model_type) if hasattr(inner, "get") else model_type
    framework = _framework_of_model_type(model_type)
    if framework:
        return framework
    raise ValueError(f"cannot tell whether {where} is for MMDetection or MMSegmentation "
                     f"(default_scope={scope!r}, model.type={model_type!r}); set "
                     "default_scope = 'mmdet' or 'mmseg' in the config")


def config_framework(config: Union[PathLike, Mapping]) -> str:
    """Which framework a config is for: one of :data:`FRAMEWORKS`.

    Files are read, not run: a ``.yaml`` with detectron2's upper-case sections or
    ``_BASE_`` (or empty) is ``'d2'``; a ``.py`` using mmengine's names (``_base_``,
    ``default_scope``, ``train_dataloader``, ``with read_base()``, ...) or importing an
    OpenMMLab package is OpenMMLab; one defining ``dataloader`` / ``lr_multiplier`` or
    importing detectron2 is ``'d2-lazy'``; otherwise the files it imports relatively (a
    LazyConfig built on another) decide, and a bare ``model = dict(type=...)`` is
    OpenMMLab. MMDetection vs MMSegmentation: the nearest ``default_scope`` along the
    ``_base_`` chain, else the model type (``mmseg.`` / ``mmdet.`` prefixes, known types,
    else the frameworks' registries), else the config is loaded with mmengine and the same
    rules read the result.

    Args:
        config: a file, shipped config name, ``'pkg::path'``; or a loaded config
            (``mmengine.Config``, dict, yacs ``CfgNode``).

    Raises:
        FileNotFoundError: no such config.
        ValueError: not a config file, or the file fits no framework (the message names
            the evidence that is missing).
    """
    if isinstance(config, Mapping) or (hasattr(config, "keys") and hasattr(config, "get")
                                       and not isinstance(config, (str, os.PathLike))):
        where = getattr(config, "filename", None) or "this config"
        return _loaded_framework(config, where)
    path = get_config_path(config)
    chain = list(_chain(path, set()))
    family = next((f.family for _, f in chain if f.family), None)
    if family is None and chain[0][1].model_type:
        family = "openmmlab"  # a bare mmengine config: model = dict(type=...)
    if family == "detectron2":
        return "d2" if path.lower().endswith((".yaml", ".yml")) else "d2-lazy"
    if family is None:
        raise ValueError(
            f"config {path} fits no framework: not a detectron2 config (a yaml with upper-case "
            "sections or _BASE_; a LazyConfig defining `dataloader` / `lr_multiplier` or "
            "importing detectron2) nor an MMDetection / MMSegmentation one (`_base_`, "
            "`default_scope`, `train_dataloader`, `model = dict(type=...)`, ...)")
    scope = next((f.scope for _, f in chain if f.scope), None)
    if scope in OPENMMLAB:
        return scope
    model_type = next((f.model_type for _, f in chain if f.model_type), None)
    framework = _framework_of_model_type(model_type)
    if framework:
        return framework
    try:  # written in a way that only running it tells: load it with mmengine
        import mmengine  # noqa: F401
    except ImportError:
        raise ValueError(f"cannot tell whether {path} is for MMDetection or MMSegmentation "
                         "without mmengine (not installed); set default_scope in it") from None
    return _loaded_framework(read_mm_config(path), path)


def framework_family(framework: str) -> str:
    """``'openmmlab'`` for ``'mmdet'`` / ``'mmseg'``, ``'detectron2'`` for ``'d2'`` /
    ``'d2-lazy'`` (the family names are accepted too)."""
    for family, members in _FAMILIES.items():
        if framework in members or framework == family:
            return family
    raise ValueError(f"framework {framework!r} is not one of {', '.join(FRAMEWORKS)}")


# ------------------------------------------------------------------ --cfg-options
def _split_top_level(text: str, where: str, sep: str = ",") -> List[str]:
    """Split at the ``sep`` characters outside brackets and braces (and outside quotes)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{where}: unbalanced brackets")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError(f"{where}: unbalanced {'quotes' if quote else 'brackets'}")
    parts.append(text[start:])
    return parts


def _scalar(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text == "None":
        return None
    return text


def _quoted(text: str) -> Optional[str]:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and text[0] not in text[1:-1]:
        return text[1:-1]
    return None


def _dict_value(body: str, where: str) -> Dict[Any, Any]:
    """``{key: value, ...}`` (the braces removed): keys and values by :func:`_value`."""
    out: Dict[Any, Any] = {}
    for item in _split_top_level(body, where):
        if not item.strip():
            continue  # `{}`, `{'a': 1,}`
        key_value = _split_top_level(item, where, sep=":")
        if len(key_value) != 2 or not key_value[0].strip():
            raise ValueError(f"{where}: {item.strip()!r} in braces is not key: value")
        key = _value(key_value[0], where)
        if isinstance(key, (list, dict)):
            raise ValueError(f"{where}: {key_value[0].strip()!r} cannot be a key")
        out[key] = _value(key_value[1], where)
    return out


def _value(text: str, where: str) -> Any:
    stripped = text.strip()
    inner = _quoted(stripped)
    if inner is not None:
        return inner  # 'quoted': a string, kept as written
    if stripped.startswith("{") and stripped.endswith("}"):
        _split_top_level(stripped, where)  # balanced brackets, braces and quotes
        return _dict_value(stripped[1:-1], where)
    text = stripped.strip("'\"").replace(" ", "")  # stray quotes go, as in DictAction
    is_tuple = text.startswith("(") and text.endswith(")")
    if is_tuple or (text.startswith("[") and text.endswith("]")):
        body = text[1:-1]
    elif "," in text:
        body = text
    else:
        if text.count("(") != text.count(")") or text.count("[") != text.count("]") or \
                text.count("{") != text.count("}"):
            raise ValueError(f"{where}: unbalanced brackets")
        return _scalar(text)
    parts = _split_top_level(body, where) if body else []
    if not is_tuple and len(parts) == 1 and parts[0] == text:
        return text  # commas only inside brackets, e.g. `f(1,2)`: a string, not a list
    values = [_value(part, where) for part in parts]
    if body.endswith(",") and values and values[-1] == "":
        values.pop()  # `[1,]`, `(1,)`
    return tuple(values) if is_tuple else values


def parse_cfg_value(text: str) -> Any:
    """One ``--cfg-options`` value, with mmengine ``DictAction``'s rules.

    * ``1`` -> int, ``0.5`` / ``1e-3`` / ``nan`` / ``inf`` -> float (checked where used);
    * ``true`` / ``False`` / ``TRUE`` (any case) -> bool; ``None`` -> None (``none`` stays
      a string);
    * ``1,2`` and ``[1,2]`` -> list ``[1, 2]``; ``(1,2)`` -> tuple; nesting
      ``[(1,2),[a,b],c]``; ``[]`` / ``()`` empty;
    * anything else: the string, spaces removed (as ``DictAction`` does); commas only
      inside brackets (``f(1,2)``) leave it a string (``DictAction`` recurses forever).

    Two additions to ``DictAction``: a value (or list element) in matching quotes, ``'1'``
    or ``"a, b"``, is that string as written (``DictAction`` strips the quotes and parses
    the rest, so ``'1'`` would be the int 1); a Python dict literal (what ``repr`` of a
    dict writes), ``{'embed_dims': (32, 64), '_delete_': True}``, is that dict, keys and
    values by these same rules (``DictAction`` has no dicts).

    Raises:
        ValueError: unbalanced brackets or quotes.
    """
    return _value(str(text), f"value {text!r}")


def parse_cfg_options(options: Union[Mapping[str, Any], Sequence[str], str, None]) -> Dict[str, Any]:
    """``--cfg-options`` of an OpenMMLab config as the dict for ``Config.merge_from_dict``.

    Args:
        options: ``key=value`` strings (``['model.backbone.frozen_stages=1', 'a.b=[1,2]']``,
            values by :func:`parse_cfg_value`), one such string, or a mapping (returned as a
            dict, values unchanged).

    Returns:
        The overrides, later keys winning (empty for ``None``).

    Raises:
        ValueError: an item without ``=`` or with an empty key, or a malformed value; the
            message names the item.
    """
    if not options:
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    if isinstance(options, str):
        options = [options]
    out: Dict[str, Any] = {}
    for item in options:
        item = str(item)
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"config override {item!r} is not KEY=VALUE "
                             "(e.g. train_cfg.max_iters=100)")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
            raise ValueError(f"config override {item!r}: {key!r} is not a dotted key "
                             "(e.g. model.backbone.drop_path_rate)")
        try:
            out[key] = parse_cfg_value(value)
        except ValueError as err:
            raise ValueError(f"config override {item!r}: {err}") from None
    return out


def d2_opts(options: Union[Mapping[str, Any], Sequence[str], None], framework: str) -> List[str]:
    """Overrides in the form detectron2 reads them (values parsed by detectron2 itself).

    Args:
        options: ``KEY=VALUE`` strings (a yacs config also takes ``KEY VALUE`` pairs), or a
            mapping (values turned into text).
        framework: ``'d2'`` (yacs: ``[KEY, VALUE, ...]``, for ``merge_from_list``) or
            ``'d2-lazy'`` (``['key=value', ...]``, for ``LazyConfig.apply_overrides``).

    Raises:
        ValueError: a LazyConfig override without ``=``; a yacs key without a value.
    """
    if framework not in DETECTRON2:
        raise ValueError(f"d2_opts: framework {framework!r} is not one of {', '.join(DETECTRON2)}")
    if isinstance(options, Mapping):
        items = [f"{k}={v}" for k, v in options.items()]
    else:
        items = [str(o) for o in (options or [])]
    if framework == "d2-lazy":
        bad = [o for o in items if "=" not in o]
        if bad:
            raise ValueError(f"LazyConfig overrides must be key=value, got {bad}")
        return items
    out: List[str] = []
    pending = None
    for item in items:
        if pending is not None:
            out += [pending, item]
            pending = None
        elif "=" in item:
            key, _, value = item.partition("=")
            out += [key, value]
        else:
            pending = item
    if pending is not None:
        raise ValueError(f"detectron2 override {pending!r} has no value (KEY VALUE or KEY=VALUE)")
    return out
