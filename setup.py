"""Copies the top-level conf/ into the wheel as aglcl/_conf, so installed scripts find their configs."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs read conf/ from the source tree (aglcl/paths.py)
        shutil.copytree(Path("conf"), Path(self.build_lib) / "aglcl" / "_conf", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
