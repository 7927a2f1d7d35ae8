"""Predictions on local image files, written the way the platform would see them.

Per image: ``<name>.json`` (a Dataloop item JSON whose ``annotations`` are what
``predict_items`` uploads; it loads with ``dl.AnnotationCollection.from_json``)
and ``<name>.png`` (the image with boxes, labels and scores drawn). Videos among
the inputs go to `local_runner.video` (tracks as JSON, a contact sheet as PNG).
"""
import errno
import logging
import mimetypes
import os
from typing import Any, Dict, List, Sequence, Tuple

from local_runner.draw import detections_from_json, draw_detections
from local_runner.inputs import RESULT_EXTENSIONS, output_names
from local_runner.output_paths import name_max
from utils.core.atomic import write_json
from utils.core.config import prediction_batch_size
from utils.core.errors import DiskFullError, InputError
from utils.core.progress import Progress
from utils.core.label_map import label_to_id

logger = logging.getLogger(__name__)


def _item_json(path: str, rel: str, image, annotations: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {'filename': '/' + rel.replace(os.sep, '/'), 'name': os.path.basename(rel),
            'metadata': {'system': {'width': image.width, 'height': image.height,
                                    'mimetype': mimetypes.guess_type(path)[0] or 'image/unknown'}},
            'annotations': annotations}


def _output_paths(inputs: Sequence[Tuple[str, str]], output_dir: str) -> List[Tuple[str, str]]:
    """(json, png) per input; an InputError when one would overwrite an input image."""
    targets = [tuple(os.path.join(output_dir, name + ext) for ext in RESULT_EXTENSIONS)
               for name in output_names(inputs, name_max(output_dir))]
    sources = {os.path.realpath(path) for path, _ in inputs}
    clash = [t for pair in targets for t in pair if os.path.realpath(t) in sources]
    if clash:
        raise InputError(f'--output {output_dir} would overwrite input image {clash[0]}: choose another --output')
    return targets


def _write_results(json_path: str, png_path: str, item_json: Dict[str, Any], picture) -> None:
    """One image's <name>.json and <name>.png; a full disk stops the run (`DiskFullError`), not this image."""
    try:
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        write_json(json_path, item_json, indent=1)
        picture.save(png_path, format='PNG')
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f'cannot write {png_path}: the disk is full: free some space or write to '
                                f'another --output') from err
        raise


def _write_batch(adapter, batch: List[Tuple[int, Any]], inputs: Sequence[Tuple[str, str]],
                 targets: List[Tuple[str, str]], class_ids: Dict[str, int], written: list, unwritable: list) -> int:
    """Predict one batch of (input index, PIL image) and write each result; returns the boxes written. A result
    that cannot be written is logged and listed in `unwritable`; the others are still written."""
    from torchvision.transforms.functional import pil_to_tensor
    n_boxes = 0
    collections = adapter.predict([pil_to_tensor(image) for _, image in batch])
    for (index, image), collection in zip(batch, collections):
        path, rel = inputs[index]
        json_path, png_path = targets[index]
        annotations = collection.to_json()['annotations']
        detections = detections_from_json(annotations)
        try:
            _write_results(json_path, png_path, _item_json(path, rel, image, annotations),
                           draw_detections(image, detections, class_ids))
        except OSError as err:  # this one result cannot be written there: the others can
            logger.warning('cannot write the results of %s to %s: %s: skipped', path, json_path, err.strerror or err)
            unwritable.append((path, str(err)))
            continue
        n_boxes += len(detections)
        written.append({'image': path, 'json': json_path, 'png': png_path, 'boxes': len(detections)})
    return n_boxes


def predict_images(adapter, inputs: Sequence[Tuple[str, str]], output_dir: str) -> Dict[str, Any]:
    """Per readable image: ``<stem>.json`` (Dataloop item JSON with the predicted annotations) and
    ``<stem>.png`` (the image with the boxes drawn). Unreadable images are logged and skipped."""
    from local_runner.video import predict_videos  # torch and dtlpy: after the path checks
    from utils.data.images import ImageDecodeError, load_image
    from utils.data.video import is_video  # OpenCV and numpy: not for a command that fails its checks

    settings = adapter.settings
    class_ids = label_to_id(adapter.id_to_label_map())
    targets = _output_paths(inputs, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    written, unreadable, unwritable, n_boxes = [], [], [], 0
    batch: List[Tuple[int, Any]] = []
    limits = adapter.image_limits()
    batch_size = prediction_batch_size(settings['batch_size'], adapter.device)
    videos = [index for index, (path, _) in enumerate(inputs) if is_video(path)]
    images = [index for index, (path, _) in enumerate(inputs) if not is_video(path)]
    bar = Progress(total=len(images), desc='predict', unit='image', log=logger)
    try:
        for position, index in enumerate(images):
            path = inputs[index][0]
            try:
                batch.append((index, load_image(path, limits)))
            except (ImageDecodeError, OSError) as err:  # ImageSizeError too: too large, too thin
                logger.warning('cannot read image %s: %s: skipped', path, err)
                unreadable.append((path, str(err)))
                bar.update(1)
            if batch and (len(batch) >= batch_size or position == len(images) - 1):
                n_boxes += _write_batch(adapter, batch, inputs, targets, class_ids, written, unwritable)
                bar.update(len(batch))
                batch.clear()
    finally:
        bar.close()
    found, unreadable_videos, video_boxes = predict_videos(adapter, [(inputs[i], targets[i]) for i in videos])
    result = {'output': output_dir, 'images': written + found, 'unreadable': unreadable + unreadable_videos,
              'unwritable': unwritable, 'boxes': n_boxes + video_boxes, 'conf_threshold': settings['conf_threshold']}
    _report(result, len(inputs), 'image or video' if videos else 'image')
    return result


def _report(result: Dict[str, Any], n_inputs: int, kind: str) -> None:
    """Log what was read and written; an InputError when nothing was."""
    if result['unreadable']:
        logger.warning('%d of %d file(s) could not be read: %s', len(result['unreadable']), n_inputs,
                       ', '.join(path for path, _ in result['unreadable']))
    if not result['images']:
        written_too = ' and written' if result['unwritable'] else ''
        raise InputError(f'none of the {n_inputs} {kind} file(s) could be read{written_too} '
                         f'(see the warnings above)')
    logger.info('predicted %d box(es) on %d file(s) at conf >= %g; results in %s', result['boxes'],
                len(result['images']), result['conf_threshold'], result['output'])
