"""Pytest setup shared by tests/ and the package's doctests.

It lives at the repository root so that the doctests in tf_layersparse/ get
the same fixed seed as the tests: a doctest whose answer depends on a random
initialiser would otherwise pass or fail by chance.
"""

import importlib.util
import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The README's test command runs the suite on TensorFlow, JAX and torch. A
# backend that is not installed is skipped with one line saying how to add
# it, so the command works as written without torch's several-GB wheels.
_INSTALL = {
    "jax": 'pip install -e ".[jax]"',
    "torch": "pip install torch --index-url https://download.pytorch.org/whl/cpu",
}
_BACKEND = os.environ.get("KERAS_BACKEND", "")
_MISSING = _BACKEND in _INSTALL and importlib.util.find_spec(_BACKEND) is None
if not _MISSING:  # Keras cannot even be imported then
    import keras

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def _tfds_home(tmp_path_factory):
    """TFDS prepares datasets in a directory of this test session (one per
    pytest-xdist worker), not in the user's ~/tensorflow_datasets; tests
    and notebooks that use TFDS's default directory share it."""
    home = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    previous = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = home  # read when TFDS is imported (lazily, by our code)
    constants = sys.modules.get("tensorflow_datasets.core.constants")
    if constants is not None:  # imported already: its default was fixed then
        constants.DATA_DIR = home
    yield
    if previous is None:
        os.environ.pop("TFDS_DATA_DIR", None)
    else:
        os.environ["TFDS_DATA_DIR"] = previous


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def pytest_configure(config):
    if _MISSING:
        pytest.exit(f"KERAS_BACKEND={_BACKEND}: {_BACKEND} is not installed, so this run is "
                    f"skipped; to run it: {_INSTALL[_BACKEND]}", returncode=0)
    config.addinivalue_line(
        "markers", "tf_only: uses TensorFlow APIs directly; skipped on other backends")
    config.addinivalue_line(
        "markers", "backend_independent: its outcome cannot depend on the backend (pure "
        "Python or numpy, argument checks, text); runs once, in the TensorFlow pass")


# Doctests whose examples call no backend op (numpy weight math, text, argument
# parsing, the target's pure decision): like `backend_independent` tests they
# run once, in the TensorFlow pass. Named per docstring; a name that no longer
# matches only makes that doctest run on every backend again.
_BACKEND_INDEPENDENT_DOCTEST_MODULES = (
    "tf_layersparse.console.",
    "tf_layersparse.folding.merge.",
)
_BACKEND_INDEPENDENT_DOCTESTS = {
    "tf_layersparse.cost.affine_cost",
    "tf_layersparse.folding.report.LayerReport",
    "tf_layersparse.simulation.simulate",
    "tf_layersparse.steering.steer",
    "tf_layersparse.targets.DepthTarget.schedule",
    "tf_layersparse.targets.TargetProgress",
}


def _backend_independent(item):
    if "backend_independent" in item.keywords:
        return True
    if isinstance(item, pytest.DoctestItem):
        return (item.name in _BACKEND_INDEPENDENT_DOCTESTS
                or item.name.startswith(_BACKEND_INDEPENDENT_DOCTEST_MODULES))
    return False


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-only test; KERAS_BACKEND is {backend}")
    once = pytest.mark.skip(reason="backend-independent test: it runs once, in the suite's "
                                   "TensorFlow pass")
    for item in items:
        # the paper's studies (BatchedMLP) are written in TensorFlow, doctests too
        if "tf_only" in item.keywords or "tf_layersparse/experiments/" in item.nodeid:
            item.add_marker(skip)
        elif _backend_independent(item):
            item.add_marker(once)
