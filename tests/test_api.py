"""The public API: ``kvpo``'s names, imported on first use."""

import importlib
import subprocess
import sys

import kvpo


def test_every_public_name_is_its_modules_object():
    """Each name is its module's object, whatever was imported before (no submodule of the
    package shadows a name of its API)."""
    assert kvpo.__all__ == ["__version__", *kvpo._API] and sorted(dir(kvpo)) == sorted(kvpo.__all__)
    for name, module in kvpo._API.items():
        assert getattr(kvpo, name) is getattr(importlib.import_module(module), name), name
    # every module of the package loaded (the command-line module kvpo.train aside, which only
    # python -m runs): none of them shadows the API's train with the module of that name
    code = (
        "import importlib, pkgutil, kvpo\n"
        "for m in pkgutil.walk_packages(kvpo.__path__, 'kvpo.'):\n"
        "    if m.name != 'kvpo.train' and not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "from kvpo import train\n"
        "print(train.__module__, callable(train))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "kvpo.trainer True", out.stderr[-2000:]


def test_importing_the_package_loads_no_entry_point_and_no_optional_dependency():
    code = (
        "import sys, kvpo; print(sorted(m for m in sys.modules if m.startswith(('kvpo.', "
        "'diffusers', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_entry_points_run_without_the_package_importing_them_first():
    """``python -m kvpo.train`` runs the module once (no runpy warning that the package had
    imported it already)."""
    out = subprocess.run(
        [sys.executable, "-W", "error", "-m", "kvpo.train", "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "RuntimeWarning" not in out.stderr, out.stderr[-2000:]
    assert "--sampler" in out.stdout and "--lora_init" in out.stdout


def test_the_trainer_runs_through_the_public_api(tmp_path):
    from kvpo import build_config, train

    result = train(
        build_config(
            dict(
                iterations=1,
                prompts_per_iter=1,
                group_size=2,
                eval_prompts=1,
                eval_seeds=1,
                samples=False,
                progress=False,
                out_dir=str(tmp_path / "run"),
            )
        )
    )
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file() and result is not None
