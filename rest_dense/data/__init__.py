"""Data helpers of the package: the synthetic toy-shapes dataset (:mod:`.toy`) and COCO
run-length masks (:mod:`.rle`)."""
