"""hf_snr: the SNR preconditioner (population-risk training) for the Hugging Face training stack.

``import hf_snr`` makes ``optim="snr_adamw"`` a name transformers accepts: it registers the name as
soon as transformers' training modules are imported (at once if they already are), through the
post-import hooks of :mod:`hf_snr._hooks`. The package also installs a ``.pth`` start-up hook, so
the name works in tools that never import hf_snr (``trl dpo --optim snr_adamw``); set
``HF_SNR_AUTOREGISTER=0`` to turn that off. If transformers' internals changed, registration warns
with the reason and ``hf_snr.register()`` raises it; the explicit route
:func:`snr_optimizer_cls_and_kwargs` keeps working.

Importing the package or the optimizer imports neither transformers nor trl: every public name
below loads its module on first use (``from hf_snr import SNRAdamW`` imports torch only).
"""

import importlib

from . import _hooks

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first use)
_LAZY = {
    "SNRAdamW": "optimizer",
    "SNR_OPTIM_NAME": "options",
    "SNROptions": "options",
    "parse_optim_args": "options",
    "snr_optimizer_cls_and_kwargs": "integration",
    "SNRCallback": "integration",
    "attach_snr": "integration",
    "unwrap_optimizer": "integration",
    "SNR_METRICS": "integration",
    "register": "registration",
    "is_registered": "registration",
    "SNRRegistrationError": "registration",
    "SNRDPOConfig": "dpo",
    "SNRDPOTrainer": "dpo",
    "DPO_METRICS": "dpo",
    "cdpo_loss": "dpo",
    "swap_preferences": "data",
    "MemorizationStoppingCallback": "monitor",
    "MemorizationRule": "monitor",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_snr' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


_hooks.install()

__all__ = list(_LAZY)
