"""hf_snr: the SNR preconditioner (population-risk training) for the Hugging Face training stack."""

from .optimizer import SNRAdamW

__version__ = "0.1.0"
__all__ = ["SNRAdamW"]
