"""A training session: process group, DeepSpeed settings, pre-flight checks, the checkpoint to
resume and the run log, around any StepLoop (CAM training: ``train``; DeepLab uses it too)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from typing import Optional
import os

from hsc_fast import checkpoint as ckpt
from hsc_fast import distributed as D
from hsc_fast.config import RunConfig
from hsc_fast.engine.cam_trainer import Trainer, check_geometry, check_inputs, check_resume_world_size
from hsc_fast.engine.deepspeed import build_ds_config
from hsc_fast.engine.loop import StepLoop
from hsc_fast.engine.runlog import RunLog, environment_info


# ----------------------------------------------------------------------------------------------
# One training run's process-group session (CAM training and DeepLab)
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainingSession:
    """What `training_session` made: process group, DeepSpeed settings, checkpoint to resume, log."""
    cfg: RunConfig
    info: D.DistInfo
    ds_config: dict
    resume_from: Optional[Path]
    log: RunLog
    stage: str
    max_steps: int
    heartbeat: Optional[D.Heartbeat] = None

    def run(self, make_trainer: Callable[["TrainingSession"], StepLoop], save_every: int) -> dict:
        """Start the heartbeat, make the trainer, fit, and leave together. Returns the summary."""
        self.heartbeat = D.Heartbeat(self.info.rank, self.info.world_size, self.cfg.train.dist_timeout_s,
                                     namespace=D.stage_namespace(self.stage)).start()
        trainer = make_trainer(self)
        summary = trainer.fit(self.max_steps, save_every, self.resume_from, self.heartbeat)
        self.log.info("finished: %s", summary)
        # Stop watching before the last barrier: rank 0 (often the store's host) may exit first.
        self.heartbeat.stop(finished=True)
        D.barrier()
        return summary


@contextmanager
def training_session(cfg: RunConfig, run_dir: Path, *, stage: str, resume: str, max_steps: int,
                     ds_config: Callable[[int], dict], local_rank: Optional[int] = None, progress: bool = True,
                     env: Optional[dict] = None, title: str = ""):
    """Join or make the process group; DeepSpeed settings (`ds_config(world_size)`); the run dir
    (made by rank 0, then by everyone: nodes without a shared filesystem); the checkpoint to
    resume; the RunLog with config.yaml and env.json (+ `env`). Yields a TrainingSession; on the
    way out logs a failure, stops the heartbeat, closes the log and leaves the group.
    `title` prefixes the log lines ("DeepLab ")."""
    info = D.init_distributed(cfg.train.dist_timeout_s, local_rank_arg=local_rank)
    log = session = None
    try:
        ds_cfg = ds_config(info.world_size)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = ckpt.resolve_resume(resume, run_dir)
        start_step = ckpt.step_of(resume_from) if resume_from is not None else 0
        log = RunLog(run_dir, info.rank, info.world_size, max_steps, start_step=start_step,
                     tensorboard=cfg.train.tensorboard, progress=progress)
        log.write_config(cfg)
        env_info = environment_info(info.world_size, info.device, info.launched_by)
        env_info["deepspeed_config"] = ds_cfg
        env_info.update(env or {})
        log.write_env(env_info)
        log.info("%srank %d/%d on %s (%s, launched by %s)", title, info.rank, info.world_size, info.device,
                 info.backend, info.launched_by)
        session = TrainingSession(cfg, info, ds_cfg, resume_from, log, stage, max_steps)
        yield session
    except Exception as e:
        if log is not None:
            log.error("%straining failed: %s: %s", title, type(e).__name__, e)
        raise
    finally:
        if session is not None and session.heartbeat is not None:
            session.heartbeat.stop(finished=False)
        if log is not None:
            log.close()
        D.shutdown(info)


def train(cfg: RunConfig, run_dir, resume: str = "", ds_config_path: Optional[str] = None,
          local_rank: Optional[int] = None, progress: bool = True) -> dict:
    """Set up the process group, run the whole training, tear down. Returns a summary dict."""
    check_geometry(cfg)
    check_inputs(cfg)
    run_dir = Path(run_dir)
    # Before any work: the launcher's WORLD_SIZE (plain python: 1) against the checkpoint's.
    check_resume_world_size(ckpt.resolve_resume(resume, run_dir), int(os.environ.get("WORLD_SIZE", "1")))
    with training_session(cfg, run_dir, stage="train_cam", resume=resume, max_steps=cfg.train.max_steps,
                          ds_config=lambda world: build_ds_config(cfg, world, ds_config_path),
                          local_rank=local_rank, progress=progress) as session:
        return session.run(lambda s: Trainer(cfg, run_dir, s.info, s.ds_config, s.log), cfg.train.save_every)
