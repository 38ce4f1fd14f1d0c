"""hsc-fast: Hierarchical Semantic Contrast (Wu et al., IJCAI 2023) as a distributed training system."""
__version__ = "0.1.0"

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
NUM_FG = 20          # foreground classes
NUM_CLASSES = 21     # with background
BG_INDEX = 20        # background is the LAST channel in CAM tensors (EPS convention)
IGNORE_INDEX = 255   # VOC boundary / ignore label
