# MMDeploy deploy config: an MMDetection instance segmenter (Mask R-CNN with a ResT backbone)
# to ONNX for ONNX Runtime, batch / height / width dynamic.
# Used by `rest-dense export-model` (rest_dense/deploy/model_onnx.py), which also applies the
# fixes MMDeploy 1.3.1 needs on torch 2.13 (rest_dense/deploy/mmdeploy_support.py).
#
# Inside the graph: backbone, FPN, RPN (decoding, NMS), RoIAlign, box head (decoding, per-class
# NMS) and mask head; outputs `dets` (x1, y1, x2, y2, score), `labels` and `masks` (the mask
# head's 28x28 probabilities of each detection's class).
# Outside: image loading, resize, normalisation, padding, and pasting the 28x28 masks into the
# original image (export_postprocess_mask=False: MMDeploy's End2EndModel does it in PyTorch).
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=16,  # RoiAlign with coordinate_transformation_mode (aligned RoIAlign)
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['dets', 'labels', 'masks'],
    input_shape=None,
    optimize=True,
    dynamic_axes=dict(
        input={0: 'batch', 2: 'height', 3: 'width'},
        dets={0: 'batch', 1: 'num_dets'},
        labels={0: 'batch', 1: 'num_dets'},
        masks={0: 'batch', 1: 'num_dets', 2: 'mask_height', 3: 'mask_width'}))
codebase_config = dict(
    type='mmdet',
    task='ObjectDetection',
    model_type='end2end',
    post_processing=dict(
        score_threshold=0.05,
        confidence_threshold=0.005,
        iou_threshold=0.5,
        max_output_boxes_per_class=200,
        pre_top_k=5000,
        keep_top_k=100,
        background_label_id=-1,
        export_postprocess_mask=False))
backend_config = dict(type='onnxruntime')
