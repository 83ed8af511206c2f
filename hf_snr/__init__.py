"""hf_snr: the SNR preconditioner (population-risk training) for the Hugging Face training stack.

``import hf_snr`` registers ``optim="snr_adamw"`` with transformers (see :mod:`hf_snr.registration`).
If transformers' internals changed, the import warns with the reason and ``hf_snr.register()``
raises it; the explicit route :func:`snr_optimizer_cls_and_kwargs` keeps working.
"""

import warnings

from .optimizer import SNRAdamW
from .options import SNR_OPTIM_NAME, SNROptions, parse_optim_args
from .integration import SNR_METRICS, SNRCallback, attach_snr, snr_optimizer_cls_and_kwargs, unwrap_optimizer
from .registration import SNRRegistrationError, is_registered, register

__version__ = "0.1.0"

# TRL-dependent and data helpers load on first use, so `import hf_snr` does not import trl.
_LAZY = {
    "SNRDPOConfig": "dpo",
    "SNRDPOTrainer": "dpo",
    "DPO_METRICS": "dpo",
    "cdpo_loss": "dpo",
    "swap_preferences": "data",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_snr' has no attribute {name!r}")


try:
    register()
except SNRRegistrationError as _err:  # pragma: no cover - depends on the installed transformers
    warnings.warn(str(_err), RuntimeWarning, stacklevel=2)

__all__ = [
    "SNRAdamW",
    "SNR_OPTIM_NAME",
    "SNROptions",
    "parse_optim_args",
    "snr_optimizer_cls_and_kwargs",
    "SNRCallback",
    "attach_snr",
    "unwrap_optimizer",
    "SNR_METRICS",
    "register",
    "is_registered",
    "SNRRegistrationError",
    *_LAZY,
]
