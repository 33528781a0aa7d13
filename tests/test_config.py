"""Config: defaults, job files, --set, every error names the key; docs list every key."""

from pathlib import Path

import pytest

from mpitrain import config
from mpitrain.runtime import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "jobs.md").read_text()
    missing = [k for k in config.keys() if f"`{k}`" not in doc]
    assert not missing, f"docs/jobs.md lacks {missing}"


def test_shipped_jobs_load_and_default_is_packaged():
    assert config.default_job_path().is_file()
    for job in (ROOT / "jobs").glob("*.toml"):
        cfg = config.load(job)
        assert cfg.source == str(job)
    assert config.load().data.dataset == "digits"


def test_overrides_and_types():
    cfg = config.load(None, ["train.lr=0.5", "model.hidden=[8, 4]", "train.epochs=3", "comm.algorithm=tree",
                             "train.share_gpu=true", "train.lr=2"])
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.hidden == [8, 4] and cfg.train.epochs == 3 and cfg.comm.algorithm == "tree"
    assert cfg.train.share_gpu is True
    assert cfg.digest() != config.load().digest()


@pytest.mark.parametrize("override, match", [
    ("train.learning_rate=1", "unknown key train.learning_rate"),
    ("optimizer.lr=1", r"unknown section \[optimizer\]"),
    ("train.epochs=1.5", "train.epochs must be int"),
    ("train.epochs=true", "train.epochs must be int"),
    ("train.lr=0", "train.lr = 0.0 must be > 0"),
    ("train.lr=-1", "must be > 0"),
    ("train.batch_size=0", "train.batch_size = 0 must be >= 1"),
    ("model.hidden=[0]", "model.hidden"),
    ("model.hidden=3", "model.hidden must be a list of integers"),
    ("comm.algorithm='butterfly'", "allowed: 'ring', 'tree', 'native', 'auto'"),
    ("train.optimizer=rmsprop", "allowed: 'sgd', 'adam'"),
    ("trainlr=1", "expected section.key=value"),
    ("train.seed=-1", r"--set train.seed=-1: train.seed = -1 must be >= 0"),
    ("train.min_lr=-1", r"train.min_lr = -1.0 must be >= 0"),
    ("train.min_lr=nan", r"--set train.min_lr=nan: train.min_lr = nan must be a finite number"),
    ("train.lr=inf", r"train.lr = inf must be a finite number"),
    ("comm.timeout_s=-inf", r"comm.timeout_s = -inf must be a finite number"),
    ("model.hidden=[1000000000000]", r"model.hidden = \[1000000000000\] widths must be <= 1048576"),
    ("model.hidden=[100000,100000]", r"needs 10,000,000,000 weights between hidden layers"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(UserError, match=match):
        config.load(None, [override])


def test_toml_syntax_error_has_line_and_column(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = 0.1\nepochs = = 3\n")
    with pytest.raises(UserError, match=r"bad.toml: TOML syntax error: .*line 3, column"):
        config.load(bad)


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_every_float_key_rejects_nan_and_inf():
    """Non-finite floats are refused for every float key, present and future, naming the key."""
    from dataclasses import fields

    floats = [f"{s}.{f.name}" for s in config.SECTIONS for f in fields(config._section_class(s))
              if f.type in (float, "float")]
    assert "train.min_lr" in floats and "comm.timeout_s" in floats
    for key in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(UserError, match=f"--set {key}={bad}: {key} = .* must be a finite number"):
                config.load(None, [f"{key}={bad}"])


def test_widest_accepted_layer():
    assert config.load(None, [f"model.hidden=[{2**20}]"]).model.hidden == [2**20]


def test_job_file_that_is_not_utf8(tmp_path):
    job = tmp_path / "latin1.toml"
    job.write_bytes("[train]\n# learning rate for the caf\u00e9 data\nlr = 0.1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.toml: not UTF-8 text \(byte 0xe9 at line 2\)"):
        config.load(job)
