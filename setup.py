"""Installs hf_snr-autoregister.pth next to the package (wheel and editable installs alike).

The .pth line runs at interpreter start-up and imports only hf_snr's stdlib-only __init__, which
installs post-import hooks: ``optim="snr_adamw"`` then works in tools that never import hf_snr
(``trl dpo --optim snr_adamw``). ``HF_SNR_AUTOREGISTER=0`` switches it off. Everything else about
the package is in pyproject.toml.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "hf_snr-autoregister.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    """Wheels: the .pth goes to the root of the wheel, which pip installs into site-packages."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class editable_wheel_with_pth(editable_wheel):
    """pip install -e: setuptools builds the editable wheel from this folder; put the .pth in it too."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(os.path.join(HERE, PTH), os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
