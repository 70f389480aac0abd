"""Task heads ported from torchvision, and their losses and metrics.

  LRASPPMobileNetV3   the depth head (1 output, disparity in pixels)
  DeepLabV3ResNet50   the segmentation head with the FCN aux head
  FasterRCNN          the detection head (fasterrcnn_resnet50_fpn_v2), with
                      trainable_mask (what torchvision freezes) and the
                      operators in detection_ops (nms, roi_align, ...)
  MobileNetV3Large, ResNet50   their (dilated) backbones

All modules are NHWC, take normalised images (FasterRCNN normalises
itself unless normalize=False), and have params and
batch_stats collections; `load_torchvision` brings torchvision weights in.
Torch is never imported here (only to read .pth files, lazily).
"""
from tcr_jax.tasks.checkpoint_io import (import_to_checkpoint, load_checkpoint,
                                        read_state_dict)
from tcr_jax.tasks.deeplabv3 import DeepLabV3ResNet50
from tcr_jax.tasks.faster_rcnn import FasterRCNN, trainable_mask
from tcr_jax.tasks.losses import (confusion_matrix, cross_entropy, depth_loss,
                                  miou, segmentation_loss)
from tcr_jax.tasks.lraspp import LRASPPMobileNetV3
from tcr_jax.tasks.mobilenetv3 import MobileNetV3Large
from tcr_jax.tasks.resnet import ResNet50
from tcr_jax.tasks.torchvision_import import (ARCHS, backbone_to_segmentation_variables,
                                              convert_state_dict, count_params,
                                              export_state_dict,
                                              init_variables, load_torchvision,
                                              load_torchvision_report)

__all__ = [
    "ARCHS", "DeepLabV3ResNet50", "FasterRCNN", "LRASPPMobileNetV3", "MobileNetV3Large",
    "ResNet50", "backbone_to_segmentation_variables", "confusion_matrix",
    "convert_state_dict", "count_params", "export_state_dict", "cross_entropy", "depth_loss",
    "import_to_checkpoint", "init_variables", "load_checkpoint", "load_torchvision",
    "load_torchvision_report", "miou", "read_state_dict", "segmentation_loss",
    "trainable_mask",
]
