"""The effective job (#28): --print-config, job.toml beside the checkpoints, no data set made at a typo."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mpitrain import config

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mpitrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_to_toml_loads_back_to_the_same_job(tmp_path):
    cfg = config.load(ROOT / "jobs" / "gpt-tiny.toml", ["train.lr=0.01", "model.hidden=[8, 4]", 'data.dataset=""'])
    text = config.to_toml(cfg)
    assert text.startswith("# the effective job: ") and "--set train.lr=0.01" in text.splitlines()[0]
    (tmp_path / "job.toml").write_text(text)
    assert config.load(tmp_path / "job.toml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("job, sets, ok", [
    (None, [], True),                                            # the default path and set
    (None, ["data.path=data/digitz"], False),                    # a --set path, the set from the job file
    (None, ["data.path=data/x", "data.dataset=digits"], True),   # named beside the path
    ("own", [], False),                                          # a job file's path, no set named
    ("named", [], True),
])
def test_may_make_builtin(tmp_path, job, sets, ok):
    if job:
        (tmp_path / "j.toml").write_text('[data]\npath = "data/mine"\n' + ('dataset = "digits"\n' if job == "named" else ""))
    assert config.may_make_builtin(config.load(tmp_path / "j.toml" if job else None, sets)) is ok


def test_a_typo_in_data_path_makes_nothing(tmp_path):
    p = _cli("train", "--set", "data.path=data/digitz", "--set", "checkpoint.every=0", cwd=tmp_path)
    assert p.returncode == 1 and not (tmp_path / "data" / "digitz").exists(), p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "data/digitz does not exist" in errors[0] and "typo" in errors[0], p.stderr
    assert "MPI_Abort" not in p.stderr and "Traceback" not in p.stderr, "one line, no abort noise at one rank"


def test_print_config_prints_the_resolved_job_and_exits(tmp_path):
    p = _cli("train", str(ROOT / "jobs" / "gpt-tiny.toml"), "--set", "train.lr=0.01", "--print-config", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    job = tomllib.loads(p.stdout)
    assert job["train"]["lr"] == 0.01 and job["model"]["kind"] == "gpt" and job["train"]["threads"] == 0
    assert set(job) == set(config.SECTIONS) and all(set(job[s]) == {k.split(".")[1] for k in config.keys()
                                                                    if k.startswith(s + ".")} for s in job)
    assert "# layout: 1 rank(s); a step = 8 windows/replica x 1 micro-step(s) x 1 replica(s) = 8 windows" in p.stdout
    assert list(tmp_path.iterdir()) == [], "nothing made, nothing trained"
