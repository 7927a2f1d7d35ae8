"""Shared test setup.

``DATALOOP_PATH`` is pointed at a temp dir before anything imports dtlpy (one per
process, so parallel workers do not share it), so the SDK's cookie file
(environments, tokens) and logs stay out of the home folder.
Fixtures:

- ``dataloop_emulator``: a started ``tests.dataloop_emulator.DataloopEmulator``
  (fresh, empty state per test) with the real dtlpy SDK pointed at it; an
  alias of ``dataloop_env``.
- ``dataloop_env``: same object; see ``tests/dataloop_emulator.py`` for the
  seeding helpers (``seed_project``, ``seed_dataset``, ``seed_item``,
  ``seed_model``) and the state to assert on.

torch runs one intra-op thread in the tests and in every process they start
(``OMP_NUM_THREADS`` is inherited): at the tests' tiny sizes a second thread buys
nothing, and two spinning OpenMP threads per process collapse on a shared or
parallel (``pytest -n 2``) run. Set ``OMP_NUM_THREADS`` yourself to override.

In-process tests predict on the CPU through torch whatever their model's ``cpu_runtime`` says
(many compare with torchvision's forward exactly, and each new model would pay an export), and a
trained model is saved without the runtime's graph; the
tests of the compiled runtime (`tests/test_cpu_runtime.py`) are marked ``compiled_cpu_runtime``
and run it. For the same reasons the runs that tests start as subprocesses (`python -m local_runner`,
`tests/train_model_process.py`) are configured with ``cpu_runtime: torch``: each would otherwise
export and compile the graph again.
"""
import os
import sys
import tempfile

if 'PYTEST_XDIST_WORKER' in os.environ or 'DATALOOP_PATH' not in os.environ:
    # one per process: parallel workers (`pytest -n 2`) must not share the SDK's cookie file
    os.environ['DATALOOP_PATH'] = tempfile.mkdtemp(prefix='dataloop_path_')
os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch is imported: it reads this once

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataloop_emulator import DataloopEmulator, NoExportWaitTime, connect_sdk  # noqa: E402
import sdk_frames  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.core import runtime_setup  # noqa: E402

# The test process is an application like the adapter's service and the local runner: it does their set-up once
# (PIL's bomb limit, the warnings filter), so what a test sees does not hang on whether an earlier test in the same
# worker happened to build an adapter. tests/test_settings.py checks, in a fresh process, that imports set up nothing.
runtime_setup.configure()

EMULATOR_ALIAS = 'emulator'


def pytest_configure(config):
    config.addinivalue_line('markers', 'compiled_cpu_runtime: predict / embed on the CPU run the configured '
                                       'cpu_runtime (other tests run torch)')


@pytest.fixture(autouse=True, scope='session')
def sdk_frames_without_source():
    """dtlpy's per-request caller record without reading source files (see tests/sdk_frames.py)."""
    sdk_frames.install()


@pytest.fixture(autouse=True)
def torch_cpu_forward(request, monkeypatch):
    """The torch path on the CPU unless the test is marked ``compiled_cpu_runtime`` (see the module's docstring)."""
    if request.node.get_closest_marker('compiled_cpu_runtime') is None:
        from fasterrcnn_adapter import FasterRCNNAdapter
        from utils.inference import cpu_runtime
        monkeypatch.setattr(cpu_runtime.CpuRuntime, '_graph', lambda self, *args, **kwargs: None)
        monkeypatch.setattr(FasterRCNNAdapter, '_save_cpu_graph', lambda self, *args, **kwargs: None)


@pytest.fixture
def dataloop_env(monkeypatch):
    """Start an emulator, point ``dl.client_api`` at it with a valid unsigned token, yield it.

    Function scoped: each test starts from empty platform state (a server
    starts in milliseconds). Afterwards the SDK goes back to its previous
    environment, so tests that expect "no platform" keep getting it.
    """
    import dtlpy as dl
    import dtlpy.repositories.datasets as dl_datasets

    monkeypatch.setattr(dl_datasets, 'time', NoExportWaitTime())

    previous_env = dl.client_api.environment
    emulator = DataloopEmulator().start()
    try:
        connect_sdk(emulator.api_url, alias=EMULATOR_ALIAS)
        yield emulator
    finally:
        emulator.stop()
        try:
            if previous_env and previous_env != emulator.api_url:
                dl.client_api.setenv(previous_env)
        except Exception:  # restoring is best effort; the emulator is already gone
            pass


@pytest.fixture
def dataloop_emulator(dataloop_env):
    """Alias of ``dataloop_env`` for tests that read better with this name."""
    return dataloop_env


@pytest.fixture(autouse=True, scope='session')
def sdk_uploads_without_event_loops():
    """dtlpy's upload stream read without an event loop per chunk (see tests/sdk_uploads.py)."""
    import sdk_uploads
    sdk_uploads.install()
