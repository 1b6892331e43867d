"""nvcc / DeepGEMM header lookup (jax_megamoe._src.kernels._toolchain), with fake toolkits and fake wheels."""

from __future__ import annotations

import importlib.metadata as md
import os
import stat
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from jax_megamoe._src.kernels import _toolchain as tc
from jax_megamoe._src.kernels._toolchain import ToolchainError
from jax_megamoe._src.numerics.policy import Locations


def here() -> Locations:
    """The locations the (monkeypatched) environment describes now: the policy reads them once per
    process, so each lookup here gets them explicitly."""
    return Locations.from_environ()


NVCC_TEXT = textwrap.dedent(
    """\
    nvcc: NVIDIA (R) Cuda compiler driver
    Copyright (c) 2005-2025 NVIDIA Corporation
    Built on Wed_Aug_20_01:58:59_PM_PDT_2025
    Cuda compilation tools, release {v}, V{v}.88
    Build cuda_{v}.r{v}/compiler.36424714_0
    """
)


def nvcc_script(version: str) -> str:
    """/bin/sh script printing `nvcc --version` text with shell builtins only (PATH may be empty)."""
    lines = NVCC_TEXT.format(v=version).splitlines()
    return "#!/bin/sh\n" + "".join(f"printf '%s\\n' '{line}'\n" for line in lines)


def fake_nvcc(path: Path, version: str, exit_code: int = 0) -> Path:
    """A shell script that answers `--version` like nvcc {version}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nvcc_script(version) + f"exit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No CUDA env vars, an empty PATH (plus /bin for sh), no wheels, no /usr/local/cuda."""
    for var in (*tc.ENV_NVCC, "CUDA_HOME", "CUDA_PATH", tc.ENV_DEEPGEMM_INCLUDE, tc.ENV_ALLOW_DEEPGEMM_VERSION):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(tc, "_NVCC_WHEELS", ())
    monkeypatch.setattr(tc, "_DEFAULT_CUDA_ROOTS", ())
    tc.clear_cache()
    yield monkeypatch
    tc.clear_cache()


@pytest.mark.parametrize(
    "text,want",
    [
        (NVCC_TEXT.format(v="13.0"), (13, 0)),
        (NVCC_TEXT.format(v="12.9"), (12, 9)),
        ("Cuda compilation tools, release 12.10, V12.10.1", (12, 10)),
    ],
)
def test_parse_nvcc_version(text, want):
    assert tc.parse_nvcc_version(text) == want


def test_parse_nvcc_version_garbage():
    with pytest.raises(ToolchainError, match="cannot parse"):
        tc.parse_nvcc_version("gcc (Debian 12.2.0) 12.2.0")


@pytest.mark.parametrize("version,ok", [("12.8", False), ("12.9", True), ("13.0", True), ("11.8", False)])
def test_version_gate(clean_env, tmp_path, version, ok):
    nvcc = fake_nvcc(tmp_path / "cuda" / "bin" / "nvcc", version)
    clean_env.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    if ok:
        t = tc.find_nvcc(here())
        assert t.nvcc == str(nvcc)
        assert t.version == tuple(int(x) for x in version.split("."))
        assert t.source == "CUDA_HOME"
        assert t.include_dirs == ()
    else:
        with pytest.raises(ToolchainError) as e:
            tc.find_nvcc(here())
        msg = str(e.value)
        assert f"nvcc {version}" in msg and "too old" in msg and ">= 12.9" in msg
        assert "jax_megamoe[cuda13]" in msg


def test_cuda_home_beats_cuda_path_and_path(clean_env, tmp_path):
    home = fake_nvcc(tmp_path / "home" / "bin" / "nvcc", "13.0")
    fake_nvcc(tmp_path / "cpath" / "bin" / "nvcc", "12.9")
    onpath = fake_nvcc(tmp_path / "onpath" / "nvcc", "12.9")
    clean_env.setenv("PATH", f"{onpath.parent}{os.pathsep}/bin")
    clean_env.setenv("CUDA_PATH", str(tmp_path / "cpath"))
    clean_env.setenv("CUDA_HOME", str(tmp_path / "home"))
    assert tc.find_nvcc(here()).nvcc == str(home)
    clean_env.delenv("CUDA_HOME")
    t = tc.find_nvcc(here())
    assert (t.nvcc, t.source) == (str(tmp_path / "cpath" / "bin" / "nvcc"), "CUDA_PATH")
    clean_env.delenv("CUDA_PATH")
    t = tc.find_nvcc(here())
    assert (t.nvcc, t.source) == (str(onpath), "PATH")


def test_cuda_home_without_nvcc_falls_through(clean_env, tmp_path):
    (tmp_path / "empty_home").mkdir()
    onpath = fake_nvcc(tmp_path / "onpath" / "nvcc", "13.0")
    clean_env.setenv("CUDA_HOME", str(tmp_path / "empty_home"))
    clean_env.setenv("PATH", str(onpath.parent))
    assert tc.find_nvcc(here()).nvcc == str(onpath)


def test_explicit_override_wins_and_must_exist(clean_env, tmp_path):
    explicit = fake_nvcc(tmp_path / "x" / "nvcc", "13.0")
    fake_nvcc(tmp_path / "home" / "bin" / "nvcc", "12.9")
    clean_env.setenv("CUDA_HOME", str(tmp_path / "home"))
    clean_env.setenv("JAX_MEGAMOE_NVCC", str(explicit))
    t = tc.find_nvcc(here())
    assert (t.nvcc, t.source) == (str(explicit), "JAX_MEGAMOE_NVCC")
    clean_env.setenv("JAX_MEGAMOE_NVCC", str(tmp_path / "nope" / "nvcc"))
    with pytest.raises(ToolchainError, match="JAX_MEGAMOE_NVCC=.*not an executable nvcc"):
        tc.find_nvcc(here())


def test_default_root_is_last(clean_env, tmp_path):
    root = tmp_path / "usr_local_cuda"
    nvcc = fake_nvcc(root / "bin" / "nvcc", "13.0")
    clean_env.setattr(tc, "_DEFAULT_CUDA_ROOTS", (str(root),))
    assert tc.find_nvcc(here()).nvcc == str(nvcc)


def test_missing_nvcc_one_clear_message(clean_env):
    with pytest.raises(ToolchainError) as e:
        tc.find_nvcc(here())
    msg = str(e.value)
    assert msg.startswith("nvcc not found (looked in ")
    for where in ("CUDA_HOME", "CUDA_PATH", "PATH", "nvidia-cuda-nvcc"):
        assert where in msg
    assert "CUDA toolkit >= 12.9" in msg and "pip install 'jax_megamoe[cuda13]'" in msg
    assert isinstance(e.value, RuntimeError)


def test_failing_nvcc_is_reported(clean_env, tmp_path):
    fake_nvcc(tmp_path / "cuda" / "bin" / "nvcc", "13.0", exit_code=3)
    clean_env.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    with pytest.raises(ToolchainError, match="exited with status 3"):
        tc.find_nvcc(here())


# --- pip wheel layouts, as real fake distributions on sys.path -------------------------


def make_dist(site: Path, name: str, version: str, files: dict[str, str], exe: tuple[str, ...] = ()) -> None:
    """Write an installed distribution (dist-info + RECORD + files) into `site`."""
    norm = name.replace("-", "_")
    info = site / f"{norm}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = []
    for rel, content in files.items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        if rel in exe:
            p.chmod(0o755)
        record.append(f"{rel},,")
    record += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def fake_site(clean_env, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    clean_env.syspath_prepend(str(site))
    return site


def test_pip_cuda13_layout(fake_site, clean_env):
    clean_env.setattr(tc, "_NVCC_WHEELS", (("nvidia-cuda-nvcc", "nvidia/cu13/bin/nvcc", 13),))
    make_dist(
        fake_site,
        "nvidia-cuda-nvcc",
        "13.0.88",
        {"nvidia/cu13/bin/nvcc": nvcc_script("13.0")},
        exe=("nvidia/cu13/bin/nvcc",),
    )
    make_dist(
        fake_site,
        "nvidia-cuda-runtime",
        "13.0.96",
        {"nvidia/cu13/include/cuda_runtime.h": "", "nvidia/cu13/include/cuda.h": ""},
    )
    make_dist(fake_site, "nvidia-cuda-cccl", "13.0.85", {"nvidia/cu13/include/cccl/cuda/std/cstdint": ""})
    t = tc.find_nvcc(here())
    assert t.source == "pip nvidia-cuda-nvcc"
    assert t.nvcc == str((fake_site / "nvidia/cu13/bin/nvcc").resolve())
    assert t.version == (13, 0)
    assert t.include_dirs == (
        str((fake_site / "nvidia/cu13/include").resolve()),
        str((fake_site / "nvidia/cu13/include/cccl").resolve()),
    )


def test_pip_cuda12_layout(fake_site, clean_env):
    clean_env.setattr(tc, "_NVCC_WHEELS", (("nvidia-cuda-nvcc-cu12", "nvidia/cuda_nvcc/bin/nvcc", 12),))
    make_dist(
        fake_site,
        "nvidia-cuda-nvcc-cu12",
        "12.9.86",
        {"nvidia/cuda_nvcc/bin/nvcc": nvcc_script("12.9"), "nvidia/cuda_nvcc/include/crt/host_config.h": ""},
        exe=("nvidia/cuda_nvcc/bin/nvcc",),
    )
    make_dist(fake_site, "nvidia-cuda-runtime-cu12", "12.9.79", {"nvidia/cuda_runtime/include/cuda_runtime.h": ""})
    make_dist(fake_site, "nvidia-cuda-cccl-cu12", "12.9.27", {"nvidia/cuda_cccl/include/cuda/std/cstdint": ""})
    t = tc.find_nvcc(here())
    assert t.source == "pip nvidia-cuda-nvcc-cu12" and t.version == (12, 9)
    assert t.include_dirs == tuple(
        str((fake_site / d).resolve())
        for d in ("nvidia/cuda_runtime/include", "nvidia/cuda_cccl/include", "nvidia/cuda_nvcc/include")
    )


def test_path_beats_pip(fake_site, clean_env, tmp_path):
    clean_env.setattr(tc, "_NVCC_WHEELS", (("nvidia-cuda-nvcc", "nvidia/cu13/bin/nvcc", 13),))
    make_dist(
        fake_site,
        "nvidia-cuda-nvcc",
        "13.0.88",
        {"nvidia/cu13/bin/nvcc": nvcc_script("13.0")},
        exe=("nvidia/cu13/bin/nvcc",),
    )
    onpath = fake_nvcc(tmp_path / "onpath" / "nvcc", "12.9")
    clean_env.setenv("PATH", str(onpath.parent))
    assert tc.find_nvcc(here()).source == "PATH"


# --- DeepGEMM headers ------------------------------------------------------------------


PROBE = "deep_gemm/impls/sm90_mega_moe_pre_dispatch.cuh"


def test_headers_env_override(clean_env, tmp_path):
    inc = tmp_path / "inc"
    (inc / PROBE).parent.mkdir(parents=True)
    (inc / PROBE).write_text("// fake\n")
    clean_env.setenv(tc.ENV_DEEPGEMM_INCLUDE, str(inc))
    h = tc.find_deepgemm_headers(here())
    assert h.include_dir == str(inc.resolve()) and h.source == tc.ENV_DEEPGEMM_INCLUDE
    clean_env.setenv(tc.ENV_DEEPGEMM_INCLUDE, str(tmp_path / "missing"))
    with pytest.raises(ToolchainError, match="does not contain deep_gemm/impls"):
        tc.find_deepgemm_headers(here())


def test_headers_missing_one_clear_message(clean_env):
    real = md.distribution

    def fake(name):
        if name == tc.DEEPGEMM_DIST:
            raise md.PackageNotFoundError(name)
        return real(name)

    clean_env.setattr(tc.md, "distribution", fake)
    with pytest.raises(ToolchainError) as e:
        tc.find_deepgemm_headers(here())
    assert "pip install sgl-deep-gemm==0.2.5" in str(e.value)
    assert "not installed" in str(e.value)


def test_headers_version_pin(fake_site, clean_env):
    make_dist(fake_site, "sgl-deep-gemm", "0.2.4", {f"deep_gemm/include/{PROBE}": "// fake\n"})
    with pytest.raises(ToolchainError) as e:
        tc.find_deepgemm_headers(here())
    assert "0.2.4" in str(e.value) and "pip install sgl-deep-gemm==0.2.5" in str(e.value)
    clean_env.setenv(tc.ENV_ALLOW_DEEPGEMM_VERSION, "1")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = tc.find_deepgemm_headers(here())
    assert h.version == "0.2.4" and h.include_dir == str((fake_site / "deep_gemm/include").resolve())
    assert any("0.2.4" in str(x.message) for x in w)


def test_headers_dist_without_probe(fake_site):
    make_dist(fake_site, "sgl-deep-gemm", "0.2.5", {"deep_gemm/__init__.py": ""})
    with pytest.raises(ToolchainError, match="reinstall"):
        tc.find_deepgemm_headers(here())


def test_installed_headers_found_without_importing_deep_gemm(clean_env):
    try:
        md.distribution(tc.DEEPGEMM_DIST)
    except md.PackageNotFoundError:
        pytest.skip("sgl-deep-gemm is not installed")
    before = set(sys.modules)
    h = tc.find_deepgemm_headers(here())
    assert (Path(h.include_dir) / PROBE).is_file()
    assert (Path(h.include_dir) / "cute").is_dir()
    assert h.version == tc.DEEPGEMM_VERSION
    assert h.header_version == "sgl-deep-gemm 0.2.5"
    assert not any(m == "deep_gemm" or m.startswith("deep_gemm.") for m in set(sys.modules) - before)
