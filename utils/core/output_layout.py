"""Names of the files a training run leaves in its output folder (`utils.training.trainer`, `utils.training.curves`).

Kept apart from the trainer so that code which only checks a folder (the local
runner, before any heavy import) uses the same names.
"""
WEIGHTS_DIR = 'weights'
LAST_NAME = 'last.pth'   # every checkpoint_interval_s and after the final epoch: everything to resume
BEST_NAME = 'best.pth'   # the best epoch's weights: what the model ships
CURVES_CSV = 'curves.csv'
CURVES_PNG = 'curves.png'
MODEL_FILE = 'model.json'  # the local runner's description of a trained model folder
SIDECAR_SUFFIX = '.json'  # an ONNX export's description: model.onnx -> model.onnx.json
