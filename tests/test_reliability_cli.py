"""Issue 27, round 3, numeric options: every number of ``generate`` is checked before anything is read
(one line, no traceback), and so are the neighbours in compare and the token-set makers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mpitrain.cli import main as cli_main
from mpitrain.runtime import UserError

NOWHERE = "/nonexistent/ckpt-00000001.h5"  # an option error must come before the checkpoint is read


@pytest.mark.parametrize("option, value, words", [
    ("--temperature", "nan", "--temperature = nan must be a finite number >= 0 (0 = greedy)"),
    ("--temperature", "inf", "--temperature = inf must be a finite number >= 0"),
    ("--temperature", "-0.5", "--temperature = -0.5 must be a finite number >= 0"),
    ("--top-k", "-1", "--top-k = -1 must be an integer >= 0 (0 = all tokens)"),
    ("--seed", "-2", "--seed = -2 must be an integer >= 0"),
    ("--tokens", "-3", "--tokens = -3 must be an integer >= 0"),
])
def test_generate_refuses_every_bad_number_first(option, value, words):
    args = ["generate", "--checkpoint", NOWHERE, "--prompt", "x", "--tokens", "1", option, value]
    with pytest.raises(UserError) as e:
        cli_main(args)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sample_checks_its_numbers_and_a_tiny_temperature_is_greedy():
    from mpitrain.generate import sample
    from mpitrain.models import GPT

    m = GPT(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=256, seed=1)
    greedy = sample(m, list(b"ab"), 12, temperature=0)
    assert sample(m, list(b"ab"), 12, temperature=1e-300, seed=4) == greedy       # no NaN, no traceback
    assert sample(m, list(b"ab"), 12, temperature=1e-300, top_k=2, seed=4) == greedy
    for bad in ({"temperature": float("nan")}, {"temperature": -1.0}, {"top_k": -1}, {"seed": -1}):
        with pytest.raises(UserError):
            sample(m, list(b"ab"), 3, **bad)


def test_generate_option_error_under_mpirun_is_one_line(tmp_path):
    from test_faults import failed_cleanly
    from test_user_errors import run

    from conftest import MPIRUN

    job = run([MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "generate", "--checkpoint", NOWHERE,
               "--prompt", "x", "--tokens", "2", "--temperature", "nan"], tmp_path)
    failed_cleanly(job, "--temperature = nan must be a finite number >= 0", rank=0)


@pytest.mark.parametrize("argv, words", [
    (["compare", "--timeout", "nan", "--replot"], "--timeout nan must be a finite number of seconds > 0"),
    (["compare", "--timeout", "0", "--replot"], "--timeout 0.0 must be a finite number of seconds > 0"),
    (["compare", "--ranks", "0"], "--ranks 0 and --repeats 1 must be >= 1"),
])
def test_compare_numbers(argv, words, tmp_path):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        cli_main([*argv, "--out", str(tmp_path / "o")])


def test_token_set_makers_check_their_numbers(tmp_path):
    from mpitrain.data import import_text, make_pycode

    text = tmp_path / "a.txt"
    text.write_bytes(b"x = 1\n" * 200)
    cases = [
        (lambda: make_pycode(tmp_path / "p", max_bytes=-1), "--max-bytes = -1 must be >= 0"),
        (lambda: make_pycode(tmp_path / "p", max_bytes=10), "too few for a train and a val split"),
        (lambda: make_pycode(tmp_path / "p", val_fraction=float("nan")), "--val-fraction = nan must be in (0, 1)"),
        (lambda: make_pycode(tmp_path / "p", shards=0, max_bytes=200_000), "--shards must be at least 1 (got 0)"),
        (lambda: import_text([text], tmp_path / "t", shards=0), "--shards must be at least 1 (got 0)"),
        (lambda: import_text([text], tmp_path / "t", val_fraction=float("nan")), "must be in (0, 1)"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_pycode_max_bytes_error_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mpitrain", "data", "make", "pycode", "--out", str(tmp_path / "p"),
                        "--max-bytes", "10"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert [ln for ln in p.stderr.splitlines() if "error:" in ln] == [p.stderr.strip().splitlines()[-1]]
    assert "too few for a train and a val split" in p.stderr and np.isscalar(p.returncode)
