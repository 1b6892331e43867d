"""Find the CUDA compiler and DeepGEMM's kernel headers for the FFI JIT.

Nothing here imports CUDA packages or ``deep_gemm``: wheels are located through
``importlib.metadata`` (their file lists), and nvcc is only run as
``nvcc --version``.

nvcc lookup order (the first nvcc found is used; if it is older than 12.9 that is
an error, no silent fall-through to another one):

1. ``JAX_MEGAMOE_NVCC`` or ``DG_JIT_NVCC_COMPILER``: an explicit nvcc file.
2. ``$CUDA_HOME/bin/nvcc``, then ``$CUDA_PATH/bin/nvcc``.
3. ``nvcc`` on ``PATH``.
4. pip wheels: ``nvidia-cuda-nvcc`` (CUDA 13, ``nvidia/cu13/bin/nvcc``), then
   ``nvidia-cuda-nvcc-cu12`` (``nvidia/cuda_nvcc/bin/nvcc``).
5. ``/usr/local/cuda/bin/nvcc``.

For a wheel nvcc the CUDA headers live in sibling wheels, so their folders are
returned as extra include dirs: CUDA 13 ``nvidia/cu13/include`` and
``nvidia/cu13/include/cccl``; CUDA 12 ``nvidia/cuda_runtime/include``,
``nvidia/cuda_cccl/include`` and ``nvidia/cuda_nvcc/include``. A toolkit nvcc
needs none (its nvcc.profile knows them).

DeepGEMM headers: ``JAX_MEGAMOE_DEEPGEMM_INCLUDE`` (a folder containing
``deep_gemm/``), else the ``include/`` folder of the installed ``sgl-deep-gemm``
distribution. The project is pinned to 0.2.5: another installed version raises
``ToolchainError`` unless ``JAX_MEGAMOE_ALLOW_DEEPGEMM_VERSION=1`` (then it only
warns); headers given through the environment variable are not version-checked
(their version is reported as "unknown (from JAX_MEGAMOE_DEEPGEMM_INCLUDE)").

The variables are read once, by the policy (:class:`jax_megamoe.policy.Locations`); the
lookups here take them as ``locations`` (default: the process policy's).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics.policy import Locations

MIN_NVCC: tuple[int, int] = (12, 9)
DEEPGEMM_DIST = "sgl-deep-gemm"
DEEPGEMM_VERSION = "0.2.5"

ENV_NVCC = _policy.ENV_NVCC
ENV_DEEPGEMM_INCLUDE = _policy.ENV_DEEPGEMM_INCLUDE
ENV_ALLOW_DEEPGEMM_VERSION = _policy.ENV_ALLOW_DEEPGEMM_VERSION

# Last-resort toolkit folders (tests replace this).
_DEFAULT_CUDA_ROOTS: tuple[str, ...] = ("/usr/local/cuda",)

# A header every supported DeepGEMM ships; used to recognise an include folder.
_DEEPGEMM_PROBE = "deep_gemm/impls/sm90_mega_moe_pre_dispatch.cuh"

_INSTALL_NVCC = "install the CUDA toolkit >= 12.9 (and set CUDA_HOME) or `pip install 'jax_megamoe[cuda13]'`"
_INSTALL_DG = f"`pip install {DEEPGEMM_DIST}=={DEEPGEMM_VERSION}` (or `pip install 'jax_megamoe[kernels]'`)"


class ToolchainError(RuntimeError):
    """nvcc or the DeepGEMM headers are missing or unusable; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    nvcc: str  # absolute path
    version: tuple[int, int]  # CUDA release, e.g. (13, 0)
    version_text: str  # full `nvcc --version` output
    include_dirs: tuple[str, ...]  # extra -I folders (pip wheels only)
    source: str  # where it was found, e.g. "CUDA_HOME", "PATH", "pip nvidia-cuda-nvcc"


@dataclasses.dataclass(frozen=True)
class DeepGemmHeaders:
    include_dir: str  # folder containing deep_gemm/, cute/, cutlass/
    version: str  # distribution version, or "unknown (...)"
    source: str  # "sgl-deep-gemm distribution" or the env variable name

    @property
    def header_version(self) -> str:
        """The string the JIT folds into its cache key."""
        return f"{DEEPGEMM_DIST} {self.version}"


# --------------------------------------------------------------------------------------
# nvcc
# --------------------------------------------------------------------------------------

_RELEASE = re.compile(r"release\s+(\d+)\.(\d+)")


def parse_nvcc_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` from ``nvcc --version`` output ("... release 13.0, V13.0.88")."""
    m = _RELEASE.search(text)
    if not m:
        raise ToolchainError(f"cannot parse the CUDA release from `nvcc --version` output:\n{text.strip()}")
    return int(m.group(1)), int(m.group(2))


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


# (distribution name, path suffix of nvcc inside it, CUDA major)
_NVCC_WHEELS = (
    ("nvidia-cuda-nvcc", "nvidia/cu13/bin/nvcc", 13),
    ("nvidia-cuda-nvcc-cu13", "nvidia/cu13/bin/nvcc", 13),
    ("nvidia-cuda-nvcc-cu12", "nvidia/cuda_nvcc/bin/nvcc", 12),
)
# Header folders shipped by the other wheels of each family.
_HEADER_WHEELS = {
    13: (
        (("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13"), "nvidia/cu13/include", "cuda_runtime.h"),
        (("nvidia-cuda-cccl", "nvidia-cuda-cccl-cu13"), "nvidia/cu13/include/cccl", "cuda/std/cstdint"),
        (("nvidia-cuda-crt", "nvidia-cuda-nvcc"), "nvidia/cu13/include", "crt/host_config.h"),
    ),
    12: (
        (("nvidia-cuda-runtime-cu12",), "nvidia/cuda_runtime/include", "cuda_runtime.h"),
        (("nvidia-cuda-cccl-cu12",), "nvidia/cuda_cccl/include", "cuda/std/cstdint"),
        (("nvidia-cuda-nvcc-cu12",), "nvidia/cuda_nvcc/include", "crt/host_config.h"),
    ),
}


def _dist_file(dist_name: str, suffix: str) -> Path | None:
    """The on-disk path of file ``suffix`` inside an installed distribution, if any."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            p = Path(dist.locate_file(f))
            if p.exists():
                return p.resolve()
    # No RECORD (unusual installers): try the conventional location.
    p = Path(dist.locate_file(suffix))
    return p.resolve() if p.exists() else None


def _wheel_include_dirs(major: int) -> tuple[str, ...]:
    dirs: list[str] = []
    for dists, folder, probe in _HEADER_WHEELS.get(major, ()):
        for d in dists:
            hit = _dist_file(d, f"{folder}/{probe}")
            if hit is None:
                continue
            inc = str(hit)[: -len(probe)].rstrip("/")
            if inc not in dirs:
                dirs.append(inc)
            break
    return tuple(dirs)


def _locations(locations: Locations | None) -> Locations:
    return _policy.current().locations if locations is None else locations


def _candidates(loc: Locations) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(source, nvcc path, extra include dirs) in lookup order; paths may not exist."""
    out: list[tuple[str, Path, tuple[str, ...]]] = []
    if loc.nvcc is not None:
        out.append((loc.nvcc[0], Path(loc.nvcc[1]), ()))
    for var, root in loc.cuda_roots:
        out.append((var, Path(root) / "bin" / "nvcc", ()))
    which = shutil.which("nvcc", path=os.defpath if loc.search_path is None else loc.search_path)
    if which:
        out.append(("PATH", Path(which), ()))
    for dist, suffix, major in _NVCC_WHEELS:
        p = _dist_file(dist, suffix)
        if p is not None:
            out.append((f"pip {dist}", p, _wheel_include_dirs(major)))
    for root in _DEFAULT_CUDA_ROOTS:
        out.append((root, Path(root) / "bin" / "nvcc", ()))
    return out


def _looked_in() -> str:
    return (
        f"{', '.join(ENV_NVCC)}, CUDA_HOME, CUDA_PATH, PATH, pip packages "
        f"nvidia-cuda-nvcc / nvidia-cuda-nvcc-cu12, {', '.join(_DEFAULT_CUDA_ROOTS)}"
    )


def find_nvcc(locations: Locations | None = None) -> Toolchain:
    """The nvcc the JIT will use, its version and extra include folders (``locations``: where to
    look, default the process policy's).

    Raises ToolchainError (one class, one message saying what to install).
    """
    for source, path, includes in _candidates(_locations(locations)):
        explicit = source in ENV_NVCC
        if not _is_exe(path):
            if explicit:
                raise ToolchainError(f"{source}={path} is not an executable nvcc; unset it or {_INSTALL_NVCC}")
            continue
        try:
            proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ToolchainError(f"cannot run `{path} --version` (found via {source}): {e}") from e
        text = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise ToolchainError(
                f"`{path} --version` (found via {source}) exited with status {proc.returncode}:\n{text.strip()}"
            )
        version = parse_nvcc_version(text)
        if version < MIN_NVCC:
            raise ToolchainError(
                f"nvcc {version[0]}.{version[1]} at {path} (found via {source}) is too old: the DeepGEMM "
                f"kernels (sm_90a / sm_100f) need nvcc >= {MIN_NVCC[0]}.{MIN_NVCC[1]}; {_INSTALL_NVCC}"
            )
        return Toolchain(
            nvcc=str(path.absolute()),
            version=version,
            version_text=text,
            include_dirs=includes,
            source=source,
        )
    raise ToolchainError(f"nvcc not found (looked in {_looked_in()}): {_INSTALL_NVCC}")


# --------------------------------------------------------------------------------------
# DeepGEMM headers
# --------------------------------------------------------------------------------------


def find_deepgemm_headers(locations: Locations | None = None) -> DeepGemmHeaders:
    """The DeepGEMM include folder (holding deep_gemm/, cute/, cutlass/), found without importing it
    (``locations``: where to look, default the process policy's)."""
    loc = _locations(locations)
    env = loc.deepgemm_include
    if env:
        inc = Path(env)
        if not (inc / _DEEPGEMM_PROBE).is_file():
            raise ToolchainError(
                f"{ENV_DEEPGEMM_INCLUDE}={env} does not contain {_DEEPGEMM_PROBE}; point it at the folder "
                f"that holds deep_gemm/ (site-packages/deep_gemm/include of {DEEPGEMM_DIST}) or unset it and "
                f"{_INSTALL_DG}"
            )
        return DeepGemmHeaders(str(inc.resolve()), f"unknown (from {ENV_DEEPGEMM_INCLUDE})", ENV_DEEPGEMM_INCLUDE)
    try:
        dist = md.distribution(DEEPGEMM_DIST)
    except md.PackageNotFoundError:
        raise ToolchainError(
            f"DeepGEMM kernel headers not found: the {DEEPGEMM_DIST} distribution is not installed; "
            f"{_INSTALL_DG}, or set {ENV_DEEPGEMM_INCLUDE}"
        ) from None
    probe = _dist_file(DEEPGEMM_DIST, f"deep_gemm/include/{_DEEPGEMM_PROBE}")
    if probe is None:
        raise ToolchainError(
            f"{DEEPGEMM_DIST} {dist.version} is installed but has no {_DEEPGEMM_PROBE} under "
            f"deep_gemm/include; reinstall it: {_INSTALL_DG}"
        )
    inc = str(probe)[: -len(_DEEPGEMM_PROBE)].rstrip("/")
    if dist.version != DEEPGEMM_VERSION:
        msg = (
            f"{DEEPGEMM_DIST} {dist.version} is installed but jax_megamoe is built and tested against "
            f"{DEEPGEMM_VERSION} (kernel signatures and numerics are pinned); {_INSTALL_DG}"
        )
        if loc.allow_deepgemm_version:
            warnings.warn(msg + f" ({ENV_ALLOW_DEEPGEMM_VERSION} is set: continuing)", RuntimeWarning, stacklevel=2)
        else:
            raise ToolchainError(msg + f", or set {ENV_ALLOW_DEEPGEMM_VERSION}=1 to try it anyway")
    return DeepGemmHeaders(inc, dist.version, f"{DEEPGEMM_DIST} distribution")


@functools.lru_cache(maxsize=4)
def _cached_toolchain(locations: Locations) -> Toolchain:
    return find_nvcc(locations)


@functools.lru_cache(maxsize=4)
def _cached_headers(locations: Locations) -> DeepGemmHeaders:
    return find_deepgemm_headers(locations)


def toolchain(locations: Locations | None = None) -> Toolchain:
    """Cached ``find_nvcc(locations)`` (errors are not cached)."""
    return _cached_toolchain(_locations(locations))


def headers(locations: Locations | None = None) -> DeepGemmHeaders:
    """Cached ``find_deepgemm_headers(locations)`` (errors are not cached)."""
    return _cached_headers(_locations(locations))


def clear_cache() -> None:
    _cached_toolchain.cache_clear()
    _cached_headers.cache_clear()
