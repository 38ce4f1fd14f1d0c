"""Config presets, CLI -> config mapping, DeepSpeed JSON handling and the geometry checks."""
import json

import pytest

from hsc_fast.config import PRESET_DIR, load_config
from hsc_fast.engine.deepspeed import build_ds_config, optimizer_is_partitioned
from hsc_fast.engine.cam_trainer import check_geometry, feature_size
from hsc_fast.cli.train_cam import build_arg_parser, config_from_args, main
from hsc_fast.errors import ConfigError

PRESETS = ["hsc_eps_official", "hsc_seam", "hsc_paper", "seam", "eps", "ppc_seam", "demo"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_has_consistent_geometry(name):
    cfg = load_config(name)
    assert cfg.preset == name
    check_geometry(cfg)
    if cfg.loss.contrast_size:
        assert cfg.loss.contrast_size == feature_size(cfg.data.view2_size)


def test_official_and_paper_presets_carry_their_recipes():
    off, paper = load_config("hsc_eps_official"), load_config("hsc_paper")
    assert (off.loss.method, off.loss.rsc_normalize, off.loss.csc_topk, off.loss.psc_topk) == ("hsc_eps", "width", 128, 16)
    assert off.optim.official_momentum_quirk and off.optim.poly_steps == 13215 and off.train.max_steps == 20000
    assert (paper.loss.rsc_normalize, paper.loss.csc_topk, paper.loss.psc_topk, paper.loss.psc_momentum) == ("channel", 16, 32, 0.9)
    # the paper's equations; contrast down-sampled to 16x16 as its Sec. 3.4 says (README "Two formulations")
    assert (off.loss.formulation, paper.loss.formulation) == ("code", "paper")
    assert paper.loss.contrast_size == 16 and paper.model.rsc_proj == "paper"
    assert not paper.optim.official_momentum_quirk and paper.optim.poly_steps == paper.train.max_steps
    assert load_config("hsc_seam").loss.method == "hsc_seam"
    demo = load_config("demo")
    assert demo.model.backbone == "resnet18" and demo.data.crop_size <= 128
    # the demo starts from SynthNet (stage pretrain), never silently from random init
    assert demo.pretrain.enabled and demo.model.weights == "" and not demo.model.allow_random_init
    assert demo.model.frozen_bn and demo.deeplab.frozen_bn and not demo.deeplab.allow_random_init


def test_unknown_key_and_wrong_type_fail_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(PRESET_DIR / "demo.yaml") + "\nloss:\n  tua: 0.2\n")
    with pytest.raises(ConfigError, match="loss.tua"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config("demo", ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config("demo", ["train.nope=1"])


def _args(*argv):
    return build_arg_parser().parse_args(list(argv))


def test_cli_flags_map_to_config_and_win_over_set():
    cfg = config_from_args(_args("--config", "demo", "--run-dir", "x", "--data", "/d/index.json",
                                 "--max-steps", "7", "--save-every", "3", "--seed", "5", "--deterministic",
                                 "--set", "train.max_steps=99", "--set", "loss.tau=0.25",
                                 "--deepspeed_config", "configs/ds_zero1.json", "--local_rank", "0"))
    assert cfg.data.train == "/d/index.json"
    assert cfg.train.max_steps == 7  # the dedicated flag is applied after --set
    assert (cfg.train.save_every, cfg.train.seed, cfg.train.deterministic) == (3, 5, True)
    assert cfg.loss.tau == 0.25 and cfg.train.ds_config == "configs/ds_zero1.json"


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--run-dir", "--data", "--max-steps", "--save-every", "--resume", "--seed",
                 "--deterministic", "--set", "--deepspeed_config", "--local_rank"):
        assert flag in text


def test_bad_config_exits_2_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", "demo", "--run-dir", str(run), "--set", "loss.methd=seam"]) == 2
    assert "loss.methd" in capsys.readouterr().err
    assert not run.exists()  # nothing was created


def test_geometry_mismatch_is_a_config_error():
    cfg = load_config("demo", ["data.view2_size=32"])  # 4x4 features, contrast_size 8
    with pytest.raises(ConfigError, match="loss.contrast_size"):
        check_geometry(cfg)
    cfg = load_config("demo", ["loss.csc_topk=1000"])
    with pytest.raises(ConfigError, match="loss.csc_topk"):
        check_geometry(cfg)


@pytest.mark.parametrize("name", ["ds_zero0", "ds_zero1", "ds_zero2", "ds_bf16"])
def test_shipped_deepspeed_jsons_get_batch_sizes_from_our_config(name):
    cfg = load_config("demo", [f"train.ds_config=configs/{name}.json", "data.batch_size=3"])
    ds = build_ds_config(cfg, world_size=4)
    gas = ds["gradient_accumulation_steps"]
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["train_batch_size"] == 3 * gas * 4
    assert ds["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in ds and "scheduler" not in ds
    assert optimizer_is_partitioned(ds) == (name != "ds_zero0")


def test_deepspeed_json_must_not_hold_batch_or_optimizer(tmp_path):
    for key, value in (("train_batch_size", 8), ("optimizer", {"type": "Adam"}), ("fp16", {"enabled": True})):
        p = tmp_path / f"{key}.json"
        p.write_text(json.dumps({key: value}))
        cfg = load_config("demo", [f"train.ds_config={p}"])
        with pytest.raises(ConfigError, match=key if key != "fp16" else "fp16"):
            build_ds_config(cfg, 1)
    p = tmp_path / "gas.json"
    p.write_text(json.dumps({"gradient_accumulation_steps": 0}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config(load_config("demo", [f"train.ds_config={p}"]), 1)
