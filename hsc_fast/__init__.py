"""hsc-fast: Hierarchical Semantic Contrast (Wu et al., IJCAI 2023) as a distributed training system."""
__version__ = "0.1.0"

# The class count is the dataset's: hsc_fast.classes (ClassSet, VOC, COCO, synthetic(K)).
