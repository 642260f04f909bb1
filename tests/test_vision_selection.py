"""The generate_tsv.py box selection of vsl.vision: per-class NMS confidences, fixed and adaptive counts."""
import numpy as np
import pytest
import torch

from vsl.errors import ConfigError
from vsl.vision import BoxSelection, max_confidence, select_regions


def reference_max_conf(boxes, probs, threshold=0.3):
    """generate_tsv.py's loop: one NMS per class >= 1, the kept boxes' confidences raised."""
    from test_vision_ops import reference_nms

    conf = np.zeros(len(boxes))
    for c in range(1, probs.shape[1]):
        keep = np.array(reference_nms(boxes, probs[:, c], threshold))
        conf[keep] = np.where(probs[keep, c].numpy() > conf[keep], probs[keep, c].numpy(), conf[keep])
    return conf


def test_parse():
    assert BoxSelection.parse("36") == BoxSelection(36, 36, 0.4)
    assert BoxSelection.parse("10:100") == BoxSelection(10, 100, 0.4)
    assert BoxSelection.parse("36").fixed and not BoxSelection.parse("10:100").fixed
    assert str(BoxSelection.parse("10:100")) == "10:100"
    for bad in ("", "a", "1:2:3", "100:10", "0"):
        with pytest.raises(ConfigError):
            BoxSelection.parse(bad)


def test_max_confidence_equals_the_per_class_loop():
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(80, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(80, 2, generator=gen) * 60 + 1], 1)
    probs = torch.softmax(torch.randn(80, 12, generator=gen) * 3, dim=1)
    got = max_confidence(boxes, probs).numpy()
    assert np.allclose(got, reference_max_conf(boxes, probs), atol=0, rtol=0)
    assert (got > 0).any()


def test_exactly_the_right_number_of_confident_boxes_stay_in_proposal_order():
    conf = torch.zeros(300)
    confident = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:36]
    conf[confident] = torch.linspace(0.9, 0.41, 36)
    keep = select_regions(conf, BoxSelection.parse("36"))
    assert keep.tolist() == sorted(confident.tolist())


def test_otherwise_the_most_confident_in_descending_order_ties_by_lower_index():
    conf = torch.tensor([0.1, 0.3, 0.3, 0.05, 0.2, 0.9, 0.3])
    assert select_regions(conf, BoxSelection(3, 3)).tolist() == [5, 1, 2]      # 1 confident < 3
    conf = torch.tensor([0.5, 0.45, 0.6, 0.7, 0.41, 0.2])
    assert select_regions(conf, BoxSelection(2, 3)).tolist() == [3, 2, 0]      # 5 confident > 3
    assert select_regions(conf, BoxSelection(2, 6)).tolist() == [0, 1, 2, 3, 4]  # 2 <= 5 <= 6
    assert select_regions(conf, BoxSelection(10, 10)).tolist() == [3, 2, 0, 1, 4, 5]  # fewer proposals than 10
