# MMDeploy deploy config: an MMSegmentation EncoderDecoder (UperNet with a ResT backbone) to
# ONNX for ONNX Runtime, batch / height / width dynamic ("whole" inference mode).
# Used by `rest-dense export-model` (rest_dense/deploy/model_onnx.py), which also applies the
# fixes MMDeploy 1.3.1 needs on torch 2.13 (rest_dense/deploy/mmdeploy_support.py), among them
# an exact, dynamic-shape rewrite of UperNet's adaptive average pooling.
#
# Inside the graph: backbone, decode head and the resize of the logits to the input size;
# output `output`, the (N, num_classes, H, W) logits of the padded input (with_argmax=False, so
# that the padding can be cropped and the logits resized before the argmax, as MMSegmentation's
# own `postprocess_result` does; rest-dense runs exactly that on the ONNX Runtime output).
# Outside: image loading, resize, normalisation, padding; cropping, resizing to the original
# image and the argmax.
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=16,
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['output'],
    input_shape=None,
    optimize=True,
    dynamic_axes=dict(
        input={0: 'batch', 2: 'height', 3: 'width'},
        output={0: 'batch', 2: 'height', 3: 'width'}))
codebase_config = dict(type='mmseg', task='Segmentation', with_argmax=False)
backend_config = dict(type='onnxruntime')
