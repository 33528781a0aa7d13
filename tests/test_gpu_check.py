"""`make gpu-check` on a CPU: how tests/gpu_check.sh finds its tools and what it would run.

No GPU needed: conftest's mpirun fallback (a fake PATH), the script's argument parsing and its
plan (GPU_CHECK_DRY_RUN=1) in venv and --system modes -- which wheels it would install from the
carried folder, with which pip options, into which prefix, the environment it would set, the
steps with their timeouts, the files that come back -- and the summary of owed numbers from
made-up result files.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import find_mpirun

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "gpu_check.sh"
HAVE_CUPY = importlib.util.find_spec("cupy") is not None
TOOLS = ("bash", "sed", "ls", "sort", "head", "find", "dirname", "tr", "seq", "awk", "cat", "env")
WHEELS = ("mpich-5.0.2-py3-none-manylinux_2_28_x86_64.whl", "pytest_mpi-0.6-py2.py3-none-any.whl",
          "mpi4py-4.1.2-cp312-cp312-manylinux1_x86_64.manylinux_2_5_x86_64.whl")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- conftest's mpirun


def _exe(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_find_mpirun_prefers_the_one_beside_python(tmp_path):
    beside = _exe(tmp_path / "venv" / "bin" / "mpirun")
    on_path = _exe(tmp_path / "elsewhere" / "mpirun")
    assert find_mpirun(str(tmp_path / "venv" / "bin"), path=os.path.dirname(on_path)) == beside


def test_find_mpirun_falls_back_to_path(tmp_path):
    """The GPU machine's image: python in /opt/.../bin, mpirun from the carried mpich elsewhere."""
    (tmp_path / "py" / "bin").mkdir(parents=True)
    (tmp_path / "py" / "bin" / "mpirun").write_text("not executable")
    on_path = _exe(tmp_path / "prefix" / "bin" / "mpirun")
    path = os.pathsep.join([str(tmp_path / "empty"), os.path.dirname(on_path)])
    assert find_mpirun(str(tmp_path / "py" / "bin"), path=path) == on_path


def test_find_mpirun_without_any_names_the_expected_path(tmp_path):
    assert find_mpirun(str(tmp_path), path=str(tmp_path / "nothing")) == str(tmp_path / "mpirun")


# --------------------------------------------------------------------------- tests/gpu_check.sh


@pytest.fixture
def tools_only(tmp_path):
    """A PATH holding only the tools a dry run uses (no mpirun, no python)."""
    d = tmp_path / "bin"
    d.mkdir()
    for t in TOOLS:
        found = shutil.which(t)
        if found:
            (d / t).symlink_to(found)
    return str(d)


@pytest.fixture
def wheels(tmp_path):
    d = tmp_path / "whl"
    d.mkdir()
    for w in WHEELS:
        (d / w).write_bytes(b"")
    return d


@pytest.fixture
def stub_cupy(tmp_path):
    """An importable 'cupy' (the GPU image's, as far as a dry run can tell)."""
    d = tmp_path / "stub"
    (d / "cupy").mkdir(parents=True)
    (d / "cupy" / "__init__.py").write_text("__version__ = '0-stub'\n")
    return str(d)


def dry_run(*args, path, env=None):
    e = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": path, "GPU_CHECK_DRY_RUN": "1", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


def plan_lines(p):
    return [line[len("plan: "):] for line in p.stdout.splitlines() if line.startswith("plan: ")]


def test_system_mode_plan(tools_only, wheels, stub_cupy, tmp_path):
    prefix = tmp_path / "prefix"
    p = dry_run("--system", "--wheels", str(wheels), path=tools_only,
                env={"MPITRAIN_GPU_PYTHON": sys.executable, "PYTHONPATH": stub_cupy, "OUT": str(tmp_path / "out"),
                     "MPITRAIN_GPU_PREFIX": str(prefix)})
    assert p.returncode == 0, p.stdout + p.stderr
    plan = plan_lines(p)
    text = "\n".join(plan)
    assert plan[0].startswith(f"mode: system, python {sys.executable}")
    assert "cupy: the image's" in text and "never installed" in text
    assert not any("cupy" in line and line.startswith("install:") for line in plan), "never a second CuPy"
    install = [line for line in plan if line.startswith("install:")]
    assert len(install) == 1, plan
    cmd = install[0].split()
    assert cmd[1:4] == [sys.executable, "-m", "pip"]
    for opt in ("--no-index", "--no-deps", f"--find-links {wheels}", f"--prefix {prefix}"):
        assert opt in install[0], install[0]
    assert "--target" not in install[0], "--target drops lib/libmpi.so.12"
    assert "mpich" in cmd, "no mpirun on PATH: the carried mpich goes in"
    if importlib.util.find_spec("pytest_mpi") is None:
        assert "pytest-mpi" in cmd
    assert "mpi4py" not in cmd, "mpi4py is installed here: its wheel is only a fallback"
    pyver = "%d.%d" % sys.version_info[:2]
    assert f"env: PATH={prefix}/bin:{tools_only}" in plan
    assert f"env: LD_LIBRARY_PATH={prefix}/lib" in plan
    assert f"env: MPI4PY_LIBMPI={prefix}/lib/libmpi.so.12" in plan, "mpi4py loads the carried MPICH"
    assert f"env: PYTHONPATH={ROOT}:{prefix}/lib/python{pyver}/site-packages:{stub_cupy}" in plan
    steps = [line for line in plan if line.startswith("step ")]
    assert len(steps) == 8, steps
    limits = [int(m) for m in re.findall(r"\(timeout (\d+) s\)", "\n".join(steps))]
    assert len(limits) == 8 and max(limits) <= 300, steps
    assert all("--timeout=120" in s for s in steps if "pytest" in s)
    assert any("benchmarks/gpu_streams.py" in s for s in steps) and any("bench --backend cupy" in s for s in steps)
    assert any("mpirun -n 2 " + sys.executable in s for s in steps), "the system python runs the ranks"
    results = next(line for line in plan if line.startswith("results:"))
    assert f"log and JSON to {tmp_path / 'out'}" in results, "results go to $OUT, the folder that comes back"
    files = re.findall(r"[\w.-]+\.(?:json|log|txt)", results)
    assert 1 <= len(set(files)) <= 8 and not any(f.endswith((".h5", ".npz")) for f in files), files
    assert "limits: 120 s per test, 300 s per step, 480 s in all" in text


def test_system_mode_finds_the_wheel_folder_in_the_tree(tools_only, stub_cupy):
    """Without --wheels, a .whl folder in the work tree is used (where `make gpu-wheels` puts it)."""
    p = dry_run("--system", path=tools_only, env={"MPITRAIN_GPU_PYTHON": sys.executable, "PYTHONPATH": stub_cupy})
    plan = plan_lines(p)
    if (ROOT / ".whl").is_dir():
        assert plan[1].startswith("wheels: .whl"), plan
    else:
        assert plan[1] == "wheels: (none)", plan
        assert p.returncode == 2 and "make gpu-wheels" in p.stderr, p.stderr


def test_system_mode_without_wheels_or_cupy_says_what_is_missing(tools_only, tmp_path):
    empty = tmp_path / "nowheels"
    empty.mkdir()
    p = dry_run("--system", "--wheels", str(empty), path=tools_only, env={"MPITRAIN_GPU_PYTHON": sys.executable})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "missing: mpirun (no MPI on PATH and no mpich wheel" in p.stderr
    assert "make gpu-wheels" in p.stderr
    if not HAVE_CUPY:
        assert "cupy (not importable" in p.stderr and "never installs CuPy" in p.stderr


def test_system_mode_uses_an_mpirun_already_on_path(tools_only, wheels, stub_cupy, tmp_path):
    _exe(Path(tools_only) / "mpirun")
    p = dry_run("--system", "--wheels", str(wheels), path=tools_only,
                env={"MPITRAIN_GPU_PYTHON": sys.executable, "PYTHONPATH": stub_cupy})
    assert p.returncode == 0, p.stderr
    plan = plan_lines(p)
    assert f"mpirun: {tools_only}/mpirun (on PATH; the mpich wheel is not installed)" in plan
    assert not any(line.startswith("install:") and " mpich" in line for line in plan)


def test_venv_mode_picks_cupy_for_the_driver(tools_only):
    path = os.pathsep.join([os.path.dirname(sys.executable), tools_only])
    p = dry_run(path=path, env={"MPITRAIN_CUDA_DRIVER": "13000"})
    text = p.stdout + p.stderr
    if HAVE_CUPY:
        assert "plan: cupy: present" in text
    else:  # installs into the project's .venv only; elsewhere says what to run
        assert "cupy-cuda13x[ctk]" in text, text
        p12 = dry_run(path=path, env={"MPITRAIN_CUDA_DRIVER": "12040"})
        assert "cupy-cuda12x[ctk]" in p12.stdout + p12.stderr
    p0 = dry_run(path=path, env={"MPITRAIN_CUDA_DRIVER": "none"})
    if not HAVE_CUPY:
        assert p0.returncode == 2 and "no CUDA >= 12 driver" in p0.stderr, p0.stderr


@pytest.mark.parametrize("args, message", [(["--bogus"], "unknown argument '--bogus'"),
                                           (["--wheels"], "--wheels needs a folder")])
def test_bad_arguments(tools_only, args, message):
    p = dry_run(*args, path=tools_only)
    assert p.returncode == 64 and message in p.stderr, p.stderr


def test_help_and_wheels_equals_form(tools_only, wheels, stub_cupy):
    p = dry_run("--help", path=tools_only)
    assert p.returncode == 0 and "--system" in p.stdout and "GPU_CHECK_DRY_RUN" in p.stdout
    p = dry_run("--system", f"--wheels={wheels}", path=tools_only,
                env={"MPITRAIN_GPU_PYTHON": sys.executable, "PYTHONPATH": stub_cupy})
    assert p.returncode == 0 and f"plan: wheels: {wheels} (" in p.stdout, p.stdout + p.stderr


def test_step_selection(tools_only, wheels, stub_cupy):
    env = {"MPITRAIN_GPU_PYTHON": sys.executable, "PYTHONPATH": stub_cupy}
    p = dry_run("--system", "--wheels", str(wheels), path=tools_only, env={**env, "MPITRAIN_GPU_STEPS": "7 8"})
    steps = [line for line in plan_lines(p) if line.startswith("step ")]
    assert [("skipped" in s) for s in steps] == [True] * 6 + [False] * 2, steps
    bad = dry_run("--system", "--wheels", str(wheels), path=tools_only, env={**env, "MPITRAIN_GPU_STEPS": "9"})
    assert bad.returncode != 0 and "no step 9" in bad.stderr


# --------------------------------------------------------------------------- the owed numbers


def _rows(spec):
    return [{"size": s, "algorithm": a, "busbw": bw, "wrong": 0} for s, a, bw in spec]


def test_summary_prints_every_owed_number(tmp_path):
    mib = 1 << 20
    (tmp_path / "train-cupy.json").write_text(json.dumps(
        {"test_accuracy": 0.955, "samples_per_s": 12000.0, "comm_fraction": 0.31, "ranks": 2, "epochs": 5}))
    (tmp_path / "synthetic-numpy.json").write_text(json.dumps({"samples_per_s": 1000.0, "comm_fraction": 0.12}))
    (tmp_path / "synthetic-cupy.json").write_text(json.dumps({"samples_per_s": 5000.0, "comm_fraction": 0.45}))
    bench = _rows([(mib, "ring", 5.0), (mib, "native", 4.0), (mib, "d2h", 20.0),
                   (16 * mib, "ring", 9.0), (16 * mib, "native", 10.0), (16 * mib, "d2h", 20.0),
                   (64 * mib, "ring", 17.0), (64 * mib, "native", 8.0), (64 * mib, "d2h", 20.0),
                   (256 * mib, "ring", 15.0), (256 * mib, "native", 7.0), (256 * mib, "d2h", 20.0)])
    (tmp_path / "bench-cupy.json").write_text(json.dumps({"meta": {"cuda_aware": "CUDA-aware MPI: no (x)"},
                                                          "rows": bench}))
    streams = _rows([(16 * mib, "ring-1stream", 9.0), (16 * mib, "ring-2streams", 16.0), (16 * mib, "d2h", 20.0)])
    (tmp_path / "streams-cupy.json").write_text(json.dumps({"meta": {"labels": {"1": "ring-1stream",
                                                                                "2": "ring-2streams"}},
                                                            "rows": streams}))
    summary = _load(ROOT / "tests" / "gpu_summary.py", "gpu_summary")
    text = "\n".join(summary.summary(str(tmp_path)))
    assert "test accuracy 0.9550" in text and "comm_fraction 0.310" in text
    assert "backend=cupy: 5,000 samples/s, comm_fraction 0.450" in text, "the synthetic CuPy run's comm_fraction"
    assert "cupy/numpy: 5.00x (cupy faster)" in text
    assert "ring    64 MiB:" in text and "ratio 0.85 (goal >= 0.80: met)" in text
    assert "ring   256 MiB:" in text and "ratio 0.75 (goal >= 0.80: NOT met)" in text
    assert not any(line.startswith("ring    16 MiB") for line in text.splitlines()), "the goal is checked at >= 64 MiB"
    assert "ring >= native at every size >= 1 MiB: NO (ring/native busbw from 0.90 at 16 MiB" in text
    assert "1 stream    9.00 GB/s (0.45 of d2h), 2 streams   16.00 GB/s (0.80 of d2h): 2/1 = 1.78" in text
    assert "CUDA-aware MPI: no" in text and "bench #wrong: 0" in text


def test_summary_names_missing_results(tmp_path):
    summary = _load(ROOT / "tests" / "gpu_summary.py", "gpu_summary")
    text = "\n".join(summary.summary(str(tmp_path)))
    for name in ("train-cupy.json", "synthetic-numpy.json", "synthetic-cupy.json", "bench-cupy.json",
                 "streams-cupy.json"):
        assert f"{name} missing" in text, (name, text)


def test_streams_bench_table():
    mod = _load(ROOT / "benchmarks" / "gpu_streams.py", "gpu_streams")
    mib = 1 << 20
    rows = _rows([(16 * mib, "ring-1stream", 10.0), (16 * mib, "ring-2streams", 18.0), (16 * mib, "native", 6.0),
                  (16 * mib, "d2h", 20.0)])
    out = mod.table(rows)
    assert "16MiB" in out[1] and out[1].split()[-3:] == ["0.50", "0.90", "1.80"], out
