"""Classification stage: is a boxed cell cancer, and which kind (SCC, AC, SCLC, NSCLC, multi-label)?

Modules: ``crops`` (box → square crop with context; jitter; negative boxes), ``dataset`` (training
batches with class balance, negatives and albumentations), ``model`` (mindcv EfficientNet with a
sigmoid or softmax head), ``train`` (the task for the shared train loop), ``classifier`` (checkpoint
metadata, ``Classifier``), ``model_io`` (``load_classifier``), ``export`` (ONNX), ``predict``
(``classify_boxes``), ``attribution`` (Grad-CAM), ``metrics``.
Nothing heavy is imported here: MindSpore loads only when a network is built.
"""
