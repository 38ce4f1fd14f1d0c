"""Inference and evaluation: multi-scale CAMs, seeds and CRF pseudo-labels, mIoU, reports and pictures."""
