"""Run the Faster R-CNN adapter on local folders, without the Dataloop platform.

    python -m local_runner train    --data DIR --output DIR [--config FILE.json] [--labels a,b,c]
    python -m local_runner predict  --model DIR --input FILE_OR_DIR --output DIR [--conf 0.5]
    python -m local_runner evaluate --model DIR --data DIR [--subset validation] [--output DIR]
    python -m local_runner export   --model DIR --output FILE.onnx [--size H W]
    python -m local_runner demo     [--output DIR] [--epochs N] [--n-train N] [--n-val N]

Every command drives the same `FasterRCNNAdapter` the platform runs, on a
`dl.Model` built offline from dataloop.json (`utils.platform.local_model.local_model`).

| module | concern |
| --- | --- |
| `cli` | parse the arguments, check paths, dispatch, print; errors in the input as one line, exit 2 |
| `inputs` | argument and path checks (no heavy imports, so a wrong path fails fast) |
| `model_folder` | a model folder: train one (`train_on_folder`), describe it (model.json), load it back |
| `predict` | predictions on image files: annotation JSON + pictures |
| `draw` | boxes, labels and scores drawn on an image; class colours |
| `report` | COCO evaluation of a model folder on a local subset: tables, JSON, PR curves |
| `demo` | synthetic data -> train -> evaluate -> predict, with its settings |
| `logs` | logging to stderr at the level the options ask for |
"""
