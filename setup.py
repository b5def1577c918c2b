"""Build step that ships the configs in the package (metadata lives in pyproject.toml).

``configs/`` at the top of the repository is the editable source. A wheel (or sdist
install) gets a copy under ``rest_dense/.mim/configs``, as MMDetection ships its configs,
so that :func:`rest_dense.configs.get_config_path` works after ``pip install``. An editable
install reads ``configs/`` of the checkout directly and copies nothing.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_SUFFIXES = (".py", ".yaml", ".md")


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/`` into ``rest_dense/.mim/configs``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = os.path.join(HERE, "configs")
        dst = os.path.join(self.build_lib, "rest_dense", ".mim", "configs")
        if not os.path.isdir(src):  # building from an sdist that already holds the copy
            return
        shutil.rmtree(dst, ignore_errors=True)
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in files:
                if name.endswith(CONFIG_SUFFIXES):
                    rel = os.path.relpath(os.path.join(root, name), src)
                    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                    shutil.copy2(os.path.join(root, name), os.path.join(dst, rel))


setup(cmdclass={"build_py": BuildPyWithConfigs})
