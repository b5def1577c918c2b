"""COCO RLE (rest_dense.data.rle): the one mask encoding of the toy dataset and of
``rest-dense infer``, checked against pycocotools both ways."""
import numpy as np
import pytest

from rest_dense.data.rle import coco_rle_to_mask, mask_to_coco_rle


def _cases():
    rng = np.random.default_rng(0)
    cases = [rng.random((13, 17)) > 0.5, np.zeros((5, 4), bool), np.ones((5, 4), bool),
             rng.random((1, 9)) > 0.3, rng.random((40, 1)) > 0.7]
    edge = np.zeros((6, 7), bool)
    edge[0, 0] = edge[-1, -1] = True
    cases.append(edge)
    big = np.zeros((300, 200), bool)  # long runs: multi-character counts, negative deltas
    big[20:280, 50:60] = big[100:110, :] = True
    cases.append(big)
    cases += [rng.random((h, w)) < p for h, w, p in ((31, 29, 0.05), (64, 48, 0.95), (7, 300, 0.5))]
    return cases


@pytest.mark.parametrize("index", range(len(_cases())))
def test_coco_rle_equals_pycocotools_both_ways(index):
    from pycocotools import mask as mask_util

    mask = _cases()[index]
    rle = mask_to_coco_rle(mask)
    ref = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle == {"size": [int(s) for s in ref["size"]], "counts": ref["counts"].decode("ascii")}
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)  # JSON-ready
    np.testing.assert_array_equal(coco_rle_to_mask(rle), mask)
    np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), mask)  # str counts
    np.testing.assert_array_equal(coco_rle_to_mask(ref), mask)  # bytes counts
    assert mask_util.area(rle) == mask.sum()


def test_uncompressed_rle_is_read_too():
    """Toy datasets of format version 2 hold uncompressed RLE (a list of run lengths)."""
    from pycocotools import mask as mask_util

    for mask in _cases():
        flat = mask.ravel(order="F").astype(np.int8)
        change = np.flatnonzero(np.diff(flat)) + 1
        counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
        counts = ([0] if flat[0] else []) + counts
        rle = {"size": list(mask.shape), "counts": counts}
        np.testing.assert_array_equal(coco_rle_to_mask(rle), mask)
        compressed = mask_util.frPyObjects(rle, *mask.shape)
        assert compressed["counts"].decode("ascii") == mask_to_coco_rle(mask)["counts"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_to_coco_rle(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="cover 5 pixels, not 2x3"):
        coco_rle_to_mask({"size": [2, 3], "counts": [2, 3]})
