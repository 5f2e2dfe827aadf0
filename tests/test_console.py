"""The package's commands print no TensorFlow log lines, and speak to users."""

import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest

from tf_layersparse import console
from tf_layersparse.experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.tf_only  # TensorFlow's log lines; one TensorFlow import per command
@pytest.mark.parametrize("module", ["tf_layersparse.demo", "tf_layersparse.experiments"])
def test_help_prints_no_tensorflow_log_lines(module):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if module == "tf_layersparse.experiments":  # the module entry point lists its studies
        assert "simulation" in result.stdout and "real-data" in result.stdout
    # not a line of "I0000 00:00:... cudart_stub.cc:31] ...", "E0000 ... cuInit" and the like
    assert result.stderr == ""


@pytest.mark.tf_only
@pytest.mark.parametrize("script, args", [
    ("tf-layersparse-demo", ["--help"]),
    ("tf-layersparse-experiments", ["--help"]),
    ("tf-layersparse-demo", ["--quick"]),
])
def test_installed_scripts_print_no_tensorflow_log_lines(script, args):
    # the interpreter runs a console script as `python /path/to/script`, so the
    # command is not in argv[0] and has to be found after the interpreter's options
    path = shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not on PATH (pip install -e . installs it)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # the script imports whichever package is installed (perhaps another checkout);
    # PYTHONPATH makes it import this one
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([path, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr == ""


@pytest.mark.backend_independent
def test_help_texts_speak_to_users():
    parser = cli._parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    for text in texts:
        assert not re.search(r"\bissue\s+\d+", text, re.I), text


@pytest.mark.backend_independent
def test_entry_points_are_recognised_and_nothing_else():
    assert console.entry_point(["python", "-m", "tf_layersparse.demo"]) == "tf_layersparse.demo"
    assert console.entry_point(["python", "-X", "importtime", "-mtf_layersparse.experiments",
                                "simulation"]) == "tf_layersparse.experiments"
    assert console.entry_point(["/venv/bin/tf-layersparse-demo"]) == "tf-layersparse-demo"
    assert console.entry_point(["/venv/bin/python", "-X", "utf8", "/venv/bin/tf-layersparse-demo",
                                "--quick"]) == "tf-layersparse-demo"
    assert console.entry_point(["python", "-c", "pass", "tf-layersparse-demo"]) is None
    assert console.entry_point(["python", "-m", "pytest", "-m", "tf_layersparse.demo"]) is None
    assert console.entry_point(["python", "script.py"]) is None


@pytest.mark.backend_independent
def test_a_level_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    assert console.quiet_tensorflow() is False
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
