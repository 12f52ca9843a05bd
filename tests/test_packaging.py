"""The distributions: an sdist that builds, and a wheel that runs away from the checkout.

`pip install .`, a container image or a package index takes these, not the editable install the
rest of the suite runs, so a header left out of the sdist or a data file left out of the wheel
shows only here."""

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import run_ok

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvpo", "kvpo_kernels")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _run(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """``cmd``'s stdout; the environment is this one's, less the kvpo switches and PYTHONPATH
    (which could point back into the checkout), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVPO_") and k != "PYTHONPATH"}
    return run_ok(cmd, cwd=cwd, env={**base, **(env or {})}).stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict:
    """An sdist built (PEP 517, no isolation) from a copy of the tracked files (their names under
    ``tracked``), and the wheel pip builds from that sdist alone, without the CUDA kernels (what
    they need is tested by test_cuda_build; this is about which files travel)."""
    tracked = _tracked()
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in tracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((ROOT / f).read_bytes())
    hook = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    sdist = out / _run(sys.executable, "-c", hook, cwd=src).split()[-1]
    quiet = {"KVPO_NO_CUDA": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-build-isolation",
        "--no-deps",
        "-w",
        str(out),
        str(sdist),
        cwd=out,
        env=quiet,
    )
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "tracked": tracked}


def test_the_sdist_carries_every_source_the_build_and_the_cmake_build_read(dists):
    """Every tracked file under csrc/, the packages, the recipes and the examples, and the
    CMake, requirements and README files beside them."""
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [
        f
        for f in dists["tracked"]
        if f.split("/")[0] in ("csrc", "configs", "examples", *PACKAGES)
        or f in ("CMakeLists.txt", "README.md", "requirements.txt", "pyproject.toml", "setup.py")
    ]
    assert any(f.endswith(".cu") for f in wanted) and any(f.endswith(".h") for f in wanted)
    assert sorted(set(wanted) - names) == []


def test_the_wheel_holds_the_packages_their_data_and_the_compiled_kernels(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = {n for n in whl.namelist() if ".dist-info/" not in n}
    package_files = {f for f in dists["tracked"] if f.split("/")[0] in PACKAGES}
    assert {"kvpo/py.typed", "kvpo_kernels/py.typed", "kvpo/assets/base.safetensors"} <= (
        package_files
    )
    extension = "kvpo_kernels/_C" + sysconfig.get_config_var("EXT_SUFFIX")
    assert names == package_files | {extension}


def _core_site(dest: Path) -> Path:
    """A folder of links to this environment's installs of the package's core dependencies
    (pyproject's ``dependencies``, and theirs, transitively) and of nothing else."""
    from importlib import metadata

    import tomllib

    def name(req: str) -> str:
        return re.split(r"[<>=!~;\[ (]", req.strip(), maxsplit=1)[0]

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo, seen = [name(d) for d in project["dependencies"]], set()
    dest.mkdir()
    while todo:
        dep = todo.pop()
        if dep.lower().replace("_", "-") in seen:
            continue
        seen.add(dep.lower().replace("_", "-"))
        try:
            dist = metadata.distribution(dep)
        except metadata.PackageNotFoundError:
            continue
        todo += [name(r) for r in dist.requires or [] if "extra ==" not in r]
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)
    return dest


def test_the_installed_wheel_trains_from_anywhere(dists, tmp_path):
    """Installed into a fresh environment with its core dependencies alone (from this one) and
    run from an empty folder: the compiled kernels load, and the default ``python -m kvpo.train``
    finds its shipped base checkpoint and runs through a save, its samples and plot written."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    py = str(venv / "bin" / "python")
    # the package's core dependencies alone, from this environment (--system-site-packages would
    # reach the base interpreter's site, not a venv's), after the new venv's own site-packages
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    core = _core_site(tmp_path / "core")
    (Path(site.strip()) / "core_dependencies.pth").write_text(f"{core}\n")
    wheel = str(dists["wheel"])
    _run(
        py,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        wheel,
        cwd=tmp_path,
        env={"PIP_NO_INDEX": "1"},
    )
    work = tmp_path / "work"
    work.mkdir()
    where = _run(
        py, "-c", "import kvpo, kvpo_kernels as k; print(kvpo.__file__, k.__file__)", cwd=work
    )
    assert all(Path(p).is_relative_to(venv) for p in where.split()), where
    info = json.loads(_run(py, "-m", "kvpo_kernels.info", "--json", cwd=work))
    assert info["native_extension"] and info["backends"]["velocity_energy"]["cpu"] == "cpu"
    _run(
        py,
        "-m",
        "kvpo.train",
        "--iterations",
        "2",
        "--save_every",
        "2",
        "--prompts_per_iter",
        "1",
        "--group_size",
        "2",
        "--eval_prompts",
        "1",
        "--eval_seeds",
        "1",
        "--progress",
        "false",
        "--out_dir",
        str(work / "run"),
        cwd=work,
    )
    for name in ("checkpoint.safetensors", "samples_before.gif", "samples_after.mp4"):
        assert (work / "run" / name).stat().st_size > 0, name
    row = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["iter"] == 1 and "eval_reward" in row
