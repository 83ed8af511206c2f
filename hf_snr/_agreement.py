"""agreement=<threshold>: micro-batch gradient agreement filtering (keep what the micro-batches agree on).

Label noise lives in examples (a swapped preference pair), not in coordinates: every coordinate sees a mix of
clean and swapped examples. What separates them is agreement between gradients of independent draws of
examples (Eddy & Kochenderfer 2024, gradient agreement filtering). With k >= 2 gradient-accumulation
micro-batches per optimizer step:

    S = c_1 (the first micro-batch starts the kept sum),  n = 1
    for j = 2..k:   cos_j = <c_j, S> / (|c_j| |S|)          one number over the whole model (scope="model")
                    keep c_j iff cos_j >= threshold:  S += c_j, n += 1
    gradient = S / n   (the mean of the kept micro-batch gradients; k/n times what plain accumulation would sum)

The unit is the global micro-batch: the j-th backward pass of every data-parallel rank together (the gradient
DDP / FSDP2 reduce over ranks). So the decisions depend only on the data of each global micro-batch, never on
the number of ranks: two ranks with half a micro-batch each decide exactly as one process seeing both halves,
and every rank makes the same decision (the parameters stay identical). The rule is sequential (the kept
sum so far) rather than leave-one-out because leave-one-out needs every micro-batch gradient at once (k
parameter-sized buffers); the kept sum needs one.

How it sees each micro-batch: :meth:`AgreementFilter.end_microbatch` runs after each backward (the Trainer
integration calls it after every ``training_step``; a plain loop calls ``optimizer.end_microbatch()``). Between
calls ``p.grad`` holds X = mean of the kept micro-batch gradients so far (in the loss's 1/k scale, times the
micro-batches seen), so the next backward leaves ``p.grad = X + c_j``, and c_j = p.grad - X is recovered in place
(no second buffer). After the decision ``p.grad`` is X again: clipping, logging and the step see the filtered mean.

Memory: one gradient-sized buffer X per parameter (sharded with the gradient under FSDP2). Time: per micro-batch
one subtraction, three dot products, a scale and a copy over the gradients. Communication: under DDP the
micro-batch gradient is all-reduced at every micro-batch (DDP's no_sync would otherwise hide it: the traffic of
sync_each_batch=True); under FSDP2 (which must reduce-scatter every micro-batch: sync_each_batch=True) three
scalars per micro-batch (three per tensor with scope="tensor"). DeepSpeed ZeRO keeps micro-batch gradients in
its own partition buffers: refused at argument time.

scope="tensor" decides per parameter tensor (a per-tensor cosine, a per-tensor kept count): the measured
alternative to one decision over the whole model.

A micro-batch is kept without a test when it is the first, when the kept sum is zero, when its gradient is
zero, or when its cosine is not finite (a nan / inf gradient: the non-finite policy then decides the step).

Imports only torch.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any

import torch

from ._distributed import all_reduce, local, shard_group

logger = logging.getLogger("hf_snr")

__all__ = ["AgreementFilter", "SCOPES"]

SCOPES = ("model", "tensor")

_MISSING_CALL = (
    "SNRAdamW(agreement={threshold}) needs optimizer.end_microbatch() after each backward pass of a gradient "
    "accumulation step (it compares each micro-batch's gradient with the ones kept so far), and step() was called "
    "without any. The Trainer integration (optim='snr_adamw') calls it for you; in a plain loop call "
    "optimizer.end_microbatch() right after every loss.backward()."
)


class AgreementFilter:
    """The kept-mean buffers of the current optimizer step, the decisions and their counts since the last read."""

    def __init__(self, threshold: float, scope: str = "model", reference: str = "kept"):
        self.threshold = float(threshold)
        self.scope = scope
        self.reference = reference
        self.kept_mean: dict[torch.Tensor, torch.Tensor] = {}  # p -> X (local shard), see the module docstring
        self.seen = 0                                          # micro-batches of this step so far
        self.model_kept = 0                                    # ... and how many were kept (scope="model")
        self.kept: dict[torch.Tensor, int] = {}                # p -> micro-batches kept for p this step
        self.group: Any = "auto"                               # data-parallel replicas (DDP); None: local
        self._grads: dict[torch.Tensor, Any] = {}              # p -> weak reference to the p.grad we left
        self.last: dict[str, float] = {}                       # the latest step's counts
        self._reset_totals()

    def __getstate__(self):
        state = dict(self.__dict__, _grads={})
        if state["group"] is not None:
            state["group"] = "auto"
        return state

    def _reset_totals(self) -> None:
        self.totals = dict(microbatches=0.0, kept=0.0, decided=0.0, decided_kept=0.0, cos_sum=0.0, cos_n=0.0,
                           tensor_cos_sum=0.0, tensor_cos_n=0.0, clean=0.0, clean_kept=0.0, swapped=0.0,
                           swapped_kept=0.0, steps=0.0)

    # -- the data-parallel group --------------------------------------------------------------------
    def _replica_group(self, params):
        if self.group != "auto":
            return self.group
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and not any(shard_group(p) is not None for p in params):
            logger.warning("hf_snr: agreement averages each micro-batch gradient over all %d ranks of the default "
                           "process group (data-parallel replicas, as DDP) before its decision; set "
                           "optimizer.agreement_group to change it", dist.get_world_size())
            self.group = dist.group.WORLD
        else:
            self.group = None
        return self.group

    # -- one micro-batch ----------------------------------------------------------------------------
    @torch.no_grad()
    def end_microbatch(self, all_params, *, flipped=None, synced: bool | None = None, momentum=None) -> float:
        """Decide the micro-batch whose backward just ended; returns the share kept (1.0 or 0.0 with scope="model",
        the numel-weighted share of tensors kept with scope="tensor").

        ``flipped``: optional flags of this rank's examples in the micro-batch (True: a swapped pair), counted in
        the kept shares of clean and swapped content. ``synced``: True when the backend already averaged this
        micro-batch's gradient over the data-parallel ranks (DDP's sync step); None: not known, averaged again
        (idempotent, one more all-reduce). ``momentum``: with reference="momentum", {p: the optimizer's first
        moment} (None before the first step: the kept-sum rule is used until there is one).
        """
        params = [p for p in all_params if p.grad is not None]
        if self.seen > 0 and any(p in self.kept and (p.grad is None or (r := self._grads.get(p)) is None
                                                  or r() is not p.grad)
                                 for p in all_params):
            # the gradients were cleared (set to None) without a step, e.g. a skipped AMP step: a new
            # accumulation begins
            self.seen = 0
            self.kept.clear()
        if not params:
            raise RuntimeError("optimizer.end_microbatch(): no parameter has a gradient (call it after backward)")
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("agreement does not support sparse gradients")
        grads = [local(p.grad) for p in params]
        replicas = self._replica_group(all_params)
        use_momentum = self.reference == "momentum" and momentum is not None
        if self.seen == 0 and use_momentum:  # every micro-batch is tested, the first too: start from nothing kept
            for p, g in zip(params, grads):
                x = self.kept_mean.get(p)
                if x is None or x.shape != g.shape or x.dtype != g.dtype or x.device != g.device:
                    self.kept_mean[p] = torch.zeros_like(g)
                else:
                    x.zero_()
                self.kept[p] = 0
            self.model_kept = 0
        elif self.seen == 0:
            if replicas is not None and not synced:
                self._average(grads, replicas)
            for p, g in zip(params, grads):
                x = self.kept_mean.get(p)
                if x is None or x.shape != g.shape or x.dtype != g.dtype or x.device != g.device:
                    self.kept_mean[p] = g.clone()
                else:
                    x.copy_(g)
                self.kept[p] = 1
            self.seen = 1
            self.model_kept = 1
            self._remember(params)
            self._count(1.0, None, None, flipped, decided=False)
            return 1.0

        m = self.seen
        xs = []
        for p, g in zip(params, grads):
            x = self.kept_mean.get(p)
            if p not in self.kept:  # p's first gradient in this step: the micro-batches before gave it zeros,
                # kept as the model's were (scope="model") or all (a zero gradient is kept, scope="tensor")
                if x is None or x.shape != g.shape or x.dtype != g.dtype or x.device != g.device:
                    x = self.kept_mean[p] = torch.zeros_like(g)
                else:
                    x.zero_()
                self.kept[p] = self.model_kept if self.scope == "model" else m
            xs.append(x)
        torch._foreach_sub_(grads, xs)  # p.grad = c_j (local, or already averaged if the backend synced)
        if replicas is not None and not synced:
            self._average(grads, replicas)
        refs = [local(momentum[p]) if p in momentum else torch.zeros_like(g) for p, g in zip(params, grads)] \
            if use_momentum else xs
        sums = self._dot_products(params, grads, refs)  # (T, 3) float64: <c, R>, |c|^2, |R|^2 per tensor
        if self.scope == "model":
            dot, cc, xx = sums.sum(0).tolist()
            keep_model = self._keep(dot, cc, xx)
            keeps = [keep_model] * len(params)
            cos_model = dot / math.sqrt(cc * xx) if cc > 0 and xx > 0 else None
        else:
            keeps = [self._keep(*row) for row in sums.tolist()]
            cos_model = None
        tensor_cos = [d / math.sqrt(c * x) for d, c, x in sums.tolist() if c > 0 and x > 0 and math.isfinite(d)]

        # X <- (X n/m + keep c) (m+1)/n'  with n' = n + keep: the mean of the kept ones, times (m+1) micro-batches
        scale_x, scale_c = [], []
        for p, keep in zip(params, keeps):
            n = self.kept[p]
            n_new = n + int(keep)
            scale_x.append(n * (m + 1) / (m * n_new) if n_new and n else 0.0)
            scale_c.append((m + 1) / n_new if keep else 0.0)
            self.kept[p] = n_new
        if self.scope == "model":  # one scale for every tensor (a late joiner's X is zero): two passes fewer
            if scale_x[0] != 1.0:
                torch._foreach_mul_(xs, scale_x[0])
            if keeps[0]:
                torch._foreach_add_(xs, grads, alpha=scale_c[0])
        else:
            torch._foreach_mul_(xs, scale_x)
            torch._foreach_mul_(grads, scale_c)
            torch._foreach_add_(xs, grads)
        torch._foreach_copy_(grads, xs)
        self.seen = m + 1
        self._remember(params)
        if self.scope == "model":
            self.model_kept += int(keeps[0])
        numels = [p.numel() for p in params]  # (global sizes: a DTensor's numel is the whole tensor's)
        share = sum(n for n, k in zip(numels, keeps) if k) / max(1, sum(numels))
        self._count(share, cos_model, tensor_cos, flipped, decided=True)
        return share

    def _remember(self, params) -> None:
        for p in params:
            self._grads[p] = weakref.ref(p.grad)

    def _keep(self, dot: float, cc: float, xx: float) -> bool:
        if cc == 0.0 or xx == 0.0 or not (math.isfinite(dot) and math.isfinite(cc) and math.isfinite(xx)):
            return True
        return dot / math.sqrt(cc * xx) >= self.threshold

    @staticmethod
    def _average(grads, group) -> None:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        if all(g.device.type == "cpu" for g in grads) or dist.get_backend(group) != "gloo":
            works = [dist.all_reduce(g, group=group, async_op=True) for g in grads]
            for w in works:
                w.wait()
        else:  # gloo with device tensors: through the CPU
            for g in grads:
                g.copy_(all_reduce(g, group))
        torch._foreach_div_(grads, float(world))

    def _dot_products(self, params, cs, xs) -> torch.Tensor:
        if not cs:
            return torch.zeros(0, 3, dtype=torch.float64)
        if all(c.dtype in (torch.float32, torch.float64) and x.dtype == c.dtype for c, x in zip(cs, xs)):
            dots = [torch.dot(c.reshape(-1), x.reshape(-1)) for c, x in zip(cs, xs)]
            cc = torch.stack(torch._foreach_norm(cs)).double() ** 2  # (fused: one call for all tensors)
            xx = torch.stack(torch._foreach_norm(xs)).double() ** 2
            sums = torch.stack([torch.stack(dots).double(), cc, xx], dim=1).cpu()
        else:  # half-precision gradients: products and sums in fp32
            rows = []
            for c, x in zip(cs, xs):
                c1, x1 = c.reshape(-1).float(), x.reshape(-1).float()
                rows.append(torch.stack([torch.dot(c1, x1), torch.dot(c1, c1), torch.dot(x1, x1)]).double())
            sums = torch.stack(rows).cpu()
        sharded = [i for i, p in enumerate(params) if shard_group(p) is not None]
        if sharded:  # dot products and norms add up over shards: one small all-reduce per micro-batch
            group = shard_group(params[sharded[0]])
            idx = torch.tensor(sharded)
            sums[idx] = all_reduce(sums[idx], group)
        return sums

    # -- counts ---------------------------------------------------------------------------------------
    def _count(self, share, cos_model, tensor_cos, flipped, *, decided: bool) -> None:
        t = self.totals
        t["microbatches"] += 1
        t["kept"] += share
        if decided:
            t["decided"] += 1
            t["decided_kept"] += share
        if cos_model is not None and math.isfinite(cos_model):
            t["cos_sum"] += cos_model
            t["cos_n"] += 1
        if tensor_cos:
            t["tensor_cos_sum"] += sum(tensor_cos) / len(tensor_cos)
            t["tensor_cos_n"] += 1
        if flipped is not None:
            f = torch.as_tensor(flipped).reshape(-1).bool()
            n_swapped = int(f.sum())
            n_clean = f.numel() - n_swapped
            t["swapped"] += n_swapped
            t["swapped_kept"] += n_swapped * share
            t["clean"] += n_clean
            t["clean_kept"] += n_clean * share

    def finish_step(self) -> None:
        """At step(): the accumulation is over (p.grad holds the kept mean); the next micro-batch starts afresh."""
        if self.seen == 0:
            raise RuntimeError(_MISSING_CALL.format(threshold=self.threshold))
        if self.scope == "model":
            kept = self.model_kept / self.seen
        else:
            kept = sum(self.kept.values()) / (len(self.kept) * self.seen) if self.kept else 1.0
        self.last = {"microbatches": float(self.seen), "kept": kept}
        self.totals["steps"] += 1
        self.seen = 0
        self.kept.clear()

    def reset(self) -> None:
        """A skipped step: forget the micro-batches seen."""
        self.seen = 0
        self.kept.clear()

    def read(self, reset: bool = True) -> dict[str, float]:
        """Shares since the last read: ``kept`` (of all micro-batches, the first of each step included),
        ``kept_tested`` (of the micro-batches tested against a kept sum), ``cosine`` (mean whole-model cosine of
        the tested ones), ``cosine_tensor`` (mean per-tensor cosine), ``kept_clean`` / ``kept_swapped`` (share of
        clean / swapped examples whose micro-batch was kept) where flags were given. {} when nothing was seen."""
        t = self.totals
        out: dict[str, float] = {}
        if t["microbatches"]:
            out["kept"] = t["kept"] / t["microbatches"]
        if t["decided"]:
            out["kept_tested"] = t["decided_kept"] / t["decided"]
        if t["cos_n"]:
            out["cosine"] = t["cos_sum"] / t["cos_n"]
        if t["tensor_cos_n"]:
            out["cosine_tensor"] = t["tensor_cos_sum"] / t["tensor_cos_n"]
        if t["clean"]:
            out["kept_clean"] = t["clean_kept"] / t["clean"]
        if t["swapped"]:
            out["kept_swapped"] = t["swapped_kept"] / t["swapped"]
        if reset:
            self._reset_totals()
        return out
