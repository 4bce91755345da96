import pytest

from ple_fast.config import Config, ConfigError, build_config, load_yaml, save_yaml


def test_defaults_match_the_paper():
    cfg = Config()
    assert cfg.ple.tau0 == 0.2 and cfg.ple.alpha == 0.9
    assert cfg.ple.rank_loss == "hinge" and cfg.ple.weighting == "softmax"
    assert cfg.reward.normalize == "none"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ple:\n  iterations: 3\n  tau0: 0.5\nrollout:\n  temperature: 0.7\n")
    cfg = build_config(str(path), ["ple.iterations=7", "ple.length_normalize=false", "data.max_queries=null"])
    assert cfg.ple.iterations == 7 and cfg.ple.tau0 == 0.5
    assert cfg.rollout.temperature == 0.7
    assert cfg.ple.length_normalize is False and cfg.data.max_queries is None


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'ple.iterations'"):
        build_config(None, ["ple.iteratons=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("ple:\n  tau_0: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*did you mean 'ple.tau0'"):
        build_config(str(path))


def test_wrong_types_and_choices_name_the_key():
    with pytest.raises(ConfigError, match="ple.iterations: expected an integer"):
        build_config(None, ["ple.iterations=three"])
    with pytest.raises(ConfigError, match="ple.weighting: 'linear' is not one of"):
        build_config(None, ["ple.weighting=linear"])
    with pytest.raises(ConfigError, match="expected key=value"):
        build_config(None, ["ple.iterations"])
    with pytest.raises(ConfigError, match="is a section"):
        build_config(None, ["ple=3"])


def test_bounds_on_the_fields_name_the_key():
    """ge / gt / lt on the fields, the same check from the command line and from a file."""
    for override, message in (("ple.batch_size=0", "ple.batch_size: must be at least 1, got 0"),
                              ("ple.lr=0", "ple.lr: must be greater than 0.0, got 0.0"),
                              ("lora.dropout=1", "lora.dropout: must be less than 1.0, got 1.0"),
                              ("sft.steps=-1", "sft.steps: must be at least 0, got -1")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, [override])
    cfg = build_config(None, ["ple.iterations=0", "model.path=/m", "reward.kind=hf", "data.eval_fraction=0"])
    assert cfg.ple.iterations == 0 and cfg.data.eval_fraction == 0.0


def test_keys_the_task_would_ignore_are_errors():
    """Data files without a model folder (the embedded task brings its own), the embedded model's shape
    with one, a reward path the built-in reward ignores: each a ConfigError naming the key."""
    for overrides, message in ((["data.sft_path=hh.jsonl"], "data.sft_path is set but model.path is not"),
                               (["data.max_queries=8"], "data.max_queries is set but model.path is not"),
                               (["model.path=/m", "model.layers=4"], "model.layers sets the embedded model's shape"),
                               (["model.path=/m", "task.aligned_share=0.1"], "task.aligned_share shapes the embedded"),
                               (["task.aligned_share=1.5"], "task.aligned_share: must be at most 1.0"),
                               (["reward.path=m:f"], "reward.path is set but reward.kind=builtin ignores it")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, overrides)
    assert build_config(None, ["model.path=/m", "data.sft_path=hh.jsonl"]).data.sft_path == "hh.jsonl"


def test_experimental_values_from_a_file(tmp_path):
    """experimental=true may come from the file or the command line; the check runs on the result."""
    path = tmp_path / "exp.yaml"
    path.write_text("ple:\n  layers: compiled\n")
    with pytest.raises(ConfigError, match="ple.layers=compiled is experimental"):
        build_config(str(path))
    assert build_config(str(path), ["experimental=true"]).ple.layers == "compiled"
    path.write_text("experimental: true\nrollout:\n  merged_projections: true\n")
    assert build_config(str(path)).rollout.merged_projections is True
    assert Config().experimental is False


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("ple:\n  iterations: 3\n  tau0: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(None, ["ple.algo=raft", "model.path=/x/y", "ple.beta=2"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = build_config(str(tmp_path / "config.yaml"))
    assert again == cfg


def test_shipped_configs():
    from ple_fast.config import PACKAGED

    names = sorted(p.stem for p in PACKAGED.glob("*.yaml"))
    assert names == ["default", "hh_rlhf", "lora", "multi_gpu"]
    assert build_config("default") == Config()        # the file spells out the defaults
    assert build_config(str(PACKAGED / "default.yaml")) == Config()
    assert build_config("lora").lora.enabled and build_config("lora").lora.r == 8
    assert build_config("lora").lora.alpha == 16
    assert build_config("hh_rlhf").reward.kind == "hf"
    with pytest.raises(ConfigError, match="shipped configs: default, hh_rlhf, lora, multi_gpu"):
        build_config("nonexistent")


def test_real_config_fails_before_work_on_missing_folders(capsys):
    from ple_fast.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", "hh_rlhf", "--out", "/tmp/ple_fast_never_written"])
    assert exc.value.code == 2
    assert "model.path: policy model folder '/models/policy' does not exist" in capsys.readouterr().err
