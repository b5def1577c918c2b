# MMDeploy deploy config: an MMDetection box detector (e.g. RetinaNet with a ResT backbone)
# to ONNX for ONNX Runtime, batch / height / width dynamic.
# Used by `rest-dense export-model` (rest_dense/deploy/model_onnx.py), which also applies the
# fixes MMDeploy 1.3.1 needs on torch 2.13 (rest_dense/deploy/mmdeploy_support.py); with
# MMDeploy's own tools, run them from Python after `import rest_dense.mm` inside
# `rest_dense.deploy.mmdeploy_compat()`.
#
# Inside the graph: backbone, neck, head, box decoding and NMS (ONNX NonMaxSuppression).
# Outside: image loading, resize, normalisation and padding (the config's test pipeline and
# data preprocessor), and rescaling the boxes to the original image.
# The model's test_cfg (score_thr, nms.iou_threshold, max_per_img) takes precedence over the
# post_processing defaults below.
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=16,  # RoiAlign with coordinate_transformation_mode (aligned RoIAlign)
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['dets', 'labels'],
    input_shape=None,
    optimize=True,
    dynamic_axes=dict(
        input={0: 'batch', 2: 'height', 3: 'width'},
        dets={0: 'batch', 1: 'num_dets'},
        labels={0: 'batch', 1: 'num_dets'}))
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
        background_label_id=-1))
backend_config = dict(type='onnxruntime')
