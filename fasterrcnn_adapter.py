"""Dataloop model adapter for torchvision's Faster R-CNN.

Thin by design: it reads the model's configuration, builds the network
(`utils.modeling.model_factory`) and its checkpoint files (`utils.modeling.checkpoints`), and delegates
data reading (`utils.data.dataloop_reader`), training (`utils.training.trainer`, `utils.platform.training_run`)
and prediction (`utils.inference.item_reading`, `utils.inference.prediction`, `utils.inference.pipeline`).
Settings are read from `model_entity.configuration` as a plain dict, so reading never PATCHes the model, and
validated once per configuration into the `Settings` passed down (`utils.core.settings_cache`).
"""
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

import dtlpy as dl
import torch

from utils.core import config as config_lib
from utils.core import device as device_lib
from utils.core import termination
from utils.core.atomic import copy_file
from utils.core.frozen_heap import freeze_kept, frozen_heap
from utils.core.label_map import configuration_entries, label_to_id
from utils.core import runtime_setup
from utils.core.settings_cache import SettingsCache
from utils.data.images import ImageLimits, network_limits
from utils.export import cpu_graphs, int8_graphs
from utils.inference import cpu_runtime, cuda_graphs, int8_check, pipeline
from utils.inference import prediction
from utils.inference import video as video_inference
from utils.inference.item_reading import ItemReader
from utils.inference.prediction import UnreadableItem
from utils.modeling import checkpoints, model_factory, network_loading
from utils.platform import model_labels, sdk_keys, training_data, training_run
from utils.training.run_folder import RunFolder
from utils.platform.box_collection import boxes_to_collection
from utils.platform.video_annotations import batch_payloads, tracks_to_collection

logger = logging.getLogger(__name__)

INDEX_FILENAME = 'fasterrcnn_index.json'


class FasterRCNNAdapter(dl.BaseModelAdapter):
    """load / save / train / predict / convert_from_dtlpy for `fasterrcnn_*` variants."""

    def __init__(self, model_entity: Optional[dl.Model] = None):
        runtime_setup.configure()  # the SDK's bars as log lines, PIL's bomb limit: once per process
        self.device = torch.device('cpu')
        self.settings: config_lib.Settings = config_lib.DEFAULT_SETTINGS
        self._settings_cache = SettingsCache()  # validated once per configuration, not per call
        self.artifacts_path: Optional[str] = None
        self.best_checkpoint_path: Optional[str] = None  # set by train(): what save() ships
        self._training_failed = False  # train() raised: the SDK's save-on-failure uploads what is left
        self._upload_failed = False  # save_to_model's upload failed: the SDK's save-on-failure that follows skips it
        self.unreadable_items: List[UnreadableItem] = []
        self._items = ItemReader(self.image_limits)
        self._inference_networks = prediction.NetworkCache()
        self._cpu_runtime = cpu_runtime.CpuRuntime()  # compiled graphs for the CPU forward
        self._converted = (None, None)  # (data_path, export) of the last convert_from_dtlpy: what train() reads
        self._calibration_records: List[dict] = []  # the training images train() saw: save() calibrates int8 on them
        self._check_records: List[dict] = []  # and its validation images: save() measures int8's mAP on them
        super().__init__(model_entity)

    # ------------------------------------------------------------------ entity
    @property
    def model_entity(self):
        return dl.BaseModelAdapter.model_entity.fget(self)

    @model_entity.setter
    def model_entity(self, model_entity):
        sdk_keys.fill_sdk_keys(model_entity)
        dl.BaseModelAdapter.model_entity.fset(self, model_entity)

    def load_from_model(self, model_entity=None, local_path=None, overwrite=True, **kwargs):
        if model_entity is not None:
            sdk_keys.fill_sdk_keys(model_entity)
        return super().load_from_model(model_entity=model_entity, local_path=local_path, overwrite=overwrite, **kwargs)

    def _resolve_settings(self) -> config_lib.Settings:
        """The model's configuration as `Settings`: rebuilt only when the configuration changed."""
        self.settings = self._settings_cache.get(self.model_entity.configuration)
        return self.settings

    def id_to_label_map(self) -> Dict[int, str]:
        """The network's class ids (1..K; 0 is background) to label names (`utils.platform.model_labels`)."""
        return model_labels.id_to_label_map(self.model_entity)

    def _set_label_map(self, id_to_label_map: Dict[int, str]) -> None:
        self.model_entity.configuration.update(configuration_entries(id_to_label_map))

    # ------------------------------------------------------------- load / save
    def load(self, local_path, **kwargs):
        """Build the network; weights from the artifact, else COCO-pretrained, else random."""
        settings = self._resolve_settings()
        self.device = device_lib.resolve_device(settings['device'])  # first: a missing GPU fails before any work
        self.artifacts_path = local_path
        model = network_loading.load_network(settings, self.id_to_label_map(), local_path)
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
        if best and (settings['cpu_runtime'] != 'torch' or settings['cpu_precision'] == 'int8'):  # trained here: the
            # deploy's CPU graphs go up with the weights
            self._save_cpu_graph(target, local_path, settings)

    def _save_cpu_graph(self, weights_path: str, local_path: str, settings: config_lib.Settings) -> None:
        """Export the CPU runtime's graph of the saved weights into the artifacts: a deploy's first call then
        compiles it instead of exporting (tens of seconds on a 2-vCPU pod). A failure only costs that."""
        try:
            network = cpu_graphs.trained_network(self.model, weights_path)
            prediction.apply_settings(network, settings)
            folder = cpu_graphs.graph_folder(local_path, network)
            cpu_graphs.ensure_graph(network, cpu_graphs.DETECTOR, folder)
        except Exception as err:  # the deploy exports it itself
            logger.warning('the CPU runtime\'s graph was not saved with the weights (%s: %s): a CPU deploy '
                           'exports it on its first call', type(err).__name__, err)
            return
        if settings['cpu_precision'] == 'int8' and not self._training_failed:
            try:  # calibrated on the training images, on disk now
                made = int8_graphs.save_int8_graph(network, folder, self._calibration_records)
            except Exception as err:
                logger.warning('the int8 graph was not made (%s: %s): a deploy asking for int8 runs f32',
                               type(err).__name__, err)
                return
            if made:  # what int8 costs this model, on its validation images
                int8_check.save_check(network, folder, self._check_records, label_to_id(self.id_to_label_map()))

    def save_to_model(self, local_path=None, cleanup=False, replace=True, **kwargs):
        """The SDK's save + upload of all of `local_path`, minus what must not become an artifact (a finished run's
        last.pth, temporaries: `RunFolder.clean_for_upload`), with a deadline per upload; after a successful
        run, the weights must then be among the model's artifacts, else the execution fails saying where they
        are (`utils.platform.training_run.upload_run_folder`)."""
        if self._upload_failed:  # the SDK's save-on-failure right after that very error: the upload just failed
            self._upload_failed = False
            logger.info('not uploading %s again: the upload just failed', local_path)
            return None
        if local_path is not None and os.path.isdir(local_path):
            RunFolder(local_path).clean_for_upload()
        if local_path is None or not os.path.isdir(local_path) or not self.model_entity.project_id:
            return super().save_to_model(local_path=local_path, cleanup=cleanup, replace=replace, **kwargs)
        self.save(local_path, **kwargs)
        try:
            training_run.upload_run_folder(self.model_entity, self._resolve_settings(), local_path,
                                           weights_required=not self._training_failed)
        except Exception:
            self._upload_failed = True
            raise
        if cleanup:
            shutil.rmtree(local_path, ignore_errors=True)
        return None

    # ----------------------------------------------------------------- predict
    def image_limits(self):
        """The image sizes this network takes (`utils.data.images.ImageLimits`): the pixel limit, and its resize."""
        if self.model is None:  # not loaded yet: only the pixel limit is known
            return ImageLimits(self.settings['max_image_pixels'])
        return network_limits(self.model, self.settings['max_image_pixels'])

    def prepare_item_func(self, item: dl.Item):
        """Download and decode one item (`utils.inference.item_reading`); an unreadable one becomes an
        `UnreadableItem`, not an exception; a video is downloaded and opened, not decoded. Inside
        `predict_items` the item was usually downloaded already, while the previous batches ran."""
        return self._items.read(item)

    def _decode_item(self, item: dl.Item, downloaded=None):
        return self._items.decode(item, downloaded)

    @property
    def _prefetchers(self) -> List[prediction.Prefetcher]:
        """The downloads running ahead, one per predict_items call in flight."""
        return self._items.prefetchers

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
        prediction.apply_settings(network, settings)
        images, positions = self._readable(batch)
        rows = self._cpu_runtime.detection_rows(network, images, self.device, settings, self.artifacts_path) \
            if images else []
        for position, found in video_inference.detect_videos(self, batch):  # their frames through this method
            positions.append(position)
            rows.append(found)
        return positions, rows

    def _annotate(self, batch, detections: Tuple[List[int], List[list]]) -> List[dl.AnnotationCollection]:
        """`predict`'s second half: `_detect`'s rows as one AnnotationCollection per entry of `batch`."""
        positions, rows = detections
        labels = self.id_to_label_map()
        collections = [dl.AnnotationCollection() for _ in batch]
        model_name, model_id = self.model_entity.name, self.model_entity.id
        for position, image_rows in zip(positions, rows):
            if isinstance(image_rows, video_inference.VideoDetections):  # one annotation per track
                collections[position] = tracks_to_collection(image_rows, labels, model_name, model_id)
                continue
            collections[position] = boxes_to_collection(image_rows, labels, model_name, model_id)
        return collections

    def _upload_payloads(self, batch_items, detections: Tuple[List[int], List[list]]) -> List[List[dict]]:
        """predict_items' second half before the upload: per item, the JSON the SDK would upload for `_annotate`'s
        stamped collection, built in bulk (`utils.platform.annotation_json`: the same dicts, no objects between)."""
        positions, rows = detections
        return batch_payloads(batch_items, positions, rows, self.id_to_label_map(),  # videos: their tracks
                              self.model_entity.name, self.model_entity.id)

    def _readable(self, batch) -> Tuple[List[torch.Tensor], List[int]]:
        """The batch's decoded images and their positions; unreadable entries are kept for the run's error."""
        batch = [None if isinstance(entry, video_inference.VideoEntry) else entry for entry in batch]  # not images
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
        pass was slower (its threads need the GIL back between images; bench/RESULTS.md).
        """
        self.unreadable_items = []
        size = self._prediction_batch(batch_size)
        with self._items.prefetching(items, size), frozen_heap():
            result = pipeline.predict_items(self, items, size, **kwargs)
        self._raise_unreadable(len(items), 'got no annotations (the others were annotated)')
        return result

    def _prediction_batch(self, batch_size) -> int:
        """Images per forward pass: the call's `batch_size`, else the configuration's; 'auto' by device.

        The SDK itself passes the configuration's value (possibly 'auto') from predict_dataset / embed_dataset.
        """
        return config_lib.prediction_batch_size(batch_size or self._resolve_settings().batch_size, self.device)

    def _raise_unreadable(self, total: int, consequence: str) -> None:
        """One error at the end of a run naming every item that could not be decoded."""
        if self.unreadable_items:
            names = '; '.join(str(entry) for entry in self.unreadable_items)
            raise ValueError(f'{len(self.unreadable_items)} of {total} items could not be read as images or '
                             f'videos the network takes and {consequence}: {names}')

    # ------------------------------------------------------------------- embed
    def embed(self, batch, **kwargs):
        """One `embeddings_size` (256) L2-normalised image vector per input, None for an unreadable one.

        The vector is the network's own FPN features pooled (`utils.modeling.embeddings.fpn_embedding`),
        computed through the same preprocessing and precision as `predict`; the SDK skips None.
        A video's vector is the mean of its sampled frames' (`video_inference.embed_videos`).
        """
        with frozen_heap():
            settings = self._resolve_settings()
            network = self._inference_networks.get(self.model, self.device)
            cuda_graphs.use_graphs(network, settings['cuda_graphs'])

            def vectors_of(entries):
                images, positions = self._readable(entries)
                found = self._cpu_runtime.image_vectors(network, images, self.device, settings,
                                                        self.artifacts_path) if images else []
                return list(zip(positions, found))

            vectors: List[Optional[List[float]]] = [None] * len(batch)
            for position, vector in vectors_of(batch) + video_inference.embed_videos(
                    self, batch, lambda frames: [vector for _, vector in vectors_of(frames)]):
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
        with training_data.training_annotations(self.model_entity):
            return super().prepare_data(dataset, root_path=root_path, data_path=data_path,
                                        output_path=output_path, overwrite=overwrite, **kwargs)

    def convert_from_dtlpy(self, data_path, **kwargs):
        """Read every subset's item JSONs once into box records; write the index `train` reads."""
        from utils.data.data_index import save_index
        from utils.data.dataloop_reader import read_dataloop_export
        from utils.data.training_checks import check_training_data
        settings = self._resolve_settings()
        labels = model_labels.model_labels(self.model_entity) or None
        export = read_dataloop_export(data_path, labels=labels, include_background=settings['include_background'],
                                      limits=self.image_limits(),
                                      video_frame_stride=settings['video_train_frame_stride'])
        check_training_data(export, labels)
        id_to_label_map = model_labels.training_label_map(self.model_entity, export.labels_found)
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
        """Fine-tune on the converted data; checkpoints in `output_path/weights`, resumed when present.

        The platform's part (uploads during training, metrics, the termination check) comes as the trainer's
        hooks (`utils.platform.training_run`); SIGTERM on the main thread ends the run like an error, so the
        SDK's save-on-failure uploads the last finished epoch (`utils.core.termination`).
        """
        from utils.training import trainer
        settings = self._resolve_settings()
        export = self._training_export(data_path)
        self._calibration_records = export.subsets.get('train', [])
        self._check_records = export.subsets.get('validation', [])
        id_to_label_map = self.id_to_label_map()
        # a label map rewritten by convert_from_dtlpy needs a new predictor
        with network_loading.seeded_init(settings['seed']):
            model_factory.replace_box_predictor(self.model, model_factory.num_classes_for(id_to_label_map))
        folder = RunFolder(output_path)
        platform = training_run.PlatformTraining(self.model_entity, settings, self.artifacts_path)
        hooks = platform.hooks(folder, self.kill_event)
        # set before fitting: if the run fails, the SDK's save-on-failure ships the trainer's best epoch
        # as is, instead of save() overwriting it with the half-trained weights of the failed epoch
        self.best_checkpoint_path = folder.best_path
        self._training_failed, self._upload_failed = True, False
        with termination.sigterm_raises(lambda: termination.TrainingTerminated(
                f'SIGTERM (a preemption) stopped training: the last finished epoch is in {folder.weights_dir}, '
                f'saved as the run fails')):
            result = trainer.fit(
                self.model, export.subsets.get('train', []), export.subsets.get('validation', []),
                label_to_id=label_to_id(id_to_label_map),
                output_path=output_path, settings=settings, device=self.device,
                checkpoint_info=dict(variant=settings['model_variant'], id_to_label_map=id_to_label_map),
                on_epoch_end=kwargs.get('on_epoch_end_callback'), publish_metrics=platform.publish_metrics,
                hooks=hooks)
        # weights/last.pth stays, saying the run finished, until save_to_model ships the folder without it
        platform.finished()
        self._training_failed = False
        self.model.eval()
        return result

    def _training_export(self, data_path):
        """The records `convert_from_dtlpy` made: from this process when it converted `data_path`, else its index."""
        from utils.data.data_index import load_index
        index_path = os.path.join(data_path, INDEX_FILENAME)
        converted_path, export = self._converted
        if converted_path != os.path.realpath(data_path):  # else converted in this process: fresher than any index
            export = load_index(index_path) if os.path.isfile(index_path) else self.convert_from_dtlpy(data_path)
        return export
