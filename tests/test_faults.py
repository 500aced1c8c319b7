"""Faults: corrupt blocks repaired and never shown, and every input that used to fail late or
unkindly fails early, in one line, with its documented exit code. Sweeps are real (subprocess CLI,
local Ray, loopback); pure input errors run in-process through typer's CliRunner."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import mounted_tmpfs, one_line_error

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.errors import CorruptBlockError
from ldam_sweep.failpoints import FAIL_BLOCKS_ENV
from ldam_sweep.store import manifest

SPEC = {
    "name": "faults",
    "model": {"zoo": "digits-cnn"},
    "layers": ["conv2", "fc2"],
    "units": {"conv2": "0-7", "fc2": "0-3"},
    "sampler": {"steps": 10, "chains": 2, "seed": 1},
    "data": {"source": "digits", "limit": 64},
    "exemplars": 2,
    "resources": {"actors": 1, "block_size": 4, "commit_every": 1, "max_attempts": 2},
}
runner = CliRunner()


def write_spec(folder: Path, **changes) -> Path:
    doc = json.loads(json.dumps(SPEC))
    doc.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def env_for(model_cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled", "COLUMNS": "250", **extra}


def cli_run(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldam_sweep.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def swept(finished_sweep) -> tuple[Path, str]:
    """One uninterrupted sweep (3 blocks: conv2 0-3, conv2 4-7, fc2 0-3, with a discriminator), shared read-only."""
    return finished_sweep[0], finished_sweep[1]


@pytest.fixture
def copy(swept, tmp_path) -> str:
    """A private copy of the shared sweep."""
    dest = tmp_path / "copy.zarr"
    shutil.copytree(swept[1], dest)
    return str(dest)


def block_object(url: str, layer: str, array: str, block: int) -> Path:
    st = ls.open_store(url)
    key = st.plan.arrays(layer)[array].block_key(block)
    return Path(url) / "layers" / layer / array / key


# -- repair ---------------------------------------------------------------------------------------

def test_corrupt_shard_is_repaired_and_rerun_equals_an_uninterrupted_run(swept, copy, tmp_path, model_cache):
    """A corrupt shard of a real sweep is named by verify/show/atlas, repaired, and rerun bit for bit equal."""
    spec, original = swept
    shard = block_object(copy, "conv2", "samples", 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # garbage inside the shard
    shard.write_bytes(bytes(data))

    out = invoke("verify", copy)
    assert out.exit_code == 1
    assert "'conv2' block 1" in out.output
    assert f"ldam-sweep verify {copy} --repair" in out.output and f"ldam-sweep run SPEC --store {copy}" in out.output

    out = invoke("show", copy, "conv2", 5, "-o", tmp_path / "u.png")
    assert out.exit_code == 1 and not (tmp_path / "u.png").exists()
    assert "'conv2' block 1" in out.output and "--repair" in out.output and "Traceback" not in out.output

    out = invoke("atlas", copy, "-o", tmp_path / "atlas")
    assert out.exit_code == 0, out.output
    from ldam_sweep.atlas.site import slug

    page = (tmp_path / "atlas" / "units" / slug("conv2") / "5.html").read_text()
    assert "corrupt" in page and "--repair" in page
    assert not list((tmp_path / "atlas" / "img" / slug("conv2")).glob("5-*.png"))
    assert (tmp_path / "atlas" / "img" / slug("conv2") / "1-best.png").is_file()  # block 0 rendered
    assert (tmp_path / "atlas" / "img" / slug("fc2") / "0-best.png").is_file()
    layer_data = (tmp_path / "atlas" / "data" / f"{slug('conv2')}.js").read_text()
    assert layer_data.count('"status":"corrupt"') == 4

    out = invoke("verify", copy, "--repair")
    assert out.exit_code == 1 and "4 units marked corrupt" in out.output
    assert invoke("verify", copy).exit_code == 0
    out = invoke("status", copy)
    assert "4 units corrupt" in out.output
    conv2 = {d["name"]: d for d in ls.open_store(copy).layers()}["conv2"]
    assert (conv2["done"], conv2["corrupt"], conv2["pending"]) == (4, 4, 0)

    out = cli_run("run", str(spec), "--store", copy, env=env_for(model_cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 of 3 blocks already committed, 1 to run" in out.stderr
    assert invoke("verify", copy).exit_code == 0

    a, b = ls.open_store(original), ls.open_store(copy)
    for layer in ("conv2", "fc2"):
        for name in a.plan.arrays(layer):
            np.testing.assert_array_equal(a._array(layer, name)[:], b._array(layer, name)[:], err_msg=f"{layer}/{name}")
    sums = lambda st: {(r["layer"], r["unit"]): (r["status"], r["checksum"]) for r in st.units(status=None).to_pylist()}
    assert sums(a) == sums(b)


def test_flipped_bytes_in_an_activation_chunk_are_never_shown(swept, copy, tmp_path):
    """Flipped bytes in an activation chunk: every reader raises CorruptBlockError; show, atlas, compare skip it."""
    chunk = block_object(copy, "fc2", "activation", 0)
    data = bytearray(chunk.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0x5A
    chunk.write_bytes(bytes(data))

    st = ls.open_store(copy)
    for read in (lambda: st.samples("fc2", 1), lambda: st.trace("fc2", 1), lambda: st.exemplars("fc2", 1),
                 lambda: st.read_block("fc2", 0)):
        with pytest.raises(CorruptBlockError, match=r"layer 'fc2' block 0.*--repair"):
            read()
    np.testing.assert_array_equal(st.samples("conv2", 0), ls.open_store(swept[1]).samples("conv2", 0))

    out = invoke("show", copy, "fc2", 1, "-o", tmp_path / "u.png")
    assert out.exit_code == 1 and "Traceback" not in out.output and not (tmp_path / "u.png").exists()
    out = invoke("atlas", copy, "-o", tmp_path / "atlas")
    assert out.exit_code == 0, out.output
    from ldam_sweep.atlas.site import slug

    assert "corrupt" in (tmp_path / "atlas" / "units" / slug("fc2") / "1.html").read_text()
    assert not list((tmp_path / "atlas" / "img" / slug("fc2")).glob("*.png"))
    out = invoke("compare", swept[1], copy)
    assert out.exit_code == 0, out.output
    assert out.output.count("skipped (corrupt)") == 4


def test_checksum_is_checked_once_per_block_per_store_instance(swept):
    """A store instance verifies a block's checksum once, not on every read of one of its units."""
    st = ls.open_store(swept[1])
    st.samples("conv2", 0)
    assert ("conv2", 0) in {(layer, block) for layer, block, _ in st._verified}
    assert len(st._verified) == 1
    st.trace("conv2", 3)
    assert len(st._verified) == 1


def test_stale_temp_parts_are_removed_at_the_next_commit(copy):
    """A commit removes stale .tmp manifest parts a dead writer left, and keeps a live writer's."""
    folder = Path(copy) / "manifest" / "parts" / "layer=fc2"
    stale, fresh = folder / ".part-1-dead.parquet.tmp", folder / ".part-2-live.parquet.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 2 * manifest.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    st = ls.open_store(copy)
    rows = st.units("fc2").to_pylist()
    manifest.publish(st.loc, [{k: v for k, v in rows[0].items() if k in manifest.COLUMNS and k != "committed_at"}])
    assert not stale.exists() and fresh.exists()


# -- early, kind failures (nothing is created) -----------------------------------------------------

@pytest.mark.fast
def test_huge_unit_range_fails_at_once_with_the_valid_range(tmp_path):
    spec = write_spec(tmp_path, units={"fc2": "0-100000000000"}, layers=["fc2"])
    out = invoke("run", spec, "--store", tmp_path / "s.zarr")
    assert out.exit_code == 2
    line = one_line_error(out.output)
    assert "units.fc2: unit 10 is out of range for layer 'fc2': valid units are 0..9" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.fast
def test_a_block_that_cannot_fit_in_memory_is_refused_naming_the_setting(tmp_path):
    from ldam_sweep.planning import physical_memory_bytes

    need = 10 * 4096 * 100_001 * 4  # fc2's traces alone: 10 units x 4096 chains x 100,001 steps, float32
    if physical_memory_bytes() is None or physical_memory_bytes() // 2 >= need:
        pytest.skip("this machine has memory for 16 GB of traces per block")
    spec = write_spec(tmp_path, layers=["fc2"], units={}, sampler={"steps": 100_000, "chains": 4096},
                      resources={"block_size": 10})
    out = invoke("run", spec, "--store", tmp_path / "s.zarr")
    assert out.exit_code == 2
    line = one_line_error(out.output)
    assert "layer 'fc2'" in line and "traces" in line and "sampler.steps" in line and "GiB" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.fast
@pytest.mark.parametrize("what", ["missing", "whole-model"])
def test_a_bad_discriminator_file_fails_before_the_store_exists(tmp_path, what):
    d = tmp_path / "d.pt"
    if what == "whole-model":
        torch.save(torch.nn.Linear(2, 2), d)
    spec = write_spec(tmp_path, discriminator={"file": str(d)}, sampler={"steps": 10, "chains": 2, "lam": 0.5})
    out = invoke("run", spec, "--store", tmp_path / "s.zarr")
    assert out.exit_code == 2, out.output
    line = one_line_error(out.output)
    assert str(d) in line and "weights_only=False" not in out.output
    if what == "whole-model":
        assert "torch.nn.modules.linear.Linear" in line and "train-discriminator" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.fast
def test_a_missing_data_file_fails_before_the_store_exists(tmp_path):
    spec = write_spec(tmp_path, data={"source": "npy", "path": str(tmp_path / "nope.npy")})
    out = invoke("run", spec, "--store", tmp_path / "s.zarr")
    assert out.exit_code == 2 and "nope.npy" in out.output and "does not exist" in out.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.fast
def test_weight_file_errors_say_what_to_save(tmp_path):
    from ldam_sweep.errors import ModelError
    from ldam_sweep.model.loading import read_state_dict

    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), whole)
    with pytest.raises(ModelError) as err:
        read_state_dict(whole)
    text = str(err.value)
    assert "torch.nn.modules.container.Sequential" in text and "torch.save(model.state_dict(), path)" in text
    assert "weights_only=False" not in text and "\x1b" not in text
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ModelError, match=r"cannot be read: it is not a file torch.save wrote.*torch\.save\(model\.state_dict\(\), path\)"):
        read_state_dict(garbage)


def test_a_store_from_another_spec_names_the_changed_fields(swept, copy, tmp_path):
    """Running another spec against a real sweep's store is refused, naming each changed field (old -> new)."""
    spec = write_spec(tmp_path, sampler={"steps": 10, "chains": 2, "seed": 7},
                      resources={"actors": 1, "block_size": 2, "commit_every": 1, "max_attempts": 2})
    out = invoke("run", spec, "--store", copy)
    assert out.exit_code == 2
    assert "resources.block_size: 4 -> 2" in out.output and "sampler.seed: 1 -> 7" in out.output


@pytest.mark.fast
def test_rich_markup_in_user_text_prints_literally(tmp_path):
    out = invoke("status", tmp_path / "x[red]y[/red]")
    assert out.exit_code == 2 and "x[red]y[/red]" in out.output


@pytest.mark.fast
def test_progress_line_never_shows_eta_nan():
    from rich.console import Console

    from ldam_sweep.cluster.progress import SweepProgress, eta_text

    assert eta_text(5, 0.0) == "unknown" and eta_text(5, float("nan")) == "unknown" and eta_text(10, 2.0) == "5s"
    console = Console(record=True, force_terminal=False, width=200)
    SweepProgress(10, console).close()
    assert "ETA unknown" in console.export_text() and "nan" not in console.export_text()


# -- Ray, Ctrl-C, storage: real processes ---------------------------------------------------------

def test_ray_that_cannot_start_exits_3_with_one_line(tmp_path, model_cache):
    """A Ray that cannot start (socket path too long) makes `ldam-sweep run` exit 3 with one line, no traceback."""
    long_tmp = Path(tempfile.mkdtemp(prefix="r" + "x" * 90, dir="/tmp"))  # unix socket paths are limited to 107 bytes
    try:
        spec = write_spec(tmp_path)
        out = cli_run("run", str(spec), "--store", str(tmp_path / "s.zarr"),
                      env=env_for(model_cache, RAY_TMPDIR=str(long_tmp)), cwd=tmp_path)
    finally:
        shutil.rmtree(long_tmp, ignore_errors=True)
    assert out.returncode == 3, out.stderr
    assert "cannot start or join Ray" in out.stderr and "Traceback" not in out.stderr


def ray_processes(marker: str) -> list[int]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if marker in line and "ps -ww" not in line]


@pytest.mark.parametrize("second", ["after-the-first-is-handled", "right-behind-the-first"])
def test_second_ctrl_c_stops_at_once_and_leaves_no_ray_process(tmp_path, model_cache, second):
    """A second Ctrl-C stops a real driver at once (exit 130) and leaves no Ray process behind, also
    when it lands while the first is still being handled (no window where it escapes as a traceback)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    spec = write_spec(tmp_path, layers=["conv2"], units={}, sampler={"steps": 200, "chains": 2, "seed": 1},
                      resources={"actors": 1, "block_size": 2, "commit_every": 1})
    url = str(tmp_path / "s.zarr")
    proc = subprocess.Popen([sys.executable, "-m", "ldam_sweep.cli", "run", str(spec), "--store", url],
                            env=env_for(model_cache, RAY_TMPDIR=str(ray_tmp)), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_sweep.default_sigint
    try:
        while not (Path(url) / "manifest" / "parts").is_dir():  # the first committed block: Ray is up and working
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert ray_processes(str(ray_tmp)), "Ray runs under its own temp dir"
        proc.send_signal(signal.SIGINT)
        lines = []
        if second == "after-the-first-is-handled":
            for line in proc.stderr:
                lines.append(line)
                if line.startswith("interrupted: committing"):
                    break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
        err = "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err  # "interrupted: stopping now" when the second Ctrl-C lands during commit/shutdown
    deadline = time.monotonic() + 30  # Ray's processes exit with the driver's shutdown, not a minute later
    while ray_processes(str(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes(str(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB tmpfs (needs root and a sandbox that allows mounts)."""
    with mounted_tmpfs(tmp_path / "fs", "8m") as mnt:
        yield mnt


def test_a_full_disk_stops_the_sweep_once_with_exit_4(small_fs, tmp_path, model_cache):
    """A disk that fills during a real sweep stops it once with exit 4 and one line; committed blocks stay intact."""
    spec = write_spec(tmp_path, resources={"actors": 1, "block_size": 4, "commit_every": 1, "max_attempts": 3})
    url = str(small_fs / "s.zarr")
    out = cli_run("run", str(spec), "--store", url, cwd=tmp_path,
                  env=env_for(model_cache, **{FAIL_BLOCKS_ENV: "conv2:1"}))
    assert out.returncode == 1, out.stderr  # conv2 block 1 failed on purpose; the other two committed
    rows_before = ls.open_store(url).manifest().num_rows
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte (unbuffered: close has nothing left to flush)
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    chunk = b"\0"
    while True:
        try:
            with open(filler, "ab") as f:
                f.write(chunk)
        except OSError:
            break
    out = cli_run("run", str(spec), "--store", url, cwd=tmp_path, env=env_for(model_cache))
    assert out.returncode == 4, out.stderr
    line = one_line_error(out.stderr)
    assert "No space left on device" in line and "rerun the same command" in line
    filler.unlink()
    assert not [p.name for p in Path(url).iterdir() if p.name.endswith(".tmp")]  # no stray lease or record temp file
    st = ls.open_store(url)
    assert st.manifest().num_rows == rows_before  # the block was not retried max_attempts times, nothing recorded
    assert invoke("verify", url).exit_code == 0  # committed blocks intact
    assert st.units().num_rows == 8
