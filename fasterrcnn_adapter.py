"""Dataloop model adapter for torchvision's Faster R-CNN.

Thin by design: it reads the model's configuration, builds the network
(`utils.modeling.model_factory`) and its checkpoint files (`utils.modeling.checkpoints`), and delegates
data reading (`utils.data.dataloop_reader`), training (`utils.training.trainer`, `utils.platform.artifact_sync`)
and prediction (`utils.inference.prediction`, `utils.inference.pipeline`). Settings are read from
`model_entity.configuration` as a plain dict, so reading never PATCHes the model.
"""
import contextlib
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

import dtlpy as dl
from dtlpy.ml import base_model_adapter as _sdk_adapter
import torch

from utils.core import config as config_lib
from utils.core import device as device_lib
from utils.core.atomic import copy_file, remove_stale_temporaries
from utils.core.errors import InputError
from utils.core.frozen_heap import freeze_kept, frozen_heap
from utils.core.label_map import configuration_entries, label_to_id, parse_id_to_label
from utils.core.metric_names import EVAL_KEYS, LEGENDS, LOSS_KEYS
from utils.core.output_layout import BEST_NAME, LAST_NAME, WEIGHTS_DIR
from utils.core.progress import route_sdk_bars
from utils.data.images import ImageDecodeError, ImageLimits, ImageSizeError, load_image_tensor, network_limits
from utils.inference import cuda_graphs, pipeline
from utils.inference import prediction
from utils.inference.prediction import UnreadableItem
from utils.modeling import checkpoints, model_factory
from utils.platform import annotation_json, artifact_sync

logger = logging.getLogger('fasterrcnn.adapter')

INDEX_FILENAME = 'fasterrcnn_index.json'
ANNOTATION_TYPES_FOR_TRAINING = ['box', 'segment', 'binary', 'ellipse']
CHECKPOINT_NAMES = (BEST_NAME, LAST_NAME)  # the resume checkpoint last: it names the best epoch
RPN_TEST_KEYS = ('rpn_pre_nms_top_n_test', 'rpn_post_nms_top_n_test')


# embed_items (and the SDK's own predict_items loop) draw a tqdm bar the SDK offers no switch for:
# bounded log lines instead
route_sdk_bars(_sdk_adapter)


def _fill_sdk_keys(model_entity: dl.Model) -> None:
    """Put the SDK's adapter keys in the configuration up front: a missing one makes the SDK PATCH the model."""
    configuration = model_entity.configuration
    for key, value in config_lib.SDK_KEYS.items():
        configuration.setdefault(key, value)
    configuration.setdefault('batch_size', config_lib.DEFAULTS['batch_size'])
    configuration.setdefault('include_background', config_lib.DEFAULTS['include_background'])
    # read with .get('embeddings_size', 256) by embed_items and the feature set's creation
    configuration.setdefault('embeddings_size', config_lib.DEFAULTS['embeddings_size'])
    # read with .get(key, default) by the SDK's predict_dataset / evaluate_model: missing, each is a PATCH
    configuration.setdefault('predict_embed_subset_limit', _sdk_adapter.PREDICT_EMBED_DEFAULT_SUBSET_LIMIT)
    configuration.setdefault('predict_embed_timeout', _sdk_adapter.PREDICT_EMBED_DEFAULT_TIMEOUT)


@contextlib.contextmanager
def _seeded_init(seed: int):
    """Random initialisation drawn from `seed` (same seed, same starting network), leaving the caller's RNG as it was.

    Networks are built on the CPU, so forking the CPU generator covers every init.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FasterRCNNAdapter(dl.BaseModelAdapter):
    """load / save / train / predict / convert_from_dtlpy for `fasterrcnn_*` variants."""

    def __init__(self, model_entity: Optional[dl.Model] = None):
        self.device = torch.device('cpu')
        self.settings: Dict[str, Any] = dict(config_lib.DEFAULTS)
        self.artifacts_path: Optional[str] = None
        self.best_checkpoint_path: Optional[str] = None  # set by train(): what save() ships
        self.unreadable_items: List[UnreadableItem] = []
        self._prefetchers: List[prediction.Prefetcher] = []  # one per predict_items call in flight
        self._decode_slots = threading.BoundedSemaphore(prediction.DECODE_THREADS)
        self._inference_networks = prediction.NetworkCache()
        self._converted = (None, None)  # (data_path, export) of the last convert_from_dtlpy: what train() reads
        super().__init__(model_entity)

    # ------------------------------------------------------------------ entity
    @property
    def model_entity(self):
        return dl.BaseModelAdapter.model_entity.fget(self)

    @model_entity.setter
    def model_entity(self, model_entity):
        _fill_sdk_keys(model_entity)
        dl.BaseModelAdapter.model_entity.fset(self, model_entity)

    def load_from_model(self, model_entity=None, local_path=None, overwrite=True, **kwargs):
        if model_entity is not None:
            _fill_sdk_keys(model_entity)
        return super().load_from_model(model_entity=model_entity, local_path=local_path, overwrite=overwrite, **kwargs)

    def _resolve_settings(self) -> Dict[str, Any]:
        self.settings = config_lib.resolve(self.model_entity.configuration)
        return self.settings

    def id_to_label_map(self) -> Dict[int, str]:
        """The network's class ids (1..K; 0 is background) to label names."""
        configuration = self.model_entity.configuration
        stored = configuration.get('id_to_label_map')
        if stored:
            mapping = parse_id_to_label(stored)
        else:
            mapping = {i + 1: str(label) for i, label in enumerate(self.model_entity.labels or [])}
        if 0 in mapping:
            logger.warning('id_to_label_map uses id 0, which is the background class: shifting every id by one')
            mapping = {k + 1: v for k, v in mapping.items()}
        return mapping

    def _set_label_map(self, id_to_label_map: Dict[int, str]) -> None:
        self.model_entity.configuration.update(configuration_entries(id_to_label_map))

    # ------------------------------------------------------------- load / save
    def load(self, local_path, **kwargs):
        """Build the network; weights from the artifact, else COCO-pretrained, else random."""
        settings = self._resolve_settings()
        self.device = device_lib.resolve_device(settings['device'])  # first: a missing GPU fails before any work
        variant = settings['model_variant']
        id_to_label_map = self.id_to_label_map()
        num_classes = model_factory.num_classes_for(id_to_label_map)
        sizes = dict(min_size=settings['min_size'], max_size=settings['max_size'],
                     rpn_post_nms_top_n_train=settings['rpn_post_nms_top_n_train'],
                     box_batch_size_per_image=settings['box_batch_size_per_image'],
                     padding_bucket=settings['padding_bucket'],
                     **{key: settings[key] for key in RPN_TEST_KEYS if settings[key] is not None})
        self.artifacts_path = local_path
        weights_path = os.path.join(local_path or '', settings['weights_filename'])
        if local_path and os.path.isfile(weights_path):
            checkpoint = checkpoints.load_checkpoint(weights_path)
            checkpoints.check_compatible(checkpoint, weights_path, variant, num_classes)
            saved_labels = parse_id_to_label(checkpoint.get('id_to_label_map'))
            if saved_labels and saved_labels != id_to_label_map:
                logger.warning('the label map saved with %s differs from the model\'s; using the model\'s: %s',
                               weights_path, id_to_label_map)
            model = model_factory.build_model(variant, num_classes, **sizes)
            checkpoints.load_state(model, checkpoint, weights_path)
            logger.info('loaded %s weights from %s', variant, weights_path)
        elif settings['pretrained']:
            keep_head = id_to_label_map == model_factory.coco_id_to_label_map()
            with _seeded_init(settings['seed']):  # the new box predictor's random start
                model = model_factory.build_model(variant, num_classes, coco_weights=True, keep_coco_head=keep_head,
                                                  **sizes)
            logger.info('loaded COCO-pretrained %s (%s)', variant,
                        'COCO head kept' if keep_head else f'new box predictor for {num_classes} classes')
        else:
            logger.warning('no weights at %s and pretrained is off: %s starts from random weights',
                           weights_path, variant)
            with _seeded_init(settings['seed']):
                model = model_factory.build_model(variant, num_classes, **sizes)
        self.model = model.to(self.device).eval()

    def save(self, local_path, **kwargs):
        """Write one self-describing checkpoint at `weights_filename`: the best epoch when training produced one."""
        settings = self._resolve_settings()
        target = os.path.join(local_path, settings['weights_filename'])
        best = self.best_checkpoint_path
        if best and os.path.isfile(best):
            if os.path.abspath(best) != os.path.abspath(target):
                copy_file(best, target)
        else:
            payload = checkpoints.make_checkpoint(self.model, settings['model_variant'], self.id_to_label_map())
            checkpoints.save_checkpoint(payload, target)
        self.model_entity.configuration['weights_filename'] = settings['weights_filename']
        logger.info('saved weights to %s', target)

    def save_to_model(self, local_path=None, cleanup=False, replace=True, **kwargs):
        """The SDK's save + upload of all of `local_path`, minus what must not become an artifact: a
        finished run's weights/last.pth (nothing is left to resume: ship the best weights, not the last
        epoch's optimizer state) and the temporaries of interrupted writes. A failed run's last.pth is
        shipped: the retry resumes from it."""
        if local_path is not None and os.path.isdir(local_path):
            from utils.training import trainer
            trainer.discard_finished_state(local_path)
            remove_stale_temporaries(local_path, recursive=True)
        return super().save_to_model(local_path=local_path, cleanup=cleanup, replace=replace, **kwargs)

    # ----------------------------------------------------------------- predict
    def image_limits(self):
        """The image sizes this network takes (`utils.data.images.ImageLimits`): the pixel limit, and its resize."""
        if self.model is None:  # not loaded yet: only the pixel limit is known
            return ImageLimits(self.settings['max_image_pixels'])
        return network_limits(self.model, self.settings['max_image_pixels'])

    def prepare_item_func(self, item: dl.Item):
        """Download and decode one item; an unreadable one becomes an `UnreadableItem`, not an exception.

        Inside `predict_items` the item was usually downloaded already, while the previous batches ran.
        """
        for prefetcher in list(self._prefetchers):
            downloaded = prefetcher.take(item)
            if downloaded is not prediction.Prefetcher.MISSING:
                return self._decode_item(item, downloaded)
        return self._decode_item(item)

    @staticmethod
    def _download(item: dl.Item):
        """The item's bytes in memory, or the exception that stopped the download (`_decode_item` reports it)."""
        try:
            return item.download(save_locally=False)
        except Exception as err:  # reported per item by _decode_item, never failing the batch
            return err

    def _decode_item(self, item: dl.Item, downloaded=None):
        """`downloaded`: what `_download` gave (downloaded here when None)."""
        name = getattr(item, 'filename', None) or getattr(item, 'name', '?')
        try:
            buffer = self._download(item) if downloaded is None else downloaded
            if isinstance(buffer, Exception):
                raise buffer
            with self._decode_slots:  # few at a time: each takes the GIL back from the thread driving the GPU
                return load_image_tensor(buffer, self.image_limits())
        except ImageSizeError as err:
            reason = str(err)
        except ImageDecodeError as err:
            reason = f'{err} (mimetype {getattr(item, "mimetype", None)})'
        except Exception as err:  # download failures, odd item types: report, never fail the batch
            reason = f'{type(err).__name__}: {err}'
        logger.error('cannot read item %s (id %s) as an image: %s', name, item.id, reason)
        return UnreadableItem(item.id, name, reason)

    def predict(self, batch, **kwargs):
        """One forward pass over the whole batch; one AnnotationCollection of boxes per input.

        Under `frozen_heap`: the garbage collector walks only this batch's objects, not the process's heap.
        """
        with frozen_heap():
            collections = self._annotate(batch, self._detect(batch))
            freeze_kept()  # the caller keeps them
            return collections

    def _detect(self, batch, **kwargs) -> Tuple[List[int], List[list]]:
        """`predict`'s forward pass: the positions of the readable entries and, per image, its rows."""
        settings = self._resolve_settings()
        network = self._inference_networks.get(self.model, self.device)
        cuda_graphs.use_graphs(network, settings['cuda_graphs'])  # only the CUDA copy takes them
        prediction.set_postprocess(network, settings['conf_threshold'], settings['nms_iou_threshold'],
                                  settings['max_detections'], [settings[key] for key in RPN_TEST_KEYS])
        images, positions = self._readable(batch)
        rows = prediction.detection_rows(network, images, self.device, settings['cudnn_benchmark']) if images else []
        return positions, rows

    def _annotate(self, batch, detections: Tuple[List[int], List[list]]) -> List[dl.AnnotationCollection]:
        """`predict`'s second half: `_detect`'s rows as one AnnotationCollection per entry of `batch`."""
        positions, rows = detections
        labels = self.id_to_label_map()
        collections = [dl.AnnotationCollection() for _ in batch]
        model_name, model_id = self.model_entity.name, self.model_entity.id
        for position, image_rows in zip(positions, rows):
            collections[position] = prediction.boxes_to_collection(image_rows, labels, model_name, model_id)
        return collections

    def _upload_payloads(self, batch_items, detections: Tuple[List[int], List[list]]) -> List[List[dict]]:
        """predict_items' second half before the upload: per item, the JSON the SDK would upload for `_annotate`'s
        stamped collection, built in bulk (`utils.platform.annotation_json`: the same dicts, no objects between)."""
        positions, rows = detections
        return annotation_json.batch_box_annotations(batch_items, positions, rows, self.id_to_label_map(),
                                                     self.model_entity.name, self.model_entity.id)

    def _readable(self, batch) -> Tuple[List[torch.Tensor], List[int]]:
        """The batch's decoded images and their positions; unreadable entries are kept for the run's error."""
        images, positions, unreadable = prediction.split_readable(batch, self.image_limits())
        self.unreadable_items.extend(unreadable)
        return images, positions

    @dl.Package.decorators.function(display_name='Predict Items',
                                    inputs={'items': 'Item[]'},
                                    outputs={'items': 'Item[]', 'annotations': 'Annotation[]'})
    def predict_items(self, items: list, batch_size=None, **kwargs):
        """The SDK's predict_items as a pipeline (`utils.inference.pipeline`: batch k's annotations are built and
        uploaded while the network runs batch k+1), downloading two batches ahead; then one error naming every
        item that could not be read.

        Downloads wait on the network, not on Python, so they overlap the forward pass freely. Decoding
        stays in the loop, between forward passes: on an H100, decoding the next batch beside the forward
        pass was slower in two sessions (its threads need the GIL back between images; bench/RESULTS.md).
        """
        self.unreadable_items = []
        size = self._prediction_batch(batch_size)
        # two batches ahead: the next one is ready when the GPU finishes this one, and one more is on its way
        prefetcher = prediction.Prefetcher(self._download, items, lookahead=2 * size,
                                          workers=prediction.DOWNLOAD_THREADS)
        self._prefetchers.append(prefetcher)
        try:
            with frozen_heap():
                result = pipeline.predict_items(self, items, size, **kwargs)
        finally:
            self._prefetchers.remove(prefetcher)
            prefetcher.close()
        self._raise_unreadable(len(items), 'got no annotations (the others were annotated)')
        return result

    def _prediction_batch(self, batch_size) -> int:
        """Images per forward pass: the call's `batch_size`, else the configuration's; 'auto' by device.

        The SDK itself passes the configuration's value (possibly 'auto') from predict_dataset / embed_dataset.
        """
        value = batch_size or self.model_entity.configuration.get('batch_size') or config_lib.DEFAULTS['batch_size']
        return config_lib.prediction_batch_size(value, self.device)

    def _raise_unreadable(self, total: int, consequence: str) -> None:
        """One error at the end of a run naming every item that could not be decoded."""
        if self.unreadable_items:
            names = '; '.join(str(entry) for entry in self.unreadable_items)
            raise ValueError(f'{len(self.unreadable_items)} of {total} items could not be read as images '
                             f'the network takes and {consequence}: {names}')

    # ------------------------------------------------------------------- embed
    def embed(self, batch, **kwargs):
        """One `embeddings_size` (256) L2-normalised image vector per input, None for an unreadable one.

        The vector is the network's own FPN features pooled (`utils.modeling.embeddings.fpn_embedding`),
        computed through the same preprocessing and precision as `predict`; the SDK skips None.
        """
        with frozen_heap():
            images, positions = self._readable(batch)
            vectors: List[Optional[List[float]]] = [None] * len(batch)
            if images:
                network = self._inference_networks.get(self.model, self.device)
                cuda_graphs.use_graphs(network, self.settings['cuda_graphs'])
                found = prediction.image_vectors(network, images, self.device, self.settings['cudnn_benchmark'])
                for position, vector in zip(positions, found):
                    vectors[position] = vector
            freeze_kept()
            return vectors

    @dl.Package.decorators.function(display_name='Embed Items',
                                    inputs={'items': 'Item[]'},
                                    outputs={'items': 'Item[]', 'features': 'Json[]'})
    def embed_items(self, items: list, upload_features=None, batch_size=None, progress=None, **kwargs):
        """The SDK's embed_items (vectors to the model's feature set), then one error naming every unreadable item."""
        self.unreadable_items = []
        with frozen_heap():
            result = super().embed_items(items, upload_features=upload_features,
                                         batch_size=self._prediction_batch(batch_size), progress=progress, **kwargs)
        self._raise_unreadable(len(items), 'got no feature vector (the others were embedded)')
        return result

    # ---------------------------------------------------------------- training
    def prepare_data(self, dataset, root_path=None, data_path=None, output_path=None, overwrite=False, **kwargs):
        """The SDK's download, asking for every annotation type we turn into boxes (it would fetch boxes only)."""
        system = self.model_entity.metadata.setdefault('system', {})
        original = system.get('annotationsSubsets')
        subsets = system.get('subsets') or {}
        wanted = dl.Filters(resource=dl.FiltersResource.ANNOTATION, use_defaults=False)
        wanted.add(field='type', values=ANNOTATION_TYPES_FOR_TRAINING, operator=dl.FiltersOperations.IN)
        wanted.add(field='metadata.system.model.name', values=False, operator=dl.FiltersOperations.EXISTS)
        system['annotationsSubsets'] = {**{name: wanted.prepare() for name in subsets}, **(original or {})}
        try:
            return super().prepare_data(dataset, root_path=root_path, data_path=data_path,
                                        output_path=output_path, overwrite=overwrite, **kwargs)
        finally:
            if original is None:
                system.pop('annotationsSubsets', None)
            else:
                system['annotationsSubsets'] = original

    def _training_label_map(self, labels_found: List[str]) -> Dict[int, str]:
        """Keep the stored map when it covers exactly the model's labels, else ids 1..K in label order."""
        labels = [str(label) for label in (self.model_entity.labels or [])] or sorted(labels_found)
        stored = self.id_to_label_map()
        if stored and set(stored.values()) == set(labels):
            return stored
        return {i + 1: label for i, label in enumerate(labels)}

    def convert_from_dtlpy(self, data_path, **kwargs):
        """Read every subset's item JSONs once into box records; write the index `train` reads."""
        from utils.data.dataloop_reader import read_dataloop_export, require_training_subsets, save_index
        settings = self._resolve_settings()
        labels = [str(label) for label in (self.model_entity.labels or [])] or None
        export = read_dataloop_export(data_path, labels=labels, include_background=settings['include_background'],
                                      limits=self.image_limits())
        if labels and not set(labels) & set(export.labels_found):
            raise InputError(f'none of the labels in the data {export.labels_found} is one of the model\'s labels '
                             f'{labels}: set the model\'s labels to the dataset\'s (model.labels = [...]; '
                             f'model.update()) or clone the model with labels=')
        require_training_subsets(export)
        id_to_label_map = self._training_label_map(export.labels_found)
        if id_to_label_map != self.id_to_label_map():
            self._set_label_map(id_to_label_map)
            # persist now: a failed run uploads its checkpoint, and the retry must rebuild this many classes
            self.model_entity.update(reload_services=False)
        self._converted = (os.path.realpath(data_path), export)
        index_path = os.path.join(data_path, INDEX_FILENAME)
        try:
            save_index(export, index_path)
        except OSError as err:  # a read-only data folder (a mounted volume, shared data): the index is a cache
            logger.info('data index not written (%s: %s): training reads the data converted in memory',
                        index_path, err.strerror or err)
        return export

    def train(self, data_path, output_path, **kwargs):
        """Fine-tune on the converted data; checkpoints in `output_path/weights`, resumed when present."""
        from utils.training import trainer
        from utils.data.dataloop_reader import load_index
        settings = self._resolve_settings()
        index_path = os.path.join(data_path, INDEX_FILENAME)
        converted_path, export = self._converted
        if converted_path != os.path.realpath(data_path):  # else converted in this process: fresher than any index
            export = load_index(index_path) if os.path.isfile(index_path) else self.convert_from_dtlpy(data_path)
        id_to_label_map = self.id_to_label_map()
        with _seeded_init(settings['seed']):  # a label map rewritten by convert_from_dtlpy needs a new predictor
            model_factory.replace_box_predictor(self.model, model_factory.num_classes_for(id_to_label_map))
        resumed = self._resume_from_artifacts(output_path)
        # set before fitting: if the run fails, the SDK's save-on-failure ships the trainer's best epoch
        # as is, instead of save() overwriting it with the half-trained weights of the failed epoch
        self.best_checkpoint_path = os.path.join(output_path, WEIGHTS_DIR, BEST_NAME)
        uploader = self._checkpoint_uploader(output_path, settings, resumed)
        callback = kwargs.get('on_epoch_end_callback')

        def on_epoch_end(epoch: int, epochs: int) -> None:
            if uploader is not None and epoch + 1 < epochs:  # the last epoch's files go up with save_to_model
                uploader.epoch_end(epoch)
            if callback is not None:
                callback(epoch, epochs)

        if uploader is not None:  # an upload needs files that were written since the last one
            settings = {**settings, 'checkpoint_interval_s': min(settings['checkpoint_interval_s'],
                                                                 settings['checkpoint_upload_interval_s'])}
        try:
            result = trainer.fit(
                self.model, export.subsets.get('train', []), export.subsets.get('validation', []),
                label_to_id=label_to_id(id_to_label_map),
                output_path=output_path, settings=settings, device=self.device,
                checkpoint_info=dict(variant=settings['model_variant'], id_to_label_map=id_to_label_map),
                on_epoch_end=on_epoch_end, publish_metrics=self._publish_metrics)
        finally:
            if uploader is not None:
                uploader.close()  # nothing may land after the SDK's own upload or the delete below
        # weights/last.pth stays, saying the run finished, until save_to_model ships the folder without it
        self._drop_uploaded_last_checkpoint(uploader is not None and LAST_NAME in uploader.uploaded_names)
        self.model.eval()
        return result

    def _checkpoint_uploader(self, output_path: str, settings: Dict[str, Any],
                             resumed: bool) -> Optional[artifact_sync.CheckpointUploader]:
        """Uploads last.pth / best.pth during training, so a pod reset resumes from them; None off the platform."""
        if not self.model_entity.project_id:  # a local model (local_runner, tests): no artifacts to upload to
            return None

        def upload(folder: str) -> None:
            if self.model_entity.artifacts.upload(filepath=os.path.join(folder, '*'), overwrite=True) is None:
                raise RuntimeError('the SDK reported the upload as failed (its warning says why)')

        return artifact_sync.CheckpointUploader(
            upload, os.path.join(output_path, WEIGHTS_DIR), WEIGHTS_DIR,
            names=CHECKPOINT_NAMES,
            interval_s=settings['checkpoint_upload_interval_s'],
            staging_parent=os.path.dirname(os.path.abspath(output_path)),
            already_uploaded=CHECKPOINT_NAMES if resumed else ())

    def _resume_from_artifacts(self, output_path: str) -> bool:
        """A retried run on a fresh pod finds its checkpoints among the model's artifacts; True when it copied them."""
        if not self.artifacts_path:
            return False
        return artifact_sync.restore_checkpoints(os.path.join(self.artifacts_path, WEIGHTS_DIR),
                                                 os.path.join(output_path, WEIGHTS_DIR),
                                                 names=CHECKPOINT_NAMES)

    def _drop_uploaded_last_checkpoint(self, uploaded_by_this_run: bool) -> None:
        """After a finished run, delete the last.pth this run or a failed one uploaded (the SDK's upload never
        deletes): left among the artifacts, the next train_model (or a clone's) would resume from it."""
        if not uploaded_by_this_run and not (self.artifacts_path and os.path.isfile(
                os.path.join(self.artifacts_path, WEIGHTS_DIR, LAST_NAME))):
            return  # the model has no uploaded last.pth
        remote = f'/artifacts/models/{self.model_entity.name}/{WEIGHTS_DIR}/{LAST_NAME}'
        try:
            self.model_entity.artifacts.items_repository.delete(filters=dl.Filters(field='filename', values=remote))
            logger.info('deleted the resume checkpoint %s from the model\'s artifacts: the run is complete', remote)
        except Exception as err:
            logger.warning('could not delete %s from the model\'s artifacts (%s: %s): a later training run '
                           'would resume from it', remote, type(err).__name__, err)

    def _publish_metrics(self, epoch: int, metrics: Dict[str, float]) -> None:
        """One call per epoch: loss components on one figure, validation mAP / AR on another."""
        if not self.model_entity.project_id:  # a local model (local_runner, benches): no platform to plot them
            return
        x = epoch + 1
        samples = [dl.PlotSample(figure='training loss', legend=key, x=x, y=float(metrics[key]))
                   for key in LOSS_KEYS if key in metrics]
        samples += [dl.PlotSample(figure='validation', legend=LEGENDS[key], x=x, y=float(metrics[key]))
                    for key in EVAL_KEYS if key in metrics]
        self.model_entity.metrics.create(samples=samples, dataset_id=self.model_entity.dataset_id)
