"""The CRF process pool (multi-process): equal to the serial result, with every start method."""
import numpy as np
import pytest

from crf.test_crf import _small_batch, real_images  # noqa: F401 - real_images is a fixture
from hsc_fast.crf import crf_batch


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_process_pool_equals_serial(real_images, start_method):
    images, probs = _small_batch(real_images)
    images, probs = images * 3, probs * 3          # 12 items: more than one window (8) of tasks
    serial = crf_batch(images, probs, workers=1)
    pooled = crf_batch(images, probs, workers=2, chunksize=1, start_method=start_method)
    assert len(pooled) == len(serial)
    assert all(np.array_equal(a, b) for a, b in zip(pooled, serial))
