"""CAM inference, threshold sweep, seeds and CRF pseudo-labels (see hsc_fast/eval/seeds.py).

    python launch/make_seeds.py --checkpoint runs/x --data data/VOC2012 --out runs/x/seeds
    torchrun --standalone --nproc_per_node 8 launch/make_seeds.py ...   (or: deepspeed launch/make_seeds.py ...)

Stages: cam (cam_npy/), sweep (sweep.json/.png + seeds/), crf (pseudo_labels/ + crf_eval.json), all.
Under a launcher (WORLD_SIZE > 1) the ranks join one process group (nccl on CUDA, gloo on CPU)
and split the ids; a rerun resumes where a previous one stopped.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsc_fast.cli.make_seeds import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
