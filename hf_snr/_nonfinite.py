"""The non-finite decision of an SNRAdamW step: the checks, the device-side skips, skip and raise.

``nonfinite="skip"`` (the default) must know that every gradient is finite before anything is written (no
fp32 update of m, v, s or p can be undone bit for bit). Where the check runs:

* every group on the fused CUDA kernel: on the device (a found_inf flag the kernels read; no host sync), the
  count read later with the statistics (:class:`DeviceSkips`);
* every group on the fused CPU kernel, unsharded, no micro-batch variance: inside the step's first kernel
  call, before it writes (:func:`kernel_check` names the gradients it reads);
* otherwise a separate read of the gradients first (:func:`all_finite`: the C loop once the kernel is
  loaded, else torch), all-reduced under sharding.

Imports only torch (the kernel modules on first use).
"""

from __future__ import annotations

import math
import warnings

import torch

from ._distributed import all_reduce, local

__all__ = ["all_finite", "all_fused_on_cuda", "device_found_inf", "kernel_check", "DeviceSkips", "count_skip",
           "check_limit"]


def _grads(param_groups) -> list[torch.Tensor]:
    grads = [local(p.grad) for g in param_groups for p in g["params"] if p.grad is not None]
    return [g for g in grads if g.numel() > 0]


def all_finite(param_groups, group) -> bool:
    """Whether every gradient is finite (one read of them; a host sync; a max all-reduce over ``group``)."""
    from . import fused_cpu

    grads = _grads(param_groups)
    if grads and all(g.device.type == "cpu" and g.is_contiguous() and g.dtype in (torch.float32, torch.bfloat16)
                     for g in grads) and fused_cpu.is_loaded():
        flag = torch.tensor(float(fused_cpu.any_nonfinite(grads)))  # one read of the gradients in C
    elif grads:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        dev0 = grads[0].device
        flag = torch.zeros((), device=dev0)
        for dev, dev_grads in by_device.items():
            # per-tensor extremes: finite iff the tensor is (their sum could overflow fp32). On CPU
            # aminmax reads a tensor several times faster than the inf-norm kernel does.
            if dev.type == "cpu":
                ext = torch.stack([e.float() for g in dev_grads for e in torch.aminmax(g)])
            else:
                ext = torch.stack([n.float() for n in torch._foreach_norm(dev_grads, ord=math.inf)])
            flag = flag + (~torch.isfinite(ext)).any().float().to(dev0)
    else:
        flag = torch.zeros(())
    if group is not None:
        flag = all_reduce(flag, group, op="max")
    return flag.item() == 0


def all_fused_on_cuda(param_groups) -> bool:
    """Every group runs the fused CUDA kernel this step (then the non-finite skip is decided on the device)."""
    params = [p for g in param_groups for p in g["params"] if p.grad is not None]
    if not params or not all(g["fused"] for g in param_groups):
        return False
    if not all(local(p).device.type == "cuda" and local(p).is_contiguous()
               and local(p).dtype in (torch.float32, torch.bfloat16) for p in params):
        return False  # (the conditions of _fused.unavailable: every group then runs the fused kernel)
    from . import fused_triton

    return fused_triton.available()


def device_found_inf(param_groups, group) -> torch.Tensor:
    """A (1,) device flag: 1 where some gradient holds inf or nan (no host sync; a max all-reduce when sharded)."""
    norms = torch._foreach_norm(_grads(param_groups), ord=math.inf)
    flag = (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float().reshape(1)
    if group is not None:
        flag = all_reduce(flag, group, op="max")
    return flag


def kernel_check(prepared, sharded: bool, fused_path) -> list | None:
    """The gradients for the fused CPU kernel to check (the non-finite check folded into its first call).

    Only when every group runs that kernel (then no group writes before the check) and the decision is
    local: no statistics group (sharded runs all-reduce it), no micro-batch variance (its sums are reset
    on a skip before the kernel runs). None: the separate check runs first.
    """
    if not prepared or sharded:
        return None
    grads = []
    for args, tensors, path in prepared:
        if path is not fused_path or args.variance == "microbatch" or local(tensors.params[0]).device.type != "cpu":
            return None
        grads.extend(tensors.grads)
    return grads


class DeviceSkips:
    """Steps skipped on the device (CUDA fused) since the counts were last read, without a host sync."""

    def __init__(self):
        self.total: torch.Tensor | None = None  # steps skipped
        self.run: torch.Tensor | None = None    # ... the latest of them in a row
        self.attempts = 0                       # steps decided on the device

    def add(self, flag: torch.Tensor) -> None:
        self.total = flag if self.total is None else self.total + flag
        self.run = flag if self.run is None else self.run * flag + flag
        self.attempts += 1

    def take(self) -> tuple[int, int, int] | None:
        """(attempts, skipped, skipped in a row at the end) since the last take, and reset; None: none decided."""
        if self.total is None:
            return None
        out = self.attempts, int(self.total.item()), int(self.run.item())
        self.total, self.run, self.attempts = None, None, 0
        return out


def count_skip(snr_state: dict, policy: str, limit: int) -> None:
    """A step skipped on the host: raise (policy "raise"), else count it, check the limit and warn (rate-limited)."""
    attempt = snr_state["steps"] + snr_state["skipped_steps"] + 1  # the optimizer step this was (the global step)
    if policy == "raise":
        raise RuntimeError(f"SNRAdamW: non-finite (inf/nan) gradient at optimizer step {attempt}; "
                           "nothing was updated (nonfinite='raise')")
    snr_state["skipped_steps"] += 1
    snr_state["consecutive_skips"] = snr_state.get("consecutive_skips", 0) + 1
    check_limit(snr_state, limit, attempt)
    n = snr_state["skipped_steps"]
    if n & (n - 1) == 0:  # rate-limited: at 1, 2, 4, 8, ... skipped steps
        warnings.warn(
            f"SNRAdamW skipped step {attempt}: non-finite gradient ({n} skipped so far, "
            f"{snr_state['consecutive_skips']} in a row; nonfinite='skip'). Further skips are warned at 2^k skipped "
            "steps; the count is logged as snr/skipped_steps.",
            RuntimeWarning,
            stacklevel=4,
        )


def check_limit(snr_state: dict, limit: int, attempt: int) -> None:
    """RuntimeError once more than ``limit`` (> 0) steps in a row were skipped."""
    run = snr_state.get("consecutive_skips", 0)
    if limit and run > limit:
        raise RuntimeError(
            f"SNRAdamW: {run} optimizer steps in a row had a non-finite gradient (up to step {attempt}); "
            f"nonfinite='skip' skipped them all, leaving parameters and state as they were at step "
            f"{attempt - run}, and max_consecutive_skips={limit} stops the run here instead of letting it burn "
            "its budget. Look for the cause (learning rate, loss scale, a corrupt batch or checkpoint); "
            "max_consecutive_skips=0 removes the limit."
        )


def fold_device_skips(snr_state: dict, taken: tuple[int, int, int], states, limit: int) -> int:
    """Fold what :meth:`DeviceSkips.take` returned into the host counts (each tensor's step count loses the skips
    its own device counter saw, so the counts are the steps taken, as on the other paths). Returns the skips."""
    attempts, skipped, run = taken
    if attempts:
        snr_state["consecutive_skips"] = snr_state.get("consecutive_skips", 0) + skipped if skipped == attempts \
            else run
    if not skipped:
        return 0
    states = [st for st in states if isinstance(st, dict) and "device_skips" in st]
    counts = torch.cat([st["device_skips"] for st in states]).cpu().tolist() if states else []
    for st, n in zip(states, counts):
        if n:
            st["step"].sub_(n)
            st["device_skips"].zero_()
    snr_state["steps"] -= skipped
    snr_state["skipped_steps"] += skipped
    warnings.warn(f"SNRAdamW skipped {skipped} of the last {attempts} optimizer step(s) on the device: non-finite "  # noqa: B028 (stacklevel would move the reported location)
                  f"gradient ({snr_state['skipped_steps']} skipped so far, the last "
                  f"{snr_state['consecutive_skips']} in a row; nonfinite='skip')", RuntimeWarning)
    check_limit(snr_state, limit, snr_state["steps"] + snr_state["skipped_steps"])
    return skipped
