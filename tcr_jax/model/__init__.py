"""The paper's layers, objectives and evaluation, assembled from the codec
core (tcr_jax/codec), the ported heads (tcr_jax/tasks) and the data:

  models            DepthBase, Enhancement, ImageCodec
  models_detection  DetectionBase
  canvas            the detector's normalised, padded input
  objectives        L_b and L_e, the paper's equations in one place
  evaluate          the jitted evaluation and its metrics (Evaluator)
  coco_eval         COCO mAP with pycocotools
"""
