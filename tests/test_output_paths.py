"""The paths a user names for results, and concurrent runs on one folder, through `python -m local_runner`.

Every `--output` (train's and predict's folders, evaluate's, export's file) that is a file where a folder
is meant or the reverse, a FIFO, a symbolic link to nothing (itself or a folder on its way), under a
file, read-only, or whose file name the file system cannot take ends with exit 2 and one line naming
it, before any work. A result name too long for the file system is shortened, deterministically, and
the rest is predicted. `export --size` has an upper bound it names. Three `train` runs started at once
on one folder each finish or refuse in one line, and the folder is one consistent finished run; a run
killed with SIGKILL leaves no lock behind.

Read-only: the tests run as root, whom file modes do not stop, and the interpreter lives where no other
user may run it, so `main` runs in-process with every write under the folder failing with EROFS, as on a
read-only mount (`test_bad_inputs.read_only`).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from local_runner.cli import main
from local_runner.inputs import output_names
from local_runner.output_paths import fitted_name
from test_bad_inputs import read_only  # noqa: F401 (a fixture)
from test_local_runner import LIGHT_TRAINING, REPO, TINY, assert_one_line_error, run_cli
from utils.core.run_lock import LOCK_NAME, RunInUseError, run_lock
from utils.data.synthetic import make_synthetic_export
from utils.modeling import checkpoints, model_factory

VARIANT = TINY['model_variant']


@pytest.fixture
def sandbox():
    """A folder every user can read (pytest's tmp_path is root's alone), removed afterwards."""
    folder = tempfile.mkdtemp(prefix='output-paths-')
    os.chmod(folder, 0o755)
    yield folder
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(folder)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """The best.pth of `model_dir`, written once for the module."""
    torch.manual_seed(0)
    model = model_factory.build_model(VARIANT, 3, 128, 128)
    return checkpoints.save_checkpoint(checkpoints.make_checkpoint(model, VARIANT, {1: 'a', 2: 'b'}, 128, 128),
                                       str(tmp_path_factory.mktemp('weights') / 'best.pth'))


@pytest.fixture
def model_dir(sandbox, weights):
    """A model folder of weights alone (predict and export rebuild the model from the checkpoint)."""
    folder = os.path.join(sandbox, 'model')
    os.makedirs(os.path.join(folder, 'weights'))
    shutil.copyfile(weights, os.path.join(folder, 'weights', 'best.pth'))
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return folder


@pytest.fixture
def images(sandbox):
    folder = os.path.join(sandbox, 'images')
    os.makedirs(folder)
    from PIL import Image
    Image.new('RGB', (96, 96), (120, 30, 200)).save(os.path.join(folder, 'plain.png'))
    os.chmod(os.path.join(folder, 'plain.png'), 0o644)
    return folder


@pytest.fixture
def data_dir(sandbox):
    folder = os.path.join(sandbox, 'data')
    make_synthetic_export(folder, n_train=1, n_val=1, image_size=(64, 64), seed=1)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return folder


def _bad_outputs(sandbox):
    """(name, path, what the one line must say) for the output folders nobody can use."""
    a_file = os.path.join(sandbox, 'a_file')
    with open(a_file, 'w') as f:
        f.write('x')
    fifo = os.path.join(sandbox, 'a_fifo')
    os.mkfifo(fifo)
    dangling = os.path.join(sandbox, 'dangling')
    os.symlink(os.path.join(sandbox, 'nowhere', 'deeper'), dangling)
    return [('file', a_file, 'is a file, not a folder'),
            ('fifo', fifo, 'is a special file, not a folder'),
            ('under a file', os.path.join(a_file, 'sub'), f'{a_file} is a file, not a folder'),
            ('dangling link', dangling, 'is a symbolic link to'),
            ('under a dangling link', os.path.join(dangling, 'sub'), f'({dangling}) is a symbolic link to')]


# ----------------------------------------------------------------------------- train, predict, evaluate folders

def test_train_output_that_cannot_be_a_folder_is_one_line(sandbox, data_dir):
    for name, path, said in _bad_outputs(sandbox):
        result = run_cli('train', '--data', data_dir, '--output', path)
        assert result.returncode == 2, (name, result.stderr)
        assert_one_line_error(result.stderr, '--output', said)
    assert not os.path.exists(os.path.join(sandbox, 'nowhere'))  # a dangling link's target is not created


def test_predict_and_evaluate_outputs_that_cannot_be_folders_are_one_line(sandbox, model_dir, images, data_dir):
    for name, path, said in _bad_outputs(sandbox):
        result = run_cli('predict', '--model', model_dir, '--input', images, '--output', path)
        assert result.returncode == 2, (name, result.stderr)
        assert_one_line_error(result.stderr, '--output', said)
        result = run_cli('evaluate', '--model', model_dir, '--data', data_dir, '--output', path)
        assert result.returncode == 2, (name, result.stderr)
        assert_one_line_error(result.stderr, '--output', said)


def test_read_only_outputs_are_one_line_naming_them(read_only, tmp_path, model_dir, images, data_dir, capsys):
    mount = tmp_path / 'mount'
    (mount / 'existing').mkdir(parents=True)
    before = read_only(mount)  # EROFS for every write under it, root or not, as on a read-only mount
    for path, said in ((mount / 'existing', 'is not writable: Read-only file system'),
                       (mount / 'new', 'cannot create the folder: Read-only file system')):
        for args in (['train', '--data', data_dir], ['predict', '--model', model_dir, '--input', images],
                     ['evaluate', '--model', model_dir, '--data', data_dir]):
            assert main(args + ['--output', str(path)]) == 2, args
            assert_one_line_error(capsys.readouterr().err, f'--output {path}', said)
        assert main(['export', '--model', model_dir, '--output', str(path / 'm.onnx')]) == 2
        assert_one_line_error(capsys.readouterr().err, f'--output {path / "m.onnx"}', said.split(':')[-1].strip())
    assert {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, files in os.walk(mount) for name in files} == before
    assert os.listdir(mount) == ['existing']


# ----------------------------------------------------------------------------- result names

def torch_runtime(folder):
    """A `--config` file under `folder`: the subprocess predicts through torch (see conftest.py)."""
    path = os.path.join(str(folder), 'torch.json')
    with open(path, 'w') as f:
        json.dump({'cpu_runtime': 'torch'}, f)
    return path


def test_a_result_name_too_long_for_the_file_system_is_shortened_and_the_rest_predicted(model_dir, sandbox,
                                                                                       tmp_path):
    from PIL import Image
    folder = tmp_path / 'inputs'
    folder.mkdir()
    long_stem = 'é' * 100 + 'x' * 51  # 251 bytes: the image's own name (.png) fits in 255, its .json does not
    for name in (long_stem + '.png', 'short.png', 'x' * 251 + '.jpg'):
        Image.new('RGB', (80, 60), (10, 200, 30)).save(folder / name)
    output = tmp_path / 'out'
    result = run_cli('predict', '--model', model_dir, '--input', str(folder), '--output', str(output),
                     '--config', torch_runtime(tmp_path))
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(output))
    assert len(names) == 6 and 'short.json' in names and 'short.png' in names
    assert all(len(os.fsencode(name)) <= 255 for name in names)
    shortened = [name for name in names if '~' in name]
    assert len(shortened) == 4 and any(name.startswith('é' * 10) for name in shortened)
    again = output_names([(str(folder / n), n) for n in sorted(os.listdir(folder))])
    assert again == output_names([(str(folder / n), n) for n in sorted(os.listdir(folder))])  # deterministic
    assert sorted(n + e for n in again for e in ('.json', '.png')) == names


def test_a_result_that_cannot_be_written_is_skipped_with_a_warning_and_the_rest_predicted(model_dir, tmp_path):
    from PIL import Image
    folder = tmp_path / 'inputs'
    (folder / 'sub').mkdir(parents=True)
    for name in ('sub/blocked.png', 'free.png'):
        Image.new('RGB', (80, 60), (10, 200, 30)).save(folder / name)
    output = tmp_path / 'out'
    output.mkdir()
    (output / 'sub').write_text('a file where the results of sub/ need a folder')
    result = run_cli('predict', '--model', model_dir, '--input', str(folder), '--output', str(output),
                     '--config', torch_runtime(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    assert f'cannot write the results of {folder / "sub" / "blocked.png"}' in result.stderr
    assert sorted(os.listdir(output)) == ['free.json', 'free.png', 'sub']
    assert '1 result(s) not written' in result.stdout


def test_fitted_names_stay_apart_and_cut_at_character_boundaries():
    a, b = 'dir/' + 'ü' * 130 + 'a', 'dir/' + 'ü' * 130 + 'b'
    fa, fb = fitted_name(a, 5), fitted_name(b, 5)
    assert fa != fb and fa.startswith('dir/ü') and fa == fitted_name(a, 5)
    assert len(os.fsencode(os.path.basename(fa))) + 5 <= 255
    os.path.basename(fa).encode('utf-8')  # whole characters only
    assert fitted_name('dir/short', 5) == 'dir/short'


# ----------------------------------------------------------------------------- export

def test_export_output_problems_and_sizes_are_one_line(sandbox, model_dir, tmp_path):
    folder = tmp_path / 'a_folder'
    folder.mkdir()
    dangling = tmp_path / 'dangling.onnx'
    os.symlink(tmp_path / 'missing' / 'm.onnx', dangling)
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    cases = [(str(folder), 'is a folder'), (str(folder) + os.sep, 'is a folder'),
             (str(dangling), 'is a symbolic link to'),
             (str(a_file / 'm.onnx'), 'is a file, not a folder'),
             (str(tmp_path / ('m' * 246 + '.onnx')), 'over the 255'),   # the .onnx fits, its .onnx.json not
             (str(tmp_path / ('m' * 300 + '.onnx')), 'over the 255')]
    for path, said in cases:
        result = run_cli('export', '--model', model_dir, '--output', path)
        assert result.returncode == 2, (path, result.stderr)
        assert_one_line_error(result.stderr, '--output', said)
    result = run_cli('export', '--model', model_dir, '--output', str(tmp_path / 'm.onnx'), '--size', '100000', '64')
    assert result.returncode == 2
    assert_one_line_error(result.stderr, 'from 32 to 8192', '100000')
    assert not (tmp_path / 'm.onnx').exists() and not (tmp_path / 'missing').exists()


# ----------------------------------------------------------------------------- concurrent runs

def test_three_trains_at_once_on_one_folder_finish_or_refuse_and_leave_one_run(tmp_path):
    data = tmp_path / 'data'
    make_synthetic_export(str(data), n_train=2, n_val=1, image_size=(96, 96), seed=4)
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps(dict(TINY, **LIGHT_TRAINING, epochs=2)))
    output = tmp_path / 'run'
    runs = [subprocess.Popen([sys.executable, '-m', 'local_runner', '-q', 'train', '--data', str(data), '--output',
                              str(output), '--config', str(config)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    finished = [err for code, err in results if code == 0]
    refused = [err for code, err in results if code == 2]
    assert len(finished) >= 1 and len(finished) + len(refused) == 3, results
    for err in refused:
        assert_one_line_error(err)
        # the holder's pid is named once it has written it: a refusal in the moment between its lock and that
        # write says the same without the pid
        assert 'is in use by another run' in err or 'already holds a finished training run' in err, err
    names = sorted(os.listdir(output))
    assert names == sorted([LOCK_NAME, 'model.json', 'weights', 'curves.csv', 'curves.png']), names
    assert os.listdir(output / 'weights') == ['best.pth']
    description = json.loads((output / 'model.json').read_text())
    assert description['training']['epochs_run'] == 2
    checkpoints.load_checkpoint(str(output / 'weights' / 'best.pth'))


def test_a_killed_run_leaves_no_lock_behind(tmp_path, data_dir):
    folder = tmp_path / 'run'
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from utils.core.run_lock import run_lock\n'
                               'with run_lock(sys.argv[1]):\n    print("held", flush=True); time.sleep(600)',
                               str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        result = run_cli('train', '--data', data_dir, '--output', str(folder))
        assert result.returncode == 2
        assert_one_line_error(result.stderr, f'--output {folder} is in use by another run (pid {holder.pid})')
        with pytest.raises(RunInUseError):
            with run_lock(str(folder)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's locks as it reaps it
        try:
            with run_lock(str(folder)):
                break
        except RunInUseError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_lock_file_that_is_a_folder_is_one_error_and_a_file_system_without_locks_a_warning(tmp_path, monkeypatch,
                                                                                             caplog):
    import errno
    import fcntl
    from utils.core.errors import InputError
    (tmp_path / 'odd' / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(InputError, match='cannot create the run lock'):
        with run_lock(str(tmp_path / 'odd'), '--output odd'):
            pass

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    ran = []
    with run_lock(str(tmp_path), '--output here'):
        ran.append(True)
    assert ran and 'does not support locks' in caplog.text
