"""`predict_items` as a two-stage pipeline: the network runs batch k+1 while batch k's annotations are
built, stamped and uploaded.

The SDK's loop (dtlpy `BaseModelAdapter.predict_items`) does each batch's steps one after the other:
decode, forward pass, then a `dl.Annotation` per box, model metadata on each, and the upload,
before the next batch reaches the GPU. Building annotations is pure Python (about 5 us a box on
this project's 2-core machine, 20 on the H100 machine's host: 31 ms for 16 images of 100 boxes) and
the upload waits on the platform, so the GPU sat idle for both. Here the caller's thread decodes and
runs the network (`adapter._detect`) and one finishing thread, in batch order, turns the rows into
the JSON the SDK would upload for its stamped annotations (`adapter._upload_payloads`: built in bulk,
no `dl.Annotation` between, `utils.platform.annotation_json`) and uploads it (the SDK's
`_upload_model_annotations`, 16 items at once; what comes back are the SDK's objects, as in its
loop). Batch k is handed to the finishing thread once batch k+1 is decoded, so that it runs beside
batch k+1's forward pass and not beside its decoding: the decoding threads need Python's GIL between
their steps, and with the finishing thread's pure Python beside them each waited out a switch
interval (5 ms) at every step (bench/RESULTS.md).
Decoding batch k+1 in the pool while the network runs batch k was slower on an H100
(bench/RESULTS.md): decoding stays between forward passes.
What comes back, and the errors, are the SDK loop's: `(items, annotations)` in input order; a
batch whose forward pass or upload fails is reported with its item ids at the end, after every
other batch ran.

On an H100 it ran ahead of the SDK's loop, more so when uploads take time (bench/RESULTS.md).
"""
import logging
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, List, Optional, Sequence, Tuple

import dtlpy as dl

from utils.core.frozen_heap import freeze_kept
from utils.core.progress import Progress

logger = logging.getLogger(__name__)

#: items decoded, stamped or uploaded at once (the SDK loop's pool)
POOL_THREADS = 16


def predict_items(adapter, items: Sequence[Any], batch_size: int, **kwargs) -> Tuple[list, List[dl.Annotation]]:
    """The SDK's predict_items for `adapter` (a dl.BaseModelAdapter with `_detect` and `_upload_payloads`),
    pipelined."""
    with ThreadPoolExecutor(POOL_THREADS, thread_name_prefix='predict') as pool, _Finisher(adapter, pool) as finisher:
        for start in Progress(range(0, len(items), batch_size), desc='predicting', unit='batch', log=logger,
                              summary=True):
            batch_items = list(items[start:start + batch_size])
            batch = list(pool.map(adapter.prepare_item_func, batch_items))
            finisher.hand_over()  # the batch before: beside this one's forward pass, not beside its decoding
            try:
                finisher.forwarded(batch_items, adapter._detect(batch, **kwargs))
            except Exception as err:  # the SDK's rule: report the batch, go on with the next
                finisher.failed(batch_items, f'Failed to predict batch {start}', err)
    if finisher.errors:
        raise Exception(f'Failed to predict all items. Failed IDs: {finisher.failed_ids}.\nErrors:\n'
                        + '\n'.join(finisher.errors))
    return items, finisher.annotations


class _Finisher:
    """Each batch's second half, in batch order on a thread of its own: the annotations' JSON (model metadata
    in), the upload. One batch in flight: annotations never pile up behind a slow upload."""

    def __init__(self, adapter, pool: ThreadPoolExecutor):
        self._adapter, self._pool = adapter, pool
        self._thread = ThreadPoolExecutor(1, thread_name_prefix='annotate')
        self._running: Optional[Future] = None
        self._waiting: Optional[tuple] = None  # (items, detections) through the network, not handed over
        self.annotations: List[dl.Annotation] = []
        self.errors: List[str] = []
        self.failed_ids: List[str] = []

    def __enter__(self) -> '_Finisher':
        return self

    def __exit__(self, error_type, *_) -> None:
        try:
            if error_type is None:
                self.hand_over()
            if self._running is not None:
                self._running.result()
        finally:
            self._thread.shutdown(wait=True)

    def forwarded(self, batch_items: list, detections) -> None:
        self._waiting = batch_items, detections

    def hand_over(self) -> None:
        """Start the waiting batch's second half once the batch before it is done."""
        if self._waiting is None:
            return
        if self._running is not None:
            self._running.result()
        self._running, self._waiting = self._thread.submit(self._finish, *self._waiting), None

    def _finish(self, batch_items: list, detections) -> None:
        adapter = self._adapter
        try:  # pure Python: one thread, not the pool's 16
            payloads = adapter._upload_payloads(batch_items, detections)
        except Exception as err:  # part of predicting, for the SDK: the batch is reported, the others go on
            self.failed(batch_items, 'Failed to predict batch', err)
            return
        try:
            collections = list(self._pool.map(adapter._upload_model_annotations, batch_items, payloads))
        except Exception as err:  # the call raises at its end, as the SDK's loop does: nothing of it is returned
            self.failed(batch_items, 'Failed to upload annotations', err)
            return
        for collection in collections:
            self.annotations.extend(collection.annotations if isinstance(collection, dl.AnnotationCollection)
                                    else collection)
        freeze_kept()  # kept to the end of the call: the garbage collector stops walking them (utils.core.frozen_heap)

    def failed(self, batch_items: list, what: str, err: Exception) -> None:
        ids = [item.id for item in batch_items]
        message = f'{what} for items {ids}. Error: {err}\n{traceback.format_exc()}'
        logger.error(message)
        self.errors.append(message)
        self.failed_ids.extend(ids)
