#!/usr/bin/env python
"""Train / evaluate detectron2 models with detectron2's usual command line
(``--config-file``, ``--eval-only``, ``--resume``, ``--num-gpus``, trailing overrides).
``rest-dense train CONFIG`` / ``rest-dense test CONFIG CHECKPOINT`` do the same with the
command line shared with the MMDetection / MMSegmentation configs.

    python tools/train_net.py --num-gpus 8 --config-file configs/detectron2/mask_rcnn_restv2_tiny_3x.yaml
    python tools/train_net.py --eval-only --config-file CONFIG MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file configs/detectron2/toy/mask_rcnn_restv2_toy.yaml \\
        --cpu-threads 1 MODEL.DEVICE cpu
"""
import sys

from rest_dense.d2.launch import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
