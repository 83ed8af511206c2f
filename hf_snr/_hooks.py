"""Post-import hooks: register ``optim="snr_adamw"`` the moment transformers' training modules load.

Two ways in, one mechanism:

* ``import hf_snr`` calls :func:`install` (and so does nothing else heavy: the optimizer alone
  never imports transformers);
* the ``hf_snr-autoregister.pth`` file that the package installs into site-packages calls
  :func:`install` at interpreter start-up, so tools that never import hf_snr (``trl dpo``,
  ``accelerate launch`` of TRL's scripts, axolotl, your own launcher) accept ``--optim snr_adamw``.
  Set ``HF_SNR_AUTOREGISTER=0`` to switch that off.

:func:`install` puts a finder on ``sys.meta_path`` that watches three modules and, right after each
has executed, registers the part of hf_snr that touches it (see :mod:`hf_snr.registration`):
``transformers.training_args`` (the name and the argument checks), ``transformers.trainer_optimizer``
(the name -> optimizer handler) and ``transformers.trainer`` (risk logging on every Trainer). Modules
already imported are handled at once. The finder only compares names for every other import, and
this module imports only the standard library, so an interpreter that never imports transformers
pays nothing measurable (``python -X importtime`` shows it).
"""

from __future__ import annotations

import importlib.util
import os
import sys

ENV_SWITCH = "HF_SNR_AUTOREGISTER"
# module -> name of the hf_snr.registration function that registers the part touching it
WATCHED = {
    "transformers.training_args": "register_training_args",
    "transformers.trainer_optimizer": "register_handler",
    "transformers.trainer": "register_trainer",
}

# Imports hold the import lock and registration is idempotent: no lock of our own (threading and
# importlib.abc alone would cost several milliseconds at every interpreter start).
_done: set[str] = set()


def autoregister_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _fire(name: str, module) -> None:
    if name in _done:
        return
    _done.add(name)
    try:
        from . import registration

        getattr(registration, WATCHED[name])(module)
    except Exception as err:  # never break the user's import of transformers; say why the name is unavailable
        import warnings

        warnings.warn(f"hf_snr: optim='snr_adamw' is not available: {err}", RuntimeWarning, stacklevel=3)


class _Loader:
    """Delegates to the real loader and calls hf_snr's registration once the module has executed."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _fire(self._name, module)

    def __getattr__(self, attr):  # get_source, get_filename, is_package, ...: what inspect and linecache use
        return getattr(self._loader, attr)


class _Finder:
    def __init__(self):
        self._busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED or fullname in self._busy or fullname in _done:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec


_finder: _Finder | None = None


def install() -> None:
    """Watch the three transformers modules (idempotent); register at once for those already imported."""
    global _finder
    if _finder is None:
        _finder = _Finder()
        sys.meta_path.insert(0, _finder)
    for name in WATCHED:
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
            _fire(name, module)


def _reset_for_tests() -> None:
    """Forget which parts fired (tests re-run registration against patched internals)."""
    _done.clear()
