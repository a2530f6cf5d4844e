import pytest

from pipeline.config import ExtractConfig
from seacore.config import ConfigError, describe, load_config


def test_yaml_plus_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("encoder:\n  model: ViT-B-16\nlabels:\n  top_n: 5\n  templates: ['a photo of a {}.']\n")
    cfg = load_config(ExtractConfig, f, ["labels.top_n=7", "run.batch_size=3", "input.json=null",
                                         "labels.min_score=-0.5", "run.overwrite=true",
                                         "labels.templates=['x {}', 'y {}']"])
    assert cfg.encoder.model == "ViT-B-16"
    assert cfg.encoder.pretrained == "openai"  # untouched default inside a given section
    assert cfg.labels.top_n == 7 and cfg.run.batch_size == 3
    assert cfg.input.json is None and cfg.labels.min_score == -0.5 and cfg.run.overwrite is True
    assert cfg.labels.templates == ["x {}", "y {}"]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="labels.topn"):
        load_config(ExtractConfig, None, ["labels.topn=3"])
    f = tmp_path / "c.yaml"
    f.write_text("encoderr:\n  model: x\n")
    with pytest.raises(ConfigError, match="encoderr"):
        load_config(ExtractConfig, f)


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="labels.top_n"):
        load_config(ExtractConfig, None, ["labels.top_n=many"])
    with pytest.raises(ConfigError, match="run.runner"):
        load_config(ExtractConfig, None, ["run.runner=spark"])
    with pytest.raises(ConfigError, match="labels.templates"):
        load_config(ExtractConfig, None, ["labels.templates=[x {}]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ExtractConfig, None, ["labels.top_n"])


def test_shipped_configs_parse():
    from pathlib import Path

    from trainer.config import FinetuneConfig, PretrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted(root.glob("extract*.yaml")):
        cfg = load_config(ExtractConfig, f)
        assert cfg.labels.top_n == 10, f
    pre = load_config(PretrainConfig, root / "pretrain.yaml")
    assert (pre.optim.lr, pre.optim.global_batch_size, pre.sea.weight) == (1e-3, 256, 1.0)
    ft = load_config(FinetuneConfig, root / "finetune.yaml")
    assert (ft.optim.lr, ft.optim.global_batch_size, ft.sea.weight) == (2e-5, 128, 0.0)
    assert len(list(root.glob("*.yaml"))) == 4  # a new config needs a line here


def test_describe_lists_every_key():
    lines = describe(ExtractConfig)
    assert any(line.startswith("labels.mode = 'sea'") for line in lines)
    assert any(line.startswith("run.chunk_size") for line in lines)
