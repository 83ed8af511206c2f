"""The C kernel cache loads only a library it can vouch for (hf_snr/fused_cpu.py, building and loading).

A planted library (one whose constructor writes a marker file) must never be dlopen'ed: not in
place of our own build in our cache folder, not from a world-writable folder, not from a folder
owned by someone else. Each refusal is warned once, and fused=True still works from a fresh build.
"""

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from hf_snr import fused_cpu
from hf_snr.optimizer import SNRAdamW

CC = os.environ.get("HF_SNR_CC") or "gcc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason=f"no C compiler {CC!r}")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%(marker)s", "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
int snr_abi(void) { return %(abi)d; }
int snr_run(void *args) { (void)args; return 0; }
int snr_nonfinite(long long n, void *a, void *b, void *c, int t) { (void)n; (void)a; (void)b; (void)c; (void)t; return 0; }
int snr_openmp(void) { return 0; }
"""  # noqa: E501 (a line of the C source: rewrapping it would change the string)


@pytest.fixture
def fresh(monkeypatch):
    fused_cpu._reset()
    yield monkeypatch
    monkeypatch.undo()
    fused_cpu._reset()


def _build_in_other_process(cache):
    """Fill ``cache`` as another process would (this one never dlopens that file, so the loader
    cannot be saved by glibc handing back an already-loaded library); returns the built file."""
    env = dict(os.environ, HF_SNR_CACHE=str(cache))
    code = "from hf_snr import fused_cpu; assert fused_cpu.available(), fused_cpu.unavailable_reason()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    built = [n for n in os.listdir(cache) if n.startswith("_snr_cpu-") and n.endswith(".so")]
    assert len(built) == 1, built
    return cache / built[0]


def _plant(tmp_path, target, self_named=False):
    """Compile the planted library and put it in place of ``target`` (same name); returns the marker path.
    ``self_named``: when ``target``'s name records a sha256, add a copy named with the planted file's own
    sha256 (one that only the folder check can stop)."""
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED % {"marker": marker, "abi": fused_cpu._ABI})
    lib = tmp_path / "planted.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=120)
    shutil.copyfile(lib, target)
    stem, _, digest = target.name[:-3].rpartition("-")
    if self_named and len(digest) == 64:
        own = hashlib.sha256(lib.read_bytes()).hexdigest()
        shutil.copyfile(lib, target.parent / f"{stem}-{own}.so")
    return marker


def _steps(fused):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    start = p.detach().clone()
    opt = SNRAdamW([p], lr=1e-2, weight_decay=0.1, fused=fused)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        p.grad = torch.randn(6, 5, generator=gen)
        opt.step()
    return start, p.detach().clone()


def _refusals(records, *words):
    return [str(w.message) for w in records
            if issubclass(w.category, RuntimeWarning) and all(x in str(w.message) for x in words)]


def test_planted_library_in_own_cache_is_refused_and_rebuilt(fresh, tmp_path):
    cache = tmp_path / "cache"
    fresh.setenv("HF_SNR_CACHE", str(cache))
    target = _build_in_other_process(cache)
    marker = _plant(tmp_path, target)
    fused_cpu._reset()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        start, fused = _steps(fused=True)
    assert not marker.exists(), "the planted library's constructor ran"
    assert fused_cpu.available(), fused_cpu.unavailable_reason()
    _, foreach = _steps(fused=False)
    assert not torch.equal(fused, start)
    torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)
    refused = _refusals(rec, str(target), "does not match its manifest")
    assert len(refused) == 1, [str(w.message) for w in rec]
    assert not _refusals(rec, "fused=True")  # no fallback to the foreach path
    # the refused file was replaced by our own build, which the next process loads without a word
    fused_cpu._reset()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert fused_cpu.available()
    assert not _refusals(rec, "hf_snr") and os.path.dirname(fused_cpu.library_path()) == str(cache)


def test_world_writable_cache_folder_is_not_used(fresh, tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    fresh.setenv("HF_SNR_CACHE", str(cache))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert fused_cpu.available(), fused_cpu.unavailable_reason()
        path = fused_cpu.library_path()
        assert fused_cpu.available() and fused_cpu.library_path() == path
    assert not os.path.realpath(path).startswith(os.path.realpath(cache) + os.sep)
    assert not os.listdir(cache)
    assert len(_refusals(rec, str(cache), "world-writable")) == 1, [str(w.message) for w in rec]
    folder = os.stat(os.path.dirname(path))
    assert folder.st_uid == os.geteuid() and stat.S_IMODE(folder.st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a folder to another user")
def test_folder_of_another_user_is_not_loaded(fresh, tmp_path):
    cache = tmp_path / "theirs"
    target = _build_in_other_process(cache)
    marker = _plant(tmp_path, target, self_named=True)
    os.chmod(cache, 0o755)
    for f in [cache, *cache.iterdir()]:
        os.chown(f, 65534, 65534)
    fresh.setenv("HF_SNR_CACHE", str(cache))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        start, fused = _steps(fused=True)
    assert not marker.exists(), "the planted library's constructor ran"
    assert fused_cpu.available(), fused_cpu.unavailable_reason()
    assert not fused_cpu.library_path().startswith(str(cache) + os.sep)
    assert not torch.equal(fused, start)
    assert len(_refusals(rec, str(cache), "owned by uid 65534")) == 1, [str(w.message) for w in rec]


def test_new_cache_folder_is_private_whatever_the_umask(fresh, tmp_path):
    cache = tmp_path / "new" / "cache"
    fresh.setenv("HF_SNR_CACHE", str(cache))
    old = os.umask(0)
    try:
        assert fused_cpu.available(), fused_cpu.unavailable_reason()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    path = fused_cpu.library_path()
    assert os.path.dirname(path) == str(cache)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o022 == 0


def test_good_cache_is_reused_without_rebuilding(fresh, tmp_path):
    cache = tmp_path / "cache"
    fresh.setenv("HF_SNR_CACHE", str(cache))
    assert fused_cpu.available(), fused_cpu.unavailable_reason()
    path = fused_cpu.library_path()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() in os.path.basename(path)  # the manifest is the name
    before = os.stat(path)
    compiles = []
    real_run = subprocess.run

    def counting_run(cmd, *a, **k):
        if "-o" in cmd:
            compiles.append(cmd)
        return real_run(cmd, *a, **k)

    fresh.setattr(fused_cpu.subprocess, "run", counting_run)
    fused_cpu._reset()  # a second process
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert fused_cpu.available() and fused_cpu.library_path() == path
    after = os.stat(path)
    assert compiles == []
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not _refusals(rec, "hf_snr")
    assert os.listdir(cache) == [os.path.basename(path)]
