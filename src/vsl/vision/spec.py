"""Every architectural and test-time number of the bottom-up-attention (BUTD) Faster R-CNN, in one place.

The detector is the Visual Genome ResNet-101 C4 Faster R-CNN of Anderson et al. (2018),
"Bottom-Up and Top-Down Attention for Image Captioning and VQA". Its published definition is the
Caffe ``models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt`` with the test configuration
``experiments/cfgs/faster_rcnn_end2end_resnet.yml`` (and the defaults of ``lib/fast_rcnn/config.py``)
of ``peteanderson80/bottom-up-attention``; the boxes kept for SCAN's files follow its
``tools/generate_tsv.py``. ``vsl`` loads the public PyTorch conversion of those weights used by the
LXMERT demo of ``transformers`` (``examples/research_projects/lxmert/modeling_frcnn.py`` with the
``unc-nlp/frcnn-vg-finetuned`` configuration), so the names below follow that port's state dict.
Each constant says where it comes from; nothing else in :mod:`vsl.vision` hard-codes one of them.
"""
from __future__ import annotations

import math

# ------------------------------------------------------------------------------------------------
# Preprocessing (fast_rcnn.test._get_blobs / lib/fast_rcnn/config.py)
# ------------------------------------------------------------------------------------------------
#: cfg.PIXEL_MEANS, BGR order (the ImageNet means of the Caffe ResNet models).
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
#: cfg.TEST.SCALES = (600,): the shorter side of the network input.
TEST_SCALE = 600
#: cfg.TEST.MAX_SIZE = 1000: the longer side at most.
TEST_MAX_SIZE = 1000

# ------------------------------------------------------------------------------------------------
# Backbone (test.prototxt: ResNet-101, "stride in the 1x1 convolutions" as the MSRA models;
# the port's cfg RESNETS.STRIDE_IN_1X1 = True, MODEL.MAX_POOL = True, RESNETS.NORM = "BN")
# ------------------------------------------------------------------------------------------------
#: Bottleneck blocks of res2, res3, res4 (ResNet-101) and of the res5 head.
BLOCKS_PER_STAGE = {"res2": 3, "res3": 4, "res4": 23, "res5": 3}
#: Stride of the first block of each stage (res5: 1 in the VG model, the port's "RES5HALVE = False").
FIRST_STRIDE = {"res2": 1, "res3": 2, "res4": 2, "res5": 1}
#: Dilation (= padding) of every 3x3 convolution of each stage (res5: 2 in the VG model).
DILATION = {"res2": 1, "res3": 1, "res4": 1, "res5": 2}
#: Stem: 7x7 convolution, stride 2, padding 3; then Caffe's 3x3 / 2 max pool with ceil rounding, no padding.
STEM_KERNEL, STEM_STRIDE, STEM_PADDING = 7, 2, 3
STEM_POOL_KERNEL, STEM_POOL_STRIDE = 3, 2
#: The eps of the port's ``torch.nn.BatchNorm2d`` (its default), applied with the stored statistics.
BATCH_NORM_EPS = 1e-5
#: Output channels per stage in units of the stem width (64 in the real model: 256, 512, 1024, 2048),
#: bottleneck channels = output / 4 (ResNet's expansion).
STAGE_OUT_PER_WIDTH = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
BOTTLENECK_EXPANSION = 4
#: Stride of res4, the feature map of the RPN and of RoI pooling.
FEATURE_STRIDE = 16

# ------------------------------------------------------------------------------------------------
# Region proposal network (test.prototxt rpn layers; the port's cfg ANCHOR_GENERATOR / RPN /
# PROPOSAL_GENERATOR; lib/fast_rcnn/config.py TEST.RPN_*)
# ------------------------------------------------------------------------------------------------
#: Hidden channels of the RPN's 3x3 convolution per stem width (512 in the real model: "rpn_conv/3x3").
RPN_HIDDEN_PER_WIDTH = 8
#: Anchor sizes (pixels, the side of the square anchor) and aspect ratios h/w; size outer, ratio inner.
ANCHOR_SIZES = (64, 128, 256, 512)
ANCHOR_ASPECT_RATIOS = (0.5, 1.0, 2.0)
NUM_ANCHORS = len(ANCHOR_SIZES) * len(ANCHOR_ASPECT_RATIOS)
#: Anchor centres at (x, y) * stride + offset * stride (the port's ANCHOR_GENERATOR.OFFSET = 0).
ANCHOR_OFFSET = 0.0
#: RPN box-regression weights (the port's RPN.BBOX_REG_WEIGHTS = (1, 1, 1, 1)).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
#: Clamp of dw, dh before exp (detectron2's Box2BoxTransform default: a 16 px box to 1000 px).
BOX_SCALE_CLAMP = math.log(1000.0 / 16)
#: TEST.RPN_PRE_NMS_TOP_N, TEST.RPN_NMS_THRESH, TEST.RPN_POST_NMS_TOP_N, TEST.RPN_MIN_SIZE.
RPN_PRE_NMS_TOP_N = 6000
RPN_NMS_THRESH = 0.7
RPN_POST_NMS_TOP_N = 300
#: Proposals whose width or height is not above this (input pixels, after clipping) are dropped.
RPN_MIN_SIZE = 16

# ------------------------------------------------------------------------------------------------
# RoI head (test.prototxt "roi_pool5" and res5; the port's ROI_BOX_HEAD / ROI_HEADS)
# ------------------------------------------------------------------------------------------------
#: ROIPooling pooled_w = pooled_h = 14, spatial_scale = 1/16 (max pooling, not RoIAlign).
POOLED_SIZE = 14
POOL_SCALE = 1.0 / FEATURE_STRIDE
#: 1,600 Visual Genome object classes + background (index 0), 400 attributes + "no attribute".
NUM_OBJECT_CLASSES = 1600
NUM_ATTRIBUTE_CLASSES = 400
#: Per-class box-regression weights of the Fast R-CNN head (the port's ROI_BOX_HEAD.BBOX_REG_WEIGHTS).
HEAD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
#: The attribute branch: class embedding of res5-out / 8 dims, hidden layer of res5-out / 4.
ATTR_EMBED_DIVISOR = 8
ATTR_HIDDEN_DIVISOR = 4

# ------------------------------------------------------------------------------------------------
# Box selection for the region features (tools/generate_tsv.py; TEST.NMS of config.py)
# ------------------------------------------------------------------------------------------------
#: cfg.TEST.NMS = 0.3: the per-class NMS over the proposal boxes.
SELECTION_NMS_THRESH = 0.3
#: generate_tsv.py get_detections_from_im(conf_thresh=0.4, min_boxes=36, max_boxes=36).
SELECTION_CONF_THRESH = 0.4
SELECTION_MIN_BOXES = 36
SELECTION_MAX_BOXES = 36
