"""Names of the training losses and validation metrics, and how people read them.

The keys are what `engine.train_one_epoch` / `engine.evaluate` return, what the
trainer's history and curves.csv hold, and what the platform's metrics get;
the legends are the labels of plots and tables.
"""
LOSS_KEYS = ('loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg')
EVAL_KEYS = ('mAP', 'mAP_50', 'mAP_75', 'AR_100')

LEGENDS = {
    'loss': 'total', 'loss_classifier': 'classifier', 'loss_box_reg': 'box regression',
    'loss_objectness': 'RPN objectness', 'loss_rpn_box_reg': 'RPN box regression',
    'mAP': 'mAP@[.5:.95]', 'mAP_50': 'mAP@.5', 'mAP_75': 'mAP@.75', 'AR_100': 'AR@100',
}
