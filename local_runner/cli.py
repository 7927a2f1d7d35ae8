"""The command line: parse, check paths, dispatch to the package's modules, print.

No domain logic lives here. Errors in the input (`utils.core.errors.InputError`:
a missing folder, an empty one, a bad configuration key, a model folder without
weights, a checkpoint that does not fit) end with exit code 2 and one line on
stderr; anything else is a bug and keeps its traceback. Heavy imports (torch,
dtlpy) happen after the arguments and paths are checked, so a wrong path fails fast.
"""
import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

from local_runner import demo
from local_runner.inputs import check_data_dir, list_images, parse_labels, read_config_file
from local_runner.logs import setup_logging
from local_runner.output_paths import writable_file, writable_folder
from local_runner.model_folder import check_train_output, find_model_files, load_model_dir, train_on_folder
from local_runner.predict import predict_images
from local_runner.report import evaluate_on_folder
from utils.core import runtime_setup, termination
from utils.core.errors import InputError
from utils.core.output_layout import SIDECAR_SUFFIX
from utils.export.export_size import check_size

logger = logging.getLogger(__name__)

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130


def cmd_train(args) -> int:
    check_data_dir(args.data, ('train', 'validation'))
    configuration = read_config_file(args.config)
    labels = parse_labels(args.labels)
    writable_folder(args.output, '--output')
    check_train_output(args.output)
    start = time.time()
    result = train_on_folder(args.data, args.output, configuration, labels)
    metrics = result['metrics']
    print(f"trained {result['epochs_run']} epoch(s) in {demo.format_duration(time.time() - start)}; "
          f"best epoch {result['best_epoch'] + 1}: validation mAP {metrics.get('mAP', 0.0):.4f}, "
          f"mAP@.5 {metrics.get('mAP_50', 0.0):.4f}")
    print(f"model:   {result['output']} (weights {result['weights']}, description {result['model_json']})")
    print(f"curves:  {result['curves']}")
    print(f"predict: python -m local_runner predict --model {result['output']} --input IMAGES --output DIR")
    return 0


def cmd_predict(args) -> int:
    find_model_files(args.model)
    if os.path.isdir(args.input) and os.path.realpath(args.output) == os.path.realpath(args.input):
        raise InputError(f'--output {args.output} is the --input folder: give a separate folder for the results')
    inputs = list_images(args.input, exclude=args.output)
    writable_folder(args.output, '--output')
    overrides = read_config_file(args.config)
    overrides.update({'conf_threshold': args.conf} if args.conf is not None else {})
    adapter = load_model_dir(args.model, overrides)
    result = predict_images(adapter, inputs, args.output)
    videos = [entry for entry in result['images'] if 'video' in entry]
    print(f"{len(result['images']) - len(videos)} image(s), "
          + (f"{len(videos)} video(s) ({sum(v['tracks'] for v in videos)} track(s)), " if videos else '')
          + f"{result['boxes']} box(es) at conf >= {result['conf_threshold']:g} "
          f"-> {args.output} (<name>.json annotations, <name>.png pictures)"
          + (f"; {len(result['unreadable'])} unreadable file(s) skipped" if result['unreadable'] else '')
          + (f"; {len(result['unwritable'])} result(s) not written" if result['unwritable'] else ''))
    return 0


def cmd_evaluate(args) -> int:
    find_model_files(args.model)
    check_data_dir(args.data, (args.subset,))
    writable_folder(args.output or args.model, '--output' if args.output else '--model (where the results go)')
    adapter = load_model_dir(args.model)
    result = evaluate_on_folder(adapter, args.data, args.subset, args.output or args.model)
    print(f"COCO bbox evaluation on {result['images']} {args.subset} image(s) of {args.data}\n")
    print(result['table'])
    print(f"\nwritten: {result['json']}, {result['txt']}, {result['pr_curve']}")
    return 0


def cmd_export(args) -> int:
    find_model_files(args.model)
    writable_file(args.output, '--output', companions=(SIDECAR_SUFFIX,))
    size = check_size(tuple(args.size)) if args.size else None
    from utils.export.onnx_export import export_onnx, sidecar_path  # imports torch: after the paths and size
    output = export_onnx(args.model, args.output, size=size)
    print(f'exported {output} and {sidecar_path(output)} (label map, input size, preprocessing, score threshold)')
    return 0


def cmd_demo(args) -> int:
    settings_overrides = {'epochs': args.epochs} if args.epochs is not None else {}
    data_overrides = {}
    if args.n_train is not None:
        data_overrides['n_train'] = args.n_train
    if args.n_val is not None:
        data_overrides['n_val'] = args.n_val
    result = demo.run_demo(args.output, data_overrides, settings_overrides)
    print(demo.format_demo_summary(result))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not an integer: {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a number: {text!r}') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be between 0 and 1, got {value}')
    return value


def _logging_options(default) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument('-q', '--quiet', action='store_true', default=default,
                         help='log warnings and errors only (default: INFO)')
    options.add_argument('-v', '--verbose', action='store_true', default=default, help='log debug messages too')
    return options


def _add_train(commands, common) -> None:
    p = commands.add_parser('train', parents=[common], help='fine-tune on a local export (DIR/train, DIR/validation)',
                            description='convert_from_dtlpy + train + save on a folder in Dataloop\'s download '
                                        'layout. Writes OUT/weights/best.pth, OUT/model.json, OUT/curves.csv/png. '
                                        'An interrupted run (OUT/weights/last.pth) resumes.')
    p.add_argument('--data', required=True, metavar='DIR',
                   help='export folder with train/ and validation/ (each: items/ images, json/ item JSONs)')
    p.add_argument('--output', required=True, metavar='DIR', help='where the model is written')
    p.add_argument('--config', metavar='FILE.json',
                   help="JSON object of configuration keys merged over dataloop.json's defaults "
                        '(see README "Configuration"); offline, set "pretrained": false unless the COCO weights '
                        'are under $TORCH_HOME')
    p.add_argument('--labels', metavar='a,b,c',
                   help='class labels in id order (ids 1..K); default: the labels found in the data, sorted')
    p.set_defaults(func=cmd_train)


def _add_predict(commands, common) -> None:
    p = commands.add_parser('predict', parents=[common], help='boxes on images: Dataloop annotation JSON + PNG',
                            description='One <name>.json (Dataloop item JSON with the box annotations '
                                        'predict_items would upload) and one <name>.png (boxes, labels, scores '
                                        'drawn) per image.')
    p.add_argument('--model', required=True, metavar='DIR', help='a folder written by `train`')
    p.add_argument('--input', required=True, metavar='FILE_OR_DIR',
                   help='an image or video, or a folder (searched recursively)')
    p.add_argument('--output', required=True, metavar='DIR', help='where the JSON and PNG files go')
    p.add_argument('--conf', type=_probability, default=None,
                   help="keep boxes with score >= this (default: the model's conf_threshold, 0.5 unless configured)")
    p.add_argument('--config', metavar='FILE', default=None,
                   help='JSON object of configuration keys over the model\'s (e.g. video_frame_stride, video_tracker)')
    p.set_defaults(func=cmd_predict)


def _add_evaluate(commands, common) -> None:
    p = commands.add_parser('evaluate', parents=[common], help='COCO mAP, per-class AP, precision-recall plot',
                            description='COCO bbox evaluation of a trained model on one subset of a local export. '
                                        'Writes evaluation_<subset>.json/.txt and pr_curve_<subset>.png.')
    p.add_argument('--model', required=True, metavar='DIR', help='a folder written by `train`')
    p.add_argument('--data', required=True, metavar='DIR', help='export folder holding the subset')
    p.add_argument('--subset', default='validation', help='subset folder to evaluate on (default: validation)')
    p.add_argument('--output', metavar='DIR', help='where to write the results (default: the model folder)')
    p.set_defaults(func=cmd_evaluate)


def _add_export(commands, common) -> None:
    p = commands.add_parser('export', parents=[common], help='the trained network as ONNX at a fixed input size',
                            description='Writes an ONNX file (classic TorchScript-based exporter, opset 17; needs '
                                        'the onnx package of requirements-dev.txt) and beside it FILE.onnx.json: the '
                                        'label map, the input size and preprocessing, the score threshold. '
                                        'See README "ONNX export" for running it with onnxruntime.')
    p.add_argument('--model', required=True, metavar='DIR', help='a folder written by `train`')
    p.add_argument('--output', required=True, metavar='FILE.onnx', help='the ONNX file to write')
    p.add_argument('--size', type=_positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help="input height and width in pixels, each from 32 to 8192 (default: a min_size square)")
    p.set_defaults(func=cmd_export)


def _add_demo(commands, common) -> None:
    p = commands.add_parser('demo', parents=[common],
                            help='synthetic data -> train from random weights -> evaluate -> predict',
                            description='Writes a seeded synthetic detection set, trains on it from random '
                                        'weights (CPU is enough), evaluates, predicts on the validation images '
                                        'and prints a summary. Settings: DEMO_SETTINGS / DEMO_DATA in '
                                        'local_runner/demo.py.')
    p.add_argument('--output', default='demo_output', metavar='DIR',
                   help='folder for data/, model/ and predictions/ (default: demo_output)')
    p.add_argument('--epochs', type=_positive_int, default=None, help=f"default {demo.DEMO_SETTINGS['epochs']}")
    p.add_argument('--n-train', type=_positive_int, default=None,
                   help=f"training images (default {demo.DEMO_DATA['n_train']})")
    p.add_argument('--n-val', type=_positive_int, default=None,
                   help=f"validation images (default {demo.DEMO_DATA['n_val']})")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    # the options work before and after the command; SUPPRESS keeps the subcommand from resetting them
    common = _logging_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog='python -m local_runner', parents=[_logging_options(False)],
        description='Train, evaluate, predict and export with the Faster R-CNN Dataloop adapter on local folders, '
                    'offline (no Dataloop account, no platform calls).')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for add_command in (_add_train, _add_predict, _add_evaluate, _add_export, _add_demo):  # the help's order
        add_command(commands, common)
    return parser


def _one_line(err: BaseException) -> str:
    return ' '.join(str(err).split()) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_logging = setup_logging(quiet=args.quiet, verbose=args.verbose)
    runtime_setup.configure()
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:  # SIGTERM (a preemption, `kill`) stops a command as Ctrl-C does
        with termination.sigterm_raises(termination.Terminated), logging_redirect_tqdm():
            return args.func(args)
    except InputError as err:
        logger.debug('%s failed', args.command, exc_info=True)
        print(f'local_runner {args.command}: error: {_one_line(err)}', file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt as err:
        again = ' (run the same command again to resume from the last finished epoch)' \
            if args.command == 'train' else ''
        by = ' by SIGTERM' if isinstance(err, termination.Terminated) else ''
        print(f'local_runner {args.command}: interrupted{by}{again}', file=sys.stderr)
        return termination.EXIT_CODE if by else EXIT_INTERRUPTED
    finally:
        restore_logging()
