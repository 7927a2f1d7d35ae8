"""Predictions on local video files, written the way the platform would store them.

Per video: ``<name>.json`` (a Dataloop item JSON whose ``annotations`` are the tracks `predict_items`
uploads: one box annotation per tracked object, a snapshot per predicted frame) and ``<name>.png``
(a contact sheet: up to `SHEET_FRAMES` predicted frames, evenly spaced, with their boxes, track ids,
labels and scores, each tile captioned with its frame number).
"""
import logging
import mimetypes
import os
from typing import Any, Dict, List, Sequence, Tuple

from local_runner.draw import draw_detections, text_font
from utils.core.atomic import write_json
from utils.core.label_map import label_to_id
from utils.data.video import VideoDecodeError, read_frames
from utils.inference import video as video_inference
from utils.platform.video_annotations import tracks_to_json

logger = logging.getLogger(__name__)

SHEET_FRAMES = 8
SHEET_COLUMNS = 4
TILE_WIDTH = 320


def _item_json(path: str, rel: str, found: video_inference.VideoDetections, annotations: List[Dict]) -> Dict:
    info = found.entry.info
    return {'filename': '/' + rel.replace(os.sep, '/'), 'name': os.path.basename(rel),
            'metadata': {'system': {'width': info.width, 'height': info.height,
                                    'mimetype': mimetypes.guess_type(path)[0] or 'video/unknown',
                                    'ffmpeg': {'nb_frames': info.frame_count, 'avg_frame_rate': f'{info.fps}/1',
                                               'width': info.width, 'height': info.height}},
                         'fps': info.fps},
            'annotations': annotations}


def _sheet_frames(found: video_inference.VideoDetections) -> List[int]:
    """Up to SHEET_FRAMES of the predicted frame numbers (0, k, 2k, ...), evenly spaced, first and last included."""
    count = found.frames_predicted
    shown = min(SHEET_FRAMES, count)
    picks = sorted({round(i * (count - 1) / max(shown - 1, 1)) for i in range(shown)})
    return [pick * found.stride for pick in picks]


def contact_sheet(found: video_inference.VideoDetections, labels: Dict[int, str]):
    """A PIL image: the sampled frames with each track's box there, tagged ``#<object id> <label> <score>``."""
    from PIL import Image, ImageDraw
    wanted = _sheet_frames(found)
    class_ids = label_to_id(labels)
    boxes: Dict[int, List[Dict[str, Any]]] = {frame: [] for frame in wanted}
    for track in found.tracks:
        label = labels.get(track.label_id, str(track.label_id))
        for frame, box in track.boxes:
            if frame in boxes:
                boxes[frame].append({'box': tuple(box[:4]), 'label': label, 'score': box[4],
                                     'tag': f'#{track.object_id} {label} {box[4]:.2f}'})
    tiles = []
    for frame, pixels in read_frames(found.entry.path, set(wanted).__contains__, last=wanted[-1]):
        tile = draw_detections(Image.fromarray(pixels), boxes[frame], class_ids)
        tile = tile.resize((TILE_WIDTH, max(1, round(tile.height * TILE_WIDTH / tile.width))))
        caption = ImageDraw.Draw(tile)
        caption.rectangle((0, tile.height - 20, 110, tile.height), fill=(0, 0, 0))
        caption.text((4, tile.height - 18), f'frame {frame}', fill=(255, 255, 0), font=text_font(14))
        tiles.append(tile)
    rows = -(-len(tiles) // SHEET_COLUMNS)
    height = max(tile.height for tile in tiles)
    sheet = Image.new('RGB', (TILE_WIDTH * min(SHEET_COLUMNS, len(tiles)), height * rows))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % SHEET_COLUMNS) * TILE_WIDTH, (index // SHEET_COLUMNS) * height))
    return sheet


def predict_videos(adapter, videos: Sequence[Tuple[Tuple[str, str], Tuple[str, str]]]
                   ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]], int]:
    """((path, rel), (json path, png path)) per video -> (written, unreadable (path, reason), boxes)."""
    labels = adapter.id_to_label_map()
    written, unreadable, n_boxes = [], [], 0
    for (path, rel), (json_path, png_path) in videos:
        adapter.unreadable_items = []
        try:
            entries = [video_inference.open_video(path, rel)]
        except VideoDecodeError as err:
            entries, adapter.unreadable_items = [], [err]
        found = video_inference.detect_videos(adapter, entries)
        if not found:
            reason = str(adapter.unreadable_items[0])
            logger.warning('cannot read video %s: %s: skipped', path, reason)
            unreadable.append((path, reason))
            continue
        result = found[0][1]
        annotations = tracks_to_json(result, labels, adapter.model_entity.name, adapter.model_entity.id)
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        write_json(json_path, _item_json(path, rel, result, annotations), indent=1)
        boxes = sum(len(track.boxes) for track in result.tracks)
        if result.frames_predicted:
            contact_sheet(result, labels).save(png_path, format='PNG')
        n_boxes += boxes
        written.append({'video': path, 'json': json_path, 'png': png_path, 'frames': result.frames_predicted,
                        'tracks': len(result.tracks), 'boxes': boxes})
    return written, unreadable, n_boxes
