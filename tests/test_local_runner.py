"""`python -m local_runner`: train / predict / evaluate / demo on tiny synthetic sets, offline.

One tiny model is trained once per module (1 epoch, 96 px images, min_size=max_size=128) and
shared by the predict / evaluate tests. Error paths run as real subprocesses (they fail before
torch is imported, so they are quick) to check exit codes and the one-line message.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from local_runner import demo, inputs, report
from local_runner.cli import main
from tests.test_training import curves_png_not_drawn  # noqa: F401 (a fixture)
from utils.core import config as config_lib
from utils.data.synthetic import make_synthetic_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ['circle', 'square', 'triangle']
TINY = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'device': 'cpu',
        'min_size': 128, 'max_size': 128, 'batch_size': 2, 'num_workers': 0, 'epochs': 1,
        'learning_rate': 0.01, 'warmup_iters': 2, 'cpu_runtime': 'torch'}  # subprocesses too: see conftest.py
# Fewer proposals through the box head (README's advice for CPU training): its 12.8M-weight layer is most of a step.
LIGHT_TRAINING = {'box_batch_size_per_image': 64, 'rpn_post_nms_top_n_train': 150}


def run_cli(*args, timeout=300):
    """`python -m local_runner ARGS` in a fresh interpreter, from the repository root."""
    return subprocess.run([sys.executable, '-m', 'local_runner', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def assert_one_line_error(stderr, *fragments):
    assert 'Traceback' not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert 'error:' in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('export')
    make_synthetic_export(str(root), n_train=6, n_val=4, image_size=(96, 96), seed=3)
    return str(root)


@pytest.fixture(scope='module')
def small_export_dir(tmp_path_factory):
    """The fewest images a run trains and validates on: for the tests of how a run ends, not of what it learns."""
    root = tmp_path_factory.mktemp('small_export')
    make_synthetic_export(str(root), n_train=2, n_val=1, image_size=(96, 96), seed=3)
    return str(root)


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('config') / 'tiny.json'
    path.write_text(json.dumps({**TINY, **LIGHT_TRAINING}))
    return str(path)


@pytest.fixture(scope='module')
def trained(export_dir, config_file, tmp_path_factory):
    """A `train` output folder (trained in-process), shared by the tests below."""
    output = str(tmp_path_factory.mktemp('runs') / 'model')
    assert main(['train', '--data', export_dir, '--output', output, '--config', config_file]) == 0
    return output


def load_like_the_platform(model_dir):
    """An adapter built independently of the runner: local_model(model.json) + adapter.load(model_dir)."""
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.platform.local_model import local_model
    with open(os.path.join(model_dir, 'model.json')) as f:
        description = json.load(f)
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration=description['configuration'], labels=description['labels'])
    adapter.load(model_dir)
    return adapter


# ----------------------------------------------------------------------------- train

def test_train_writes_weights_curves_and_a_model_description(trained, export_dir):
    assert os.path.isfile(os.path.join(trained, 'weights', 'best.pth'))
    assert not os.path.exists(os.path.join(trained, 'weights', 'last.pth'))
    assert os.path.isfile(os.path.join(trained, 'curves.csv'))
    Image.open(os.path.join(trained, 'curves.png')).verify()
    with open(os.path.join(trained, 'model.json')) as f:
        description = json.load(f)
    # labels default to those found in the data, ids 1..K
    assert description['labels'] == LABELS
    configuration = description['configuration']
    assert configuration['id_to_label_map'] == {'1': 'circle', '2': 'square', '3': 'triangle'}
    assert configuration['label_to_id_map'] == {'circle': 1, 'square': 2, 'triangle': 3}
    for key, value in {**TINY, **LIGHT_TRAINING}.items():
        assert configuration[key] == value, key
    assert description['training']['epochs_run'] == 1
    checkpoint = torch.load(os.path.join(trained, 'weights', 'best.pth'), weights_only=True)
    assert checkpoint['model_variant'] == TINY['model_variant']
    assert checkpoint['id_to_label_map'] == {1: 'circle', 2: 'square', 3: 'triangle'}


def test_train_refuses_to_overwrite_a_finished_run(trained, export_dir, config_file, capsys):
    before = os.path.getmtime(os.path.join(trained, 'weights', 'best.pth'))
    code = main(['train', '--data', export_dir, '--output', trained, '--config', config_file])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, 'already holds a finished training run')
    assert os.path.getmtime(os.path.join(trained, 'weights', 'best.pth')) == before


def test_a_full_disk_before_the_first_last_pth_is_one_line_and_no_finished_run(small_export_dir, config_file,
                                                                               tmp_path, monkeypatch, capsys,
                                                                               curves_png_not_drawn):
    """best.pth written, last.pth not (its write met a full disk; a kill there leaves the same files):
    exit 2 with one line, and the same command then trains instead of calling the run finished."""
    from tests.test_resume_state import fail_writes_of
    output = str(tmp_path / 'model')
    fail_writes_of(monkeypatch, lambda path: path.endswith('last.pth'))
    assert main(['train', '--data', small_export_dir, '--output', output, '--config', config_file]) == 2
    stderr = capsys.readouterr().err  # the training log, then the error in one line
    assert 'Traceback' not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith('local_runner train: error: cannot write ') and 'the disk is full' in last_line
    assert os.path.join('weights', 'last.pth') in last_line
    assert sorted(os.listdir(os.path.join(output, 'weights'))) == ['best.pth']
    monkeypatch.undo()
    assert main(['train', '--data', small_export_dir, '--output', output, '--config', config_file]) == 0
    assert os.path.isfile(os.path.join(output, 'model.json'))
    assert sorted(os.listdir(os.path.join(output, 'weights'))) == ['best.pth']


def test_train_completes_a_finished_run_killed_before_its_model_json(small_export_dir, config_file, tmp_path,
                                                                      monkeypatch, caplog, curves_png_not_drawn):
    from local_runner import model_folder

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    output = str(tmp_path / 'model')
    monkeypatch.setattr(model_folder, 'write_model_description', killed)
    assert main(['train', '--data', small_export_dir, '--output', output, '--config', config_file]) != 0
    assert not os.path.exists(os.path.join(output, 'model.json'))
    assert os.path.isfile(os.path.join(output, 'weights', 'last.pth'))  # it says the run finished
    monkeypatch.undo()
    caplog.set_level('INFO')
    assert main(['train', '--data', small_export_dir, '--output', output, '--config', config_file]) == 0
    assert 'training already finished' in caplog.text  # nothing trained again
    with open(os.path.join(output, 'model.json')) as f:
        assert json.load(f)['training']['epochs_run'] == 1
    assert sorted(os.listdir(os.path.join(output, 'weights'))) == ['best.pth']


def test_train_config_with_an_unknown_key_or_a_bad_value_is_a_one_line_error(export_dir, tmp_path, capsys):
    bad_key = tmp_path / 'bad_key.json'
    bad_key.write_text(json.dumps({**TINY, 'epohcs': 3}))
    assert main(['train', '--data', export_dir, '--output', str(tmp_path / 'a'),
                              '--config', str(bad_key)]) == 2
    assert_one_line_error(capsys.readouterr().err, "unknown configuration key(s) ['epohcs']", "'epochs'")

    bad_value = tmp_path / 'bad_value.json'
    bad_value.write_text(json.dumps({**TINY, 'model_variant': 'yolo'}))
    assert main(['train', '--data', export_dir, '--output', str(tmp_path / 'b'),
                              '--config', str(bad_value)]) == 2
    assert_one_line_error(capsys.readouterr().err, "'model_variant'", 'yolo')

    not_json = tmp_path / 'not.json'
    not_json.write_text('{epochs: 3')
    assert main(['train', '--data', export_dir, '--output', str(tmp_path / 'c'),
                              '--config', str(not_json)]) == 2
    assert_one_line_error(capsys.readouterr().err, 'not valid JSON')
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_train_with_labels_the_data_does_not_have_fails_before_training(export_dir, config_file, tmp_path, capsys):
    output = tmp_path / 'model'
    code = main(['-q', 'train', '--data', export_dir, '--output', str(output), '--config', config_file,
                              '--labels', 'car,person'])
    assert code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert err.strip().splitlines()[-1].startswith('local_runner train: error: none of the labels in the data')
    assert not (output / 'weights' / 'best.pth').exists()


# ----------------------------------------------------------------------------- predict

def test_predict_writes_loadable_json_and_pictures_matching_adapter_predict(trained, export_dir, tmp_path, capsys):
    import dtlpy as dl
    from torchvision.transforms.functional import pil_to_tensor

    from utils.data.images import load_image

    images = tmp_path / 'images'
    shutil.copytree(os.path.join(export_dir, 'validation', 'items'), images)
    (images / 'broken.jpg').write_bytes(b'this is not a jpeg')
    (images / 'notes.txt').write_text('not an image, not even by name')
    output = tmp_path / 'predictions'
    conf = 0.01
    code = main(['predict', '--model', trained, '--input', str(images), '--output', str(output),
                              '--conf', str(conf)])
    captured = capsys.readouterr()
    assert code == 0
    assert 'broken.jpg' in captured.err and 'WARNING' in captured.err  # named, and the others went on
    assert 'Traceback' not in captured.err
    assert 'box(es)' in captured.out

    readable = sorted(p for p in os.listdir(images) if p.endswith('.jpg') and p != 'broken.jpg')
    assert sorted(os.listdir(output)) == sorted([p[:-4] + '.json' for p in readable] +
                                                [p[:-4] + '.png' for p in readable])

    # the same model, loaded without the runner, on the same images in the same batches
    adapter = load_like_the_platform(trained)
    adapter.model_entity.configuration['conf_threshold'] = conf
    batch_size = adapter.model_entity.configuration['batch_size']
    tensors = [pil_to_tensor(load_image(str(images / name))) for name in readable]
    expected = []
    for first in range(0, len(tensors), batch_size):
        expected.extend(adapter.predict(tensors[first:first + batch_size]))

    total = 0
    for name, collection in zip(readable, expected):
        stem = name[:-4]
        with open(output / f'{stem}.json') as f:
            item_json = json.load(f)
        assert item_json['filename'] == f'/{name}'
        loaded = dl.AnnotationCollection.from_json(item_json)
        assert len(loaded.annotations) == len(item_json['annotations']) == len(collection.annotations)
        got = [(a['label'], a['coordinates'][0]['x'], a['coordinates'][0]['y'], a['coordinates'][1]['x'],
                a['coordinates'][1]['y'], a['metadata']['user']['model']['confidence'])
               for a in item_json['annotations']]
        want = [(a.label, a.left, a.top, a.right, a.bottom, a.metadata['user']['model']['confidence'])
                for a in collection.annotations]
        for g, w in zip(got, want):
            assert g[0] == w[0]
            assert g[1:] == pytest.approx(w[1:], abs=1e-3)
        assert all(score >= conf for *_, score in got)
        total += len(got)
        with Image.open(output / f'{stem}.png') as picture:
            assert picture.format == 'PNG'
            assert picture.size == (96, 96)
    assert total > 0  # a comparison of empty lists would prove nothing


def test_predict_exits_non_zero_only_when_no_image_can_be_read(trained, tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'a.jpg').write_bytes(b'\xff\xd8\xff truncated')
    (images / 'b.png').write_text('plain text')
    code = main(['predict', '--model', trained, '--input', str(images), '--output', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert code == 2
    assert 'a.jpg' in err and 'b.png' in err
    assert 'Traceback' not in err
    assert err.strip().splitlines()[-1] == 'local_runner predict: error: none of the 2 image file(s) could be read ' \
                                           '(see the warnings above)'


def test_predict_in_a_subprocess_on_one_file(trained, export_dir, tmp_path):
    image = os.path.join(export_dir, 'validation', 'items', 'validation_000001.jpg')
    result = run_cli('predict', '--model', trained, '--input', image, '--output', str(tmp_path), '--conf', '0.05')
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    assert 'INFO' in result.stderr  # logging at INFO by default
    with open(tmp_path / 'validation_000001.json') as f:
        import dtlpy as dl
        dl.AnnotationCollection.from_json(json.load(f))
    with Image.open(tmp_path / 'validation_000001.png') as picture:
        picture.verify()


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_prints_the_map_table_per_class_ap_and_writes_a_pr_plot(trained, export_dir, tmp_path, capsys):
    code = main(['evaluate', '--model', trained, '--data', export_dir, '--output', str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ('mAP@[.5:.95]', 'mAP@.5', 'mAP@.75', 'AR@100', *LABELS):
        assert name in out
    with open(tmp_path / 'evaluation_validation.json') as f:
        document = json.load(f)
    assert document['images'] == 4
    assert set(document['per_class']) == set(LABELS)
    json_dir = os.path.join(export_dir, 'validation', 'json')
    boxes = 0
    for name in os.listdir(json_dir):
        with open(os.path.join(json_dir, name)) as f:
            boxes += len(json.load(f)['annotations'])
    assert sum(row['gt_boxes'] for row in document['per_class'].values()) == boxes
    # the same numbers the trainer's validation gave for the saved epoch (same engine, same weights)
    with open(os.path.join(trained, 'model.json')) as f:
        best = json.load(f)['training']['best_metrics']
    for key in ('mAP', 'mAP_50', 'mAP_75', 'AR_100'):
        assert document['metrics'][key] == pytest.approx(best[key], abs=1e-4), key
    assert (tmp_path / 'evaluation_validation.txt').read_text().count('\n') > 5
    with Image.open(tmp_path / 'pr_curve_validation.png') as plot:
        assert plot.format == 'PNG' and plot.size[0] > 300


def test_the_metrics_table_lists_per_class_ap_and_marks_classes_without_ground_truth():
    rows = {'a': {'id': 1, 'gt_boxes': 2, 'AP': 1.0, 'AP_50': 1.0, 'pr_50': None},
            'c': {'id': 3, 'gt_boxes': 0, 'AP': None, 'AP_50': None, 'pr_50': None}}
    table = report.format_metrics_table({'mAP': 0.5}, rows)
    lines = table.splitlines()
    assert lines[1].split() == ['mAP@[.5:.95]', '0.5000'] and lines[2].split() == ['mAP@.5', '0.0000']
    assert lines[-2].split() == ['a', '1.0000', '1.0000', '2']
    assert 'n/a' in lines[-1]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize('case', ['wrong path', 'empty folder', 'no train folder', 'data is a file'])
def test_bad_data_folders_exit_2_with_one_line_naming_what_is_missing(case, tmp_path):
    data = tmp_path / 'data'
    expected = {'wrong path': 'no such folder', 'empty folder': 'is empty',
                'no train folder': 'has no train/ folder', 'data is a file': 'is a file'}[case]
    if case == 'empty folder':
        data.mkdir()
    elif case == 'no train folder':
        (data / 'validation' / 'json').mkdir(parents=True)
    elif case == 'data is a file':
        data.write_text('x')
    result = run_cli('train', '--data', str(data), '--output', str(tmp_path / 'out'))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f'--data {data}', expected)
    assert result.stdout == ''
    assert not (tmp_path / 'out').exists()


def test_a_wrong_path_fails_before_torch_or_dtlpy_is_imported(tmp_path):
    """The path checks come first: a typo costs a fraction of a second, not the heavy imports."""
    script = ("import sys; from local_runner.cli import main; code = main(sys.argv[1:]); "
              "print(code, sorted({'torch', 'torchvision', 'dtlpy'} & set(sys.modules)))")
    for args in (['train', '--data', str(tmp_path / 'nope'), '--output', str(tmp_path / 'out')],
                 ['predict', '--model', str(tmp_path / 'nope'), '--input', str(tmp_path), '--output', str(tmp_path)]):
        result = subprocess.run([sys.executable, '-c', script, *args], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.stdout.split() == ['2', '[]'], (args, result.stdout, result.stderr)
        assert_one_line_error(result.stderr, 'no such folder')
    # predict's inputs are listed (image extensions) and its output checked before torch too
    (tmp_path / 'model' / 'weights').mkdir(parents=True)
    (tmp_path / 'model' / 'weights' / 'best.pth').write_bytes(b'not read before the paths are checked')
    (tmp_path / 'images').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'a.png')
    (tmp_path / 'a_file').write_text('x')
    args = ['predict', '--model', str(tmp_path / 'model'), '--input', str(tmp_path / 'images'),
            '--output', str(tmp_path / 'a_file')]
    result = subprocess.run([sys.executable, '-c', script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ['2', '[]'], (args, result.stdout, result.stderr)
    assert_one_line_error(result.stderr, '--output', 'is a file, not a folder')
    # export's --size too
    args = ['export', '--model', str(tmp_path / 'model'), '--output', str(tmp_path / 'm.onnx'),
            '--size', '100000', '64']
    result = subprocess.run([sys.executable, '-c', script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ['2', '[]'], (args, result.stdout, result.stderr)
    assert_one_line_error(result.stderr, 'local_runner export: error:', 'each from 32 to 8192', '(100000, 64)')


def test_model_folder_problems_exit_2_with_one_line(tmp_path, export_dir):
    missing = run_cli('predict', '--model', str(tmp_path / 'nope'), '--input', export_dir, '--output', str(tmp_path))
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, 'no such folder')

    (tmp_path / 'model').mkdir()
    (tmp_path / 'model' / 'model.json').write_text(json.dumps({'configuration': {}, 'labels': ['a']}))
    no_weights = run_cli('evaluate', '--model', str(tmp_path / 'model'), '--data', export_dir)
    assert no_weights.returncode == 2
    assert_one_line_error(no_weights.stderr, 'no weights at', 'best.pth')

    (tmp_path / 'empty').mkdir()
    empty = run_cli('predict', '--model', str(tmp_path / 'empty'), '--input', export_dir, '--output', str(tmp_path))
    assert empty.returncode == 2
    assert_one_line_error(empty.stderr, 'no model.json and no weights/best.pth')


def test_predict_input_problems_exit_2(trained, tmp_path, capsys):
    assert main(['predict', '--model', trained, '--input', str(tmp_path / 'nope'),
                              '--output', str(tmp_path / 'o')]) == 2
    assert_one_line_error(capsys.readouterr().err, 'no such file or folder')
    (tmp_path / 'empty').mkdir()
    assert main(['predict', '--model', trained, '--input', str(tmp_path / 'empty'),
                              '--output', str(tmp_path / 'o')]) == 2
    assert_one_line_error(capsys.readouterr().err, 'has no image files')


def test_predict_never_reads_its_own_results_back_as_inputs(trained, tmp_path, capsys):
    images = tmp_path / 'images'
    (images / 'sub').mkdir(parents=True)
    Image.new('RGB', (40, 30), 'white').save(images / 'a.jpg')
    Image.new('RGB', (40, 30), 'black').save(images / 'sub' / 'a.png')
    Image.new('RGB', (40, 30), 'black').save(images / 'sub' / 'a.jpg')
    (images / 'predictions').mkdir()
    Image.new('RGB', (40, 30), 'red').save(images / 'predictions' / 'a.png')  # an earlier run's picture
    listed = inputs.list_images(str(images), exclude=str(images / 'predictions'))
    assert [rel for _, rel in listed] == ['a.jpg', os.path.join('sub', 'a.jpg'), os.path.join('sub', 'a.png')]
    # two inputs with one stem keep their extension in the output name
    assert inputs.output_names(listed) == ['a', os.path.join('sub', 'a.jpg'), os.path.join('sub', 'a.png')]
    assert main(['predict', '--model', trained, '--input', str(images), '--output', str(images)]) == 2
    assert_one_line_error(capsys.readouterr().err, 'is the --input folder')


def test_only_the_projects_input_errors_become_one_line_exits(tmp_path, capsys, monkeypatch):
    """An InputError is the user's to fix: one line, exit 2. Any other error (a ValueError from torch or
    PIL, say) is a bug and keeps its traceback."""
    from local_runner import cli
    from utils.core.errors import InputError

    def bad_input(*args, **kwargs):
        raise InputError('the folder holds\nnothing usable')
    monkeypatch.setattr(cli.demo, 'run_demo', bad_input)
    assert main(['demo', '--output', str(tmp_path / 'a')]) == 2
    assert_one_line_error(capsys.readouterr().err, 'local_runner demo: error: the folder holds nothing usable')

    def bug(*args, **kwargs):
        raise ValueError('expected 4D input (got 3D input)')
    monkeypatch.setattr(cli.demo, 'run_demo', bug)
    with pytest.raises(ValueError, match='4D input'):
        main(['demo', '--output', str(tmp_path / 'b')])


# ----------------------------------------------------------------------------- demo

def test_demo_settings_are_one_place_and_valid():
    from utils.core import config
    assert set(demo.DEMO_SETTINGS) <= set(config.OPTIONS)
    settings = config_lib.resolve(demo.DEMO_SETTINGS)
    assert settings['pretrained'] is False  # the demo never downloads
    assert settings['min_size'] <= min(demo.DEMO_DATA['image_size'])


def test_demo_runs_end_to_end_and_prints_the_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(demo.DEMO_DATA, 'image_size', (96, 96))
    for key in ('min_size', 'max_size'):
        monkeypatch.setitem(demo.DEMO_SETTINGS, key, 128)
    monkeypatch.setitem(demo.DEMO_SETTINGS, 'num_workers', 0)
    monkeypatch.setitem(demo.DEMO_SETTINGS, 'batch_size', 2)
    monkeypatch.setitem(demo.DEMO_SETTINGS, 'warmup_iters', 2)
    monkeypatch.setitem(demo.DEMO_SETTINGS, 'device', 'cpu')
    output = tmp_path / 'demo'
    code = main(['demo', '--output', str(output), '--epochs', '1', '--n-train', '4', '--n-val', '2'])
    out = capsys.readouterr().out
    assert code == 0
    for fragment in ('Demo done', 'data', 'train', 'evaluate', 'predict', 'total', 'mAP@.5', 'AR@100',
                     'Pictures with boxes', str(output / 'predictions')):
        assert fragment in out, fragment
    pictures = sorted(p for p in os.listdir(output / 'predictions') if p.endswith('.png'))
    assert pictures == ['validation_000000.png', 'validation_000001.png']
    assert (output / 'model' / 'weights' / 'best.pth').is_file()
    assert (output / 'model' / 'pr_curve_validation.png').is_file()
    assert (output / 'model' / 'curves.png').is_file()
    with open(output / 'model' / 'model.json') as f:
        assert json.load(f)['training']['epochs_run'] == 1


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / 'precious.txt').write_text('keep me')
    assert main(['demo', '--output', str(tmp_path), '--epochs', '1']) == 2
    assert_one_line_error(capsys.readouterr().err, 'not written by the demo')
    assert (tmp_path / 'precious.txt').read_text() == 'keep me'
