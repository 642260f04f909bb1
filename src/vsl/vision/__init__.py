"""Bottom-up-attention region features in pure PyTorch: the BUTD Faster R-CNN of SCAN's image features.

The Visual Genome ResNet-101 C4 Faster R-CNN (Anderson et al., 2018) whose 36 x 2,048 region
features every SCAN-family model reads, written for ``vsl`` (no compiled extension, no detectron2):
it loads the public PyTorch conversion of the Caffe weights (the ``unc-nlp/frcnn-vg-finetuned``
state dict of the ``transformers`` LXMERT demo) and keeps the boxes as ``tools/generate_tsv.py``::

    det = load_detector("frcnn-vg-finetuned.bin", device="cpu")
    regions = det.extract([rgb_uint8_image], selection=BoxSelection.parse("36"))

Modules: :mod:`.spec` (every architectural number and its source), :mod:`.preprocess`,
:mod:`.resnet`, :mod:`.rpn`, :mod:`.ops` (NMS, RoI pooling), :mod:`.head`, :mod:`.selection`,
:mod:`.weights`, :mod:`.detector`.
"""
from .detector import Detection, Detector, Regions, expected_layout, load_detector
from .head import class_probabilities
from .ops import box_iou, nms, nms_per_class, roi_pool, roi_pool_tables
from .preprocess import image_scale, preprocess, scaled_size
from .selection import BoxSelection, max_confidence, select, select_regions
from .weights import DetectorError

__all__ = [
    "load_detector", "Detector", "Detection", "Regions", "BoxSelection", "DetectorError", "expected_layout",
    "preprocess", "image_scale", "scaled_size", "box_iou", "nms", "nms_per_class", "roi_pool", "roi_pool_tables",
    "class_probabilities", "max_confidence", "select", "select_regions",
]
