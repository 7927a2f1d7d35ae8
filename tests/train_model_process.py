"""Run the SDK's `train_model` for one model against an emulator, in a process of its own (a training pod).

    DATALOOP_PATH=... python tests/train_model_process.py API_URL MODEL_ID

The working directory is the pod's (train_model writes under ./tmp/<model id>).
Tests start it with `subprocess` to kill it for real, the way a pod reset or a
preemption ends a run: no exception, no `finally`, no save-on-failure.
"""
import logging
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]


def main(api_url: str, model_id: str) -> None:
    if 'DATALOOP_PATH' not in os.environ:
        raise SystemExit('set DATALOOP_PATH to the pod\'s folder: the SDK downloads the model\'s artifacts there')
    import dtlpy as dl
    import dtlpy.repositories.datasets as dl_datasets

    import sdk_frames
    import sdk_uploads
    from dataloop_emulator import NoExportWaitTime, connect_sdk
    from fasterrcnn_adapter import FasterRCNNAdapter

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(asctime)s %(name)s %(message)s')
    dl_datasets.time = NoExportWaitTime()
    sdk_frames.install()
    sdk_uploads.install()
    connect_sdk(api_url)
    FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))


if __name__ == '__main__':
    main(*sys.argv[1:])
