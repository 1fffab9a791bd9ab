"""Per-class AP at IoU 0.5 (pycocotools), re-exported from :mod:`cytocore.coco_ap` where it lives
so the segmentation stage's ``seg ceiling`` reports it with the keys of ``cytofuse evaluate``."""
from cytocore.coco_ap import IOU, ap50_per_class  # noqa: F401
