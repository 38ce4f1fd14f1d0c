"""Training and orchestration: the CAM and DeepLab trainers, DeepSpeed set-up, SynthNet pre-training, the pipeline of stages, the ablation, run logs."""
