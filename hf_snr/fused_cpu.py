"""Fused CPU kernel for the SNRAdamW step: one pass over p, g, m, v, s per parameter group.

The C source next to this file (``_snr_cpu.c``) is compiled at first use with the system C compiler
(``$HF_SNR_CC``, default ``gcc``) into a cache folder (``$HF_SNR_CACHE``, default
``~/.cache/hf_snr``) and loaded with ctypes; no torch headers are involved (about a second). The
file name, ``_snr_cpu-<key>-<sha256>.so``, carries a hash of the source, the compiler's version,
the flags and the CPU (the ``flags`` line of /proc/cpuinfo and ``platform.machine()``), so a
changed machine recompiles, and the sha256 of the file's own content (its manifest). It is built
in a private subfolder and renamed into place, so two processes starting at once are safe.
Before anything is loaded (dlopen runs a library's code), the cache folder must be a directory
owned by this user and not writable by group or others (one created here gets mode 0700 whatever
the umask), and the file a regular file, owned by this user, not writable by others, whose content
hashes to the sha256 in its name. A folder or file that fails is refused with a RuntimeWarning
(once per process) naming it and the reason, and the kernel is built again: in the cache folder
when only the file was refused, else in a fresh private 0700 temporary folder (removed at exit);
there is no shared fallback folder.
When no compiler is found or the build or the load fails, :func:`available` is False and
:func:`unavailable_reason` says why (the caller falls back to the torch implementation).

Math, per element, in fp32 IEEE arithmetic (no -ffast-math; the order of operations is that of
torch's CPU kernels, so m, v, s equal the torch implementation bit for bit and p within a few ulps:
torch's CPU sqrt, from MKL's VML, is off by one ulp on ~20% of elements, the kernel's is IEEE)::

    variance "ema":        d = g - m ; s = rho s + (1 - rho) d^2            (m: the previous m)
    variance "microbatch": s = rho s + (1 - rho) max(sq a - g^2 b, 0) ; sq = 0   (a, b: sq_scale, g2_scale)
    m = lerp(m, g, 1 - beta1) ; v = beta2 v + (1 - beta2) g^2
    m_hat = m / bc1 ; mu2 = m_hat^2 ("ema") or g^2 ("step") ; sig2 = s / bcr * noise_scale
    q = 1 (gate_open) | q_rows[row] | mask(mu2, sig2)
    p = p (1 - lr wd)  or  p - lr wd (p - p0) ; p = p - lr q m_hat / (sqrt(v / bc2) + eps)

bf16 parameters/gradients/variance/anchors are read as fp32 and stored rounded to nearest even;
the variance's sig2 uses the stored (rounded) value, as a second pass reading it would.

API (all tensors contiguous CPU tensors; a group that mixes dtype signatures, p/g x s x p0, runs
one kernel call per signature; see :func:`step`):

* :func:`step` — moments, element gate (or an open gate) and update, in one pass.
* :func:`moments` + :func:`update` — the two passes of a row / whole-tensor gate: ``moments``
  updates s, m, v (and zeroes sq) and returns the per-row sums of mu2 and sig2; the caller turns
  them into one gate per row (:func:`gate` does it locally, after any all-reduce) and ``update``
  applies the gated step. ``update`` never touches m, v, s.

Threads: the group's elements are cut into ``num_threads`` (default ``torch.get_num_threads()``)
equal ranges, fewer for groups under 32768 elements a thread, run by OpenMP on torch's own libgomp
(the one runtime in the process, so no oversubscription). Elementwise results never depend on
the split; sums depend on the number of ranges only.

Statistics (``want_stats=True``) come back as 5 Python floats, accumulated in double and
deterministic for a given thread count: ``(mask_sum, mask_count, active_count, signal, noise)``
with seen = v > 0 and u = lr q / denom: sum of q over seen coordinates, number seen, number seen
with q > 0.5, sum of u mu2, alpha * sum of u sig2.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from array import array
from typing import Sequence

import torch

from . import _fused_common as _common

__all__ = ["available", "unavailable_reason", "is_loaded", "step", "moments", "update", "gate", "library_path",
           "any_nonfinite", "NonFiniteGradient"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_snr_cpu.c")
_ABI = 4
_BASE_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
# Tried in order: the fast build, then one without -march=native / OpenMP (e.g. a compiler that
# lacks them); the chosen flags are part of the cache key.
_FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())

_FP32_MAX = _common.FP32_MAX
_describe = _common.describe
_PASS_FULL, _PASS_MOMENTS, _PASS_UPDATE = _common.PASS_FULL, _common.PASS_MOMENTS, _common.PASS_UPDATE


class _Args(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in (
        "beta1", "beta2", "rho", "omb1", "omb2", "omr", "lr", "eps", "decay_mul", "lrwd",
        "alpha", "softness", "c", "mb_a", "mb_b")] + [
        (name, ctypes.c_int32) for name in (
            "pass_", "mask", "signal", "variance", "decay", "want_stats", "rows", "pad_",
            "p_bf16", "s_bf16", "p0_bf16", "nthreads")] + [
        ("ntensors", ctypes.c_int64),
        ("ptrs", ctypes.c_void_p),
        ("numel", ctypes.c_void_p),
        ("row_len", ctypes.c_void_p),
        ("row_off", ctypes.c_void_p),
        ("nrows", ctypes.c_void_p),
        ("tsc", ctypes.c_void_p),
        ("tsc_stride", ctypes.c_int64),
        ("q_rows", ctypes.c_void_p),
        ("row_sums", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("ncheck", ctypes.c_int64),
        ("check_ptrs", ctypes.c_void_p),
        ("check_numel", ctypes.c_void_p),
        ("check_bf16", ctypes.c_void_p),
        ("found", ctypes.c_void_p),
    ]


class NonFiniteGradient(ArithmeticError):
    """Raised by a call given ``check_finite`` when one of those tensors holds inf or nan: nothing was written."""


# -- building and loading ------------------------------------------------------------------------
_lock = threading.Lock()
_state: dict = {}  # "lib", "reason", "path" once loaded (or failed)
_warned: set = set()  # the refusals already reported by this process
_NAME = "_snr_cpu-{key}-{digest}.so"


def _cpu_id() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[-1].strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> str:
    return os.environ.get("HF_SNR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_snr")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _owner_mode_problem(st) -> str | None:
    """Why a file or folder with this stat may not be trusted (None: it may): owned by someone else, or
    writable by group or others."""
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _folder_problem(folder: str) -> str | None:
    """Create ``folder`` if missing and say why it may not hold kernels (None: it may).

    The folders created here (the leaf and any missing parent) get mode 0700 whatever the umask;
    existing parents are not checked, only the leaf, which must be a directory owned by this user
    and not writable by group or others.
    """
    missing, d = [], folder
    while not os.path.lexists(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue  # made meanwhile (another process): vetted below like any existing folder
            os.chmod(d, 0o700)  # mkdir's mode goes through the umask: set it explicitly
        st = os.stat(folder)
    except OSError as e:
        return f"cannot be created or read ({e})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return _owner_mode_problem(st)


def _sha256_fd(fd) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _file_problem(path: str, digest: str) -> str | None:
    """Why the library at ``path`` may not be loaded (None: it may): it must be a regular file (not a
    link) owned by this user, not writable by group or others, whose sha256 is ``digest``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        return f"cannot be opened ({e})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        problem = _owner_mode_problem(st)
        if problem is not None:
            return problem
        actual = _sha256_fd(fd)
    except OSError as e:
        return f"cannot be read ({e})"
    finally:
        os.close(fd)
    if actual != digest:
        return f"does not match its manifest (sha256 {actual[:16]}..., its name records {digest[:16]}...)"
    return None


def _load_vetted(path: str, digest: str, errors: list):
    """dlopen ``path`` only once :func:`_file_problem` passes. Returns (lib, None) or (None, problem).

    The file is hashed by path, then loaded by path: nothing in between pins the content. What does
    is the folder: the caller only passes a file in a folder this user owns and nobody else can
    write (:func:`_folder_problem`), and the file itself is ours and not writable by others, so
    nobody but this user (or root) can swap or rewrite it between the hash and the dlopen.
    """
    problem = _file_problem(path, digest)
    if problem is not None:
        return None, problem
    return _open(path, errors), None


def _cached(folder: str, key: str, errors: list):
    """A vetted library for ``key`` in ``folder`` (lib, path), or (None, None). Files that fail the
    check are reported (once per process) and removed (the folder is ours)."""
    prefix = f"_snr_cpu-{key}-"
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".so"))
    except OSError:
        return None, None
    for name in names:
        path = os.path.join(folder, name)
        digest = name[len(prefix):-3]
        if len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest):
            lib, problem = _load_vetted(path, digest, errors)
            if lib is not None:
                return lib, path
            if problem is None:
                continue  # our own file, but it does not load (see errors): built again below
        else:
            problem = "has no sha256 manifest in its name"
        _warn_once(f"hf_snr: refusing the cached fused CPU kernel {path}: it {problem}; building it again")
        try:
            os.unlink(path)
        except OSError:
            pass
    return None, None


def _compile(exe: str, flags, key: str, folder: str, errors: list) -> str | None:
    """Compile into ``folder``; returns the library's path, or None when these flags fail (see errors).
    Raises OSError when the folder cannot be written.

    Races: the compiler writes into a fresh 0700 subfolder nobody else can enter; the result is made
    0600, hashed, and renamed (atomic) to ``_snr_cpu-<key>-<sha256>.so``: its manifest is its name,
    so a file under its final name is complete and, unless tampered with, matches its name; there is
    no separate manifest that a concurrent loader could see out of step with the file. Two
    processes building at once rename identical bytes onto the same name (the build is
    deterministic); if it were not, each file still matches its own name and either may be loaded.
    """
    work = tempfile.mkdtemp(prefix=".build-", dir=folder)
    try:
        os.chmod(work, 0o700)
        tmp = os.path.join(work, "_snr_cpu.so")
        what = f"{os.path.basename(exe)} {' '.join(flags)}"
        try:
            res = subprocess.run([exe, *flags, "-o", tmp, _SOURCE], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{what}: {e}")
            return None
        if res.returncode != 0 or not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            errors.append(f"{what}: {res.stderr.strip()[-400:] or 'no output'}")
            return None
        os.chmod(tmp, 0o600)  # the linker creates it under the umask
        fd = os.open(tmp, os.O_RDONLY)
        try:
            digest = _sha256_fd(fd)
        finally:
            os.close(fd)
        path = os.path.join(folder, _NAME.format(key=key, digest=digest))
        os.replace(tmp, path)  # atomic: a concurrent loader sees no file or a complete one
        return path
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _private_folder() -> str:
    """A fresh 0700 folder for this process's build (removed when it exits)."""
    folder = tempfile.mkdtemp(prefix="hf_snr-")
    os.chmod(folder, 0o700)
    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(folder, ignore_errors=True))
    return folder


def _build(cc: str | None = None, cache_dir: str | None = None):
    """Compile (if not cached) and load the kernel. Returns (lib, path, None) or (None, None, reason).

    The cache folder is used only when :func:`_folder_problem` passes, a cached file only when
    :func:`_file_problem` passes; otherwise a warning says why (once per process) and the kernel
    is built again: in the cache folder when only the file was refused, else in a private
    temporary folder (:func:`_private_folder`). There is no shared fallback folder.
    """
    cc = cc or os.environ.get("HF_SNR_CC") or "gcc"
    exe = shutil.which(cc)
    if exe is None:
        return None, None, f"C compiler {cc!r} not found (set HF_SNR_CC to a C compiler)"
    try:
        with open(_SOURCE, "rb") as f:
            source = f.read()
    except OSError as e:
        return None, None, f"kernel source {_SOURCE} unreadable: {e}"
    try:
        ver = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        version = ver.stdout.strip()
        if ver.returncode != 0 or not version:
            return None, None, f"{exe} --version failed: {ver.stderr.strip()[:200]}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, None, f"cannot run {exe}: {e}"
    cache_dir = os.path.abspath(cache_dir or _cache_dir())
    folder: str | None = cache_dir  # None: the cache is not used, build in a private folder
    problem = _folder_problem(cache_dir)
    if problem is not None:
        _warn_once(f"hf_snr: not using the kernel cache folder {cache_dir}: it {problem}; building the fused "
                   "CPU kernel in a private temporary folder instead")
        folder = None
    private = None
    errors: list = []
    for extra in _FLAG_SETS:
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(b"\0".join([
            source, version.encode(), " ".join(flags).encode(), _cpu_id().encode(), str(_ABI).encode(),
        ])).hexdigest()[:24]
        if folder is not None:
            lib, path = _cached(folder, key, errors)
            if lib is not None:
                return lib, path, None
        while True:
            try:
                if folder is None and private is None:
                    private = _private_folder()
                path = _compile(exe, flags, key, folder or private, errors)
            except OSError as e:
                if folder is None:
                    return None, None, f"building the fused CPU kernel failed: private folder: {e}"
                _warn_once(f"hf_snr: cannot write the kernel cache folder {folder} ({e}); building the fused "
                           "CPU kernel in a private temporary folder instead")
                folder = None
                continue
            break
        if path is None:
            continue  # these flags fail in any folder: try the next set
        digest = os.path.basename(path)[:-3].rpartition("-")[2]  # the sha256 _compile put in the name
        lib, problem = _load_vetted(path, digest, errors)
        if problem is not None:
            errors.append(f"{path} {problem}")
        if lib is not None:
            return lib, path, None
    return None, None, "building the fused CPU kernel failed: " + " | ".join(errors)


def _open(path, errors):
    # Only called on a file _load_vetted vouched for: dlopen runs the library's constructors, so the
    # ABI check below is a sanity check of our own build, not a defence.
    try:
        lib = ctypes.CDLL(path)
        if lib.snr_abi() != _ABI:
            raise OSError(f"ABI {lib.snr_abi()} != {_ABI}")
    except (OSError, AttributeError) as e:
        errors.append(f"loading {path}: {e}")
        return None
    lib.snr_run.argtypes = [ctypes.POINTER(_Args)]
    lib.snr_run.restype = ctypes.c_int
    lib.snr_nonfinite.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.snr_nonfinite.restype = ctypes.c_int
    lib.snr_openmp.restype = ctypes.c_int
    return lib


def _load():
    if "reason" not in _state:
        with _lock:
            if "reason" not in _state:
                lib, path, reason = _build()
                _state.update(lib=lib, path=path, reason=reason)
    return _state["lib"]


def _reset() -> None:
    """Forget the loaded library and the warnings given (tests: a new process, re-reading HF_SNR_CC /
    HF_SNR_CACHE on the next call)."""
    with _lock:
        _state.clear()
        _plans.clear()
        _warned.clear()


def is_loaded() -> bool:
    """Whether the kernel is loaded already (never builds it: only ``fused=True`` asks for a build)."""
    return _state.get("lib") is not None


def available() -> bool:
    """Whether the fused kernel could be built and loaded (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _state["reason"]


def library_path() -> str | None:
    """The loaded shared library (None when unavailable)."""
    _load()
    return _state["path"]


# -- argument checking (cached per set of state tensors) -------------------------------------------
_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_contig = torch.Tensor.is_contiguous
_dtype = torch.Tensor.dtype.__get__
_is_cpu = torch.Tensor.is_cpu.__get__
_F32, _BF16 = torch.float32, torch.bfloat16
_plans: dict = {}
_MAX_PLANS = 64
_DUMMY = (ctypes.c_double * 2)()  # a valid address for zero rows
try:
    _increment_version = torch._C._increment_version  # takes a list (torch >= 2.4); ~7 us for 192 tensors
    _increment_version([])
except (AttributeError, TypeError):  # pragma: no cover - older torch: one tensor at a time
    def _increment_version(ts):
        for t in ts:
            torch.autograd.graph.increment_version(t)


class _Sub:
    """The tensors of one dtype signature (p/g, s, p0): one kernel call."""
    __slots__ = ("idx", "numel_arr", "row_len_arr", "row_off_arr", "nrows_arr", "p_bf16", "s_bf16", "p0_bf16")


class _Plan:
    __slots__ = ("numels", "pdtype", "pdtypes", "has_rows", "rows", "subs")


def _not_cpu(t) -> str | None:
    return None if t.device.type == "cpu" else "expected a CPU tensor"


def _check_list(name, ts, n, dtypes, numels):
    """Check a list of tensors; returns their dtypes."""
    return _common.check_list("fused_cpu", name, ts, n, dtypes, numels, _not_cpu)


def _plan(params, exp_avgs, exp_avg_sqs, exp_vars, anchors, sq_sums, row_lens, ptrs, with_numels):
    """Validate the per-group tensors once per distinct (pointers, rows); cheap afterwards.

    The gradients change every step and are checked on every call (:func:`_grads_ok`), their
    numels against the plan's: a parameter resized in place re-validates the group. A call without
    gradients (``with_numels``) keys on the parameters' numels instead. Tensors are grouped by
    dtype signature (p and g, s, p0): one kernel call each, in order of first appearance.
    """
    key = (ptrs, row_lens if row_lens is None or isinstance(row_lens, str) else tuple(row_lens),
           array("q", map(_numel, params)).tobytes() if with_numels else None)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    numels = list(map(_numel, params))
    n = len(params)
    pd = _check_list("params", params, n, (_F32, _BF16), None)
    _check_list("exp_avgs", exp_avgs, n, (_F32,), numels)
    _check_list("exp_avg_sqs", exp_avg_sqs, n, (_F32,), numels)
    sd = _check_list("exp_vars", exp_vars, n, (_F32, _BF16), numels)
    p0d = _check_list("anchors", anchors, n, (_F32, _BF16), numels) if anchors is not None else [None] * n
    if sq_sums is not None:
        _check_list("sq_sums", sq_sums, n, (_F32,), numels)
    plan = _Plan()
    (rl, nrows, off), sigs = _common.plan_layout("fused_cpu", plan, params, numels, pd, sd, p0d, row_lens)
    plan.subs = []
    for (pb, sb, p0b), idx in sigs.items():
        sub = _Sub()
        sub.idx = None if len(idx) == n else idx
        sub.numel_arr = array("q", [numels[i] for i in idx])
        if rl is not None:
            sub.row_len_arr = array("q", [rl[i] for i in idx])
            sub.row_off_arr = array("q", [off[i] for i in idx])
            sub.nrows_arr = array("q", [nrows[i] for i in idx])
        else:
            sub.row_len_arr = sub.row_off_arr = sub.nrows_arr = None
        sub.p_bf16, sub.s_bf16, sub.p0_bf16 = int(pb), int(sb), int(p0b)
        plan.subs.append(sub)
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


def _on_cpu(grads, plan) -> bool:
    return all(map(_is_cpu, grads))


def _grads_ok(grads, plan, n):
    return _common.grads_match("fused_cpu", grads, plan, n, _on_cpu)


def _name_bad_grad(grads, plan):
    _check_list("grads", grads, len(grads), [(d,) for d in plan.pdtypes], plan.numels)


def _tensor_scalars(bc1, bc2, bcr, noise_scale, gate_open, n):
    """The kernel's per-tensor scalars (bc1, bc2, bcr, noise_scale, open) as fp32: one shared set when all
    are plain numbers, else one set per tensor (each argument a number or a sequence of n)."""
    vals = (bc1, bc2, bcr, noise_scale, gate_open)
    if not any(isinstance(x, (Sequence, torch.Tensor)) for x in vals):
        return array("f", (bc1, bc2, bcr, noise_scale, 1.0 if gate_open else 0.0)), 0
    cols = []
    for name, x in zip(("bc1", "bc2", "bcr", "noise_scale", "gate_open"), vals):
        if isinstance(x, (Sequence, torch.Tensor)):
            x = [float(bool(e)) for e in x] if name == "gate_open" else [float(e) for e in x]
            if len(x) != n:
                raise ValueError(f"fused_cpu: {name} has {len(x)} values for {n} tensors")
        else:
            x = [float(bool(x)) if name == "gate_open" else float(x)] * n
        cols.append(array("f", x))
    out = array("f", bytes(20 * n))
    for j, col in enumerate(cols):
        out[j::5] = col
    return out, 5




def _run(pass_, params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, anchors=None, sq_sums=None, row_lens=None,
         q_rows=None, lr=0.0, beta1=0.9, beta2=0.999, rho=0.999, eps=1e-8, weight_decay=0.0, bc1=1.0, bc2=1.0,
         bcr=1.0, alpha=1.0, softness=1.0, c=None, mask="snr", signal="ema", noise_scale=1.0, variance="ema",
         sq_scale=1.0, g2_scale=0.0, gate_open=False, want_stats=False, num_threads=None, check_finite=None):
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fused_cpu is unavailable: {_state['reason']}")
    call = _common.prepare("fused_cpu", "Q", pass_, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors,
                           sq_sums, row_lens, variance, signal, mask, make_plan=_plan, plans=_plans,
                           grads_ok=_grads_ok, check_list=_check_list, name_bad_grad=_name_bad_grad)
    n, use_p0, ptrs, plan, with_g = call.n, call.use_p0, call.ptrs, call.plan, call.with_g
    variance_k, signal_k, mask_k = call.variance, call.signal, call.mask
    if with_g:  # the gradients' pointers come last (p, m, v, s, p0, sq, g)
        ptrs.extend(map(_ptr, grads))
    else:
        ptrs.frombytes(bytes(8 * n))
    tsc, tsc_stride = _tensor_scalars(bc1, bc2, bcr, noise_scale, gate_open, n)

    if plan.has_rows and pass_ == _PASS_UPDATE:
        if (not isinstance(q_rows, torch.Tensor) or q_rows.dtype != _F32 or q_rows.device.type != "cpu"
                or not q_rows.is_contiguous() or q_rows.numel() != plan.rows):
            raise ValueError(f"fused_cpu: q_rows must be a contiguous CPU float32 tensor of {plan.rows} "
                             f"gates (one per row), got {_describe(q_rows)}")
    a = _Args()
    a.beta1, a.beta2, a.rho = beta1, beta2, rho
    a.omb1, a.omb2, a.omr = 1.0 - beta1, 1.0 - beta2, 1.0 - rho
    lr = float(lr)
    a.lr, a.eps, a.decay_mul, a.lrwd = lr, eps, 1.0 - lr * weight_decay, lr * weight_decay
    alpha, softness = min(float(alpha), _FP32_MAX), min(float(softness), _FP32_MAX)
    a.alpha, a.softness = alpha, softness
    a.c = min(softness * alpha, _FP32_MAX) if c is None else min(float(c), _FP32_MAX)
    a.mb_a, a.mb_b = sq_scale, g2_scale
    a.pass_, a.mask, a.signal, a.variance = pass_, mask_k, signal_k, variance_k
    a.decay = int(use_p0)
    a.want_stats = int(bool(want_stats))
    a.nthreads = torch.get_num_threads() if num_threads is None else int(num_threads)
    a.tsc_stride = tsc_stride
    out = None
    if plan.has_rows:
        a.rows = 1
        if pass_ == _PASS_MOMENTS:
            out = torch.empty((plan.rows, 2), dtype=torch.float64)
            a.row_sums = out.data_ptr() if plan.rows else ctypes.addressof(_DUMMY)
        else:
            a.q_rows = q_rows.data_ptr() if plan.rows else ctypes.addressof(_DUMMY)
    stats = (ctypes.c_double * 5)() if want_stats else None
    if stats is not None:
        a.stats = ctypes.addressof(stats)
    found = ctypes.c_int32(0)
    if check_finite is not None:
        chk = _check_arrays(check_finite, "check_finite")
        if chk is not None:  # checked by the first kernel call, before it writes anything
            a.ncheck = len(chk[0])
            a.check_ptrs, a.check_numel, a.check_bf16 = (x.buffer_info()[0] for x in chk)
            a.found = ctypes.addressof(found)
    total = [0.0] * 5
    for sub in plan.subs:
        if sub.idx is None:
            sptrs, stsc, a.ntensors = ptrs, tsc, n
        else:  # a mixed-dtype group: this signature's tensors
            idx = sub.idx
            sptrs = array("Q", [ptrs[j * n + i] for j in range(7) for i in idx])
            stsc = array("f", [tsc[5 * i + c] for i in idx for c in range(5)]) if tsc_stride else tsc
            a.ntensors = len(idx)
        a.ptrs = sptrs.buffer_info()[0]
        a.numel = sub.numel_arr.buffer_info()[0]
        a.tsc = stsc.buffer_info()[0]
        if a.rows:
            a.row_len = sub.row_len_arr.buffer_info()[0]
            a.row_off = sub.row_off_arr.buffer_info()[0]
            a.nrows = sub.nrows_arr.buffer_info()[0]
        a.p_bf16, a.s_bf16, a.p0_bf16 = sub.p_bf16, sub.s_bf16, sub.p0_bf16
        rc = lib.snr_run(ctypes.byref(a))
        if rc != 0:
            raise RuntimeError(f"fused_cpu: the kernel rejected its arguments (code {rc})")
        if found.value:
            raise NonFiniteGradient("fused_cpu: a tensor of check_finite holds inf or nan (nothing was written)")
        a.ncheck = 0  # the later calls of a mixed-dtype group: checked already
        if stats is not None:
            total = [x + y for x, y in zip(total, stats)]
    if pass_ == _PASS_MOMENTS:
        return out
    # p changed behind autograd's back: bump its version counter as an in-place op would, so that
    # a graph that saved p refuses to backpropagate (the state tensors are in no graph)
    _increment_version(params)
    return tuple(total) if stats is not None else None




# -- public API ----------------------------------------------------------------------------------
def step(params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, lr: float, beta1: float, beta2: float, rho: float,
         eps: float, weight_decay: float, bc1, bc2, bcr, alpha: float = 1.0, softness: float = 1.0,
         c: float | None = None, mask: str = "snr", signal: str = "ema", noise_scale=1.0,
         variance: str = "ema", sq_sums=None, sq_scale: float = 1.0, g2_scale: float = 0.0, anchors=None,
         gate_open=False, want_stats: bool = False, num_threads: int | None = None,
         check_finite=None):
    """One fused SNRAdamW step (moments, element gate or open gate, update) over a list of tensors.

    params: fp32 or bf16 tensors, updated in place; grads: each its parameter's dtype;
    exp_avgs, exp_avg_sqs: fp32 m and v; exp_vars: fp32 or bf16 variance s. Each tensor may have
    its own dtypes: the group is split into one kernel call per signature (p/g, s, anchor).
    bc1, bc2, bcr (1 - beta1^t, 1 - beta2^t, 1 - rho^t), noise_scale (a factor on sig2) and
    gate_open (q = 1: warm-up, plain AdamW): each a number shared by all tensors, or a sequence
    with one value per tensor (tensors at different steps).
    c: softness * alpha (default: computed; clamped to fp32's largest value like alpha, softness).
    mask: "snr" | "soft" | "hard"; signal: "ema" (mu2 = m_hat^2) | "step" (mu2 = g^2).
    variance: "ema" | "microbatch" (needs sq_sums, fp32, zeroed by the kernel;
    est = max(sq_scale * sq - g2_scale * g^2, 0)). anchors: decay towards these (fp32 or bf16)
    instead of towards zero. num_threads: default torch.get_num_threads() (fewer for small groups:
    one per 32768 elements). Returns the 5 statistics (see the module doc) when want_stats, else None.
    check_finite: tensors (fp32 / bf16, contiguous; any list, e.g. the gradients of every group of a step) read
    for inf / nan before anything is written: if one holds any, :class:`NonFiniteGradient` is raised and
    nothing was changed (nonfinite="skip" folded into the step's first call). Also for :func:`moments`
    and :func:`update`.
    """
    return _run(_PASS_FULL, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors=anchors, sq_sums=sq_sums,
                lr=lr, beta1=beta1, beta2=beta2, rho=rho, eps=eps, weight_decay=weight_decay, bc1=bc1, bc2=bc2,
                bcr=bcr, alpha=alpha, softness=softness, c=c, mask=mask, signal=signal, noise_scale=noise_scale,
                variance=variance, sq_scale=sq_scale, g2_scale=g2_scale, gate_open=gate_open,
                want_stats=want_stats, num_threads=num_threads, check_finite=check_finite)


def moments(params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, beta1: float, beta2: float, rho: float, bc1, bcr,
            row_lens="tensor", signal: str = "ema", noise_scale=1.0, variance: str = "ema",
            sq_sums=None, sq_scale: float = 1.0, g2_scale: float = 0.0, num_threads: int | None = None,
            check_finite=None):
    """Pass 1 of a row / whole-tensor gate: update s, m, v (zero sq) and sum mu2, sig2 per row.

    row_lens: "tensor" (one row per tensor), "row" (rows of numel / shape[0] elements for tensors of
    2 or more dims, the whole tensor otherwise), a list of one row length per tensor, or None (no
    sums: just the moments, for an element gate applied by :func:`update`). Returns a float64
    tensor of shape (total rows, 2) holding (sum mu2, sum sig2) per row, rows of consecutive
    tensors back to back (None when row_lens is None). params is only read (its dtype and numel).
    bc1, bcr and noise_scale: numbers or one per tensor, as for :func:`step`.
    """
    return _run(_PASS_MOMENTS, params, grads, exp_avgs, exp_avg_sqs, exp_vars, sq_sums=sq_sums, row_lens=row_lens,
                beta1=beta1, beta2=beta2, rho=rho, bc1=bc1, bc2=1.0, bcr=bcr, signal=signal,
                noise_scale=noise_scale, variance=variance, sq_scale=sq_scale, g2_scale=g2_scale,
                num_threads=num_threads, check_finite=check_finite)


def update(params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, lr: float, eps: float, weight_decay: float,
           bc1, bc2, bcr, q_rows: torch.Tensor | None = None, row_lens="tensor", alpha: float = 1.0,
           softness: float = 1.0, c: float | None = None, mask: str = "snr", signal: str = "ema",
           noise_scale=1.0, anchors=None, gate_open=False, want_stats: bool = False,
           num_threads: int | None = None, check_finite=None):
    """Pass 2: the gated update from the moments :func:`moments` left (m, v, s are only read).

    q_rows: fp32 tensor with one gate per row of row_lens (as :func:`moments` laid them out);
    with q_rows=None the gate is the element mask; q = 1 where gate_open (a bool, or one per tensor:
    those tensors' q_rows entries are then ignored). Scalars as for :func:`step`.
    grads is read only for signal="step" (may be None otherwise). Returns the statistics when
    want_stats (their mu2/sig2 terms are per element), else None.
    """
    if q_rows is None or gate_open is True:  # no row gates (element mask, or all open)
        row_lens = None
    return _run(_PASS_UPDATE, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors=anchors,
                row_lens=row_lens, q_rows=q_rows, lr=lr, eps=eps,
                weight_decay=weight_decay, bc1=bc1, bc2=bc2, bcr=bcr, alpha=alpha, softness=softness, c=c,
                mask=mask, signal=signal, noise_scale=noise_scale, gate_open=gate_open, want_stats=want_stats,
                num_threads=num_threads, check_finite=check_finite)


def _check_arrays(tensors, name):
    """The kernel's arrays (pointers, numels, bf16 flags) for the non-finite check; None: nothing to check."""
    given = ts = list(tensors)
    try:  # C-level maps over the list (a Python loop per tensor costs ~0.5 us each); the loop names a culprit
        numels = list(map(_numel, ts))
        if 0 in numels:
            ts = [t for t, k in zip(ts, numels) if k]
            numels = [k for k in numels if k]
        dtypes = list(map(_dtype, ts))
        ok = all(map(_is_cpu, ts)) and all(map(_contig, ts)) and set(dtypes) <= {_F32, _BF16}
    except TypeError:  # not a tensor
        ok = False
    if not ok:
        for i, t in enumerate(given):
            if isinstance(t, torch.Tensor) and not _numel(t):
                continue  # empty: never read
            if not (isinstance(t, torch.Tensor) and _is_cpu(t) and _contig(t) and _dtype(t) in (_F32, _BF16)):
                raise ValueError(f"fused_cpu: {name}: tensor {i} is {_describe(t)} (accepted: contiguous CPU "
                                 "float32 or bfloat16)")
    if not ts:
        return None
    return array("Q", map(_ptr, ts)), array("q", numels), array("i", [d is _BF16 for d in dtypes])


def any_nonfinite(tensors, num_threads: int | None = None) -> bool:
    """Whether any element of these contiguous fp32 / bf16 CPU tensors is inf or nan (one read, at memory speed).

    The same check :func:`step`, :func:`moments` and :func:`update` make before writing anything when
    given ``check_finite``.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fused_cpu is unavailable: {_state['reason']}")
    chk = _check_arrays(tensors, "any_nonfinite")
    if chk is None:
        return False
    n = num_threads or torch.get_num_threads()
    bad = lib.snr_nonfinite(len(chk[0]), *(x.buffer_info()[0] for x in chk), n)
    if bad < 0:
        raise MemoryError("fused_cpu.any_nonfinite: out of memory")
    return bool(bad)


def gate(sums: torch.Tensor, *, mask: str = "snr", alpha: float = 1.0, softness: float = 1.0,
         c: float | None = None) -> torch.Tensor:
    """One gate per row from :func:`moments`' (rows, 2) sums, as a float32 tensor.

    As the optimizer's oracle does: the sums rounded to fp32, the mask in fp32.
    """
    return _common.gate("fused_cpu", sums, mask, alpha, softness, c)
