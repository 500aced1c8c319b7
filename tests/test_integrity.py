"""Integrity: every byte a store depends on is checked. Each case is a real fault on a real sweep
(subprocess CLI, local Ray): a process SIGKILLed at a named write (ldam_sweep/failpoints.py), a real
tmpfs that fills up, real byte flips; each ends in a store that verify calls ok and that equals an
uninterrupted run, after at most ``verify --repair`` + ``run``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import SWEEP_SPEC, assert_equal_stores, mounted_tmpfs, one_line_error

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.failpoints import ENV as FAILPOINTS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str, env: dict, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldam_sweep.cli", *map(str, args)], env={**env, "COLUMNS": "400", **extra},
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def flip(path: Path, at: float = 0.5, mask: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def swept(finished_sweep) -> tuple[Path, str, dict]:
    """One uninterrupted sweep with a discriminator, exemplars and a realism record (read-only)."""
    return finished_sweep


@pytest.fixture
def copy(swept, tmp_path) -> str:
    dest = tmp_path / "copy.zarr"
    shutil.copytree(swept[1], dest)
    return str(dest)


def test_every_flipped_byte_is_found_or_harmless(swept, tmp_path):
    """No flipped byte in any file of a finished store is silent: verify finds it or readers are unaffected.

    One random byte flipped in each file of a finished store, one file at a time, three times
    over: verify finds it, or what readers get back is identical. Never silent."""
    spec = importlib.util.spec_from_file_location("integrity_bench", ROOT / "benchmarks" / "integrity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files = {str(p.relative_to(swept[1])) for p in Path(swept[1]).rglob("*") if p.is_file()}
    # the files the store depends on beyond its blocks are all there to be flipped
    assert {"zarr.json", "root-copy/zarr.json", "layers/zarr.json", "layers/conv2/zarr.json", "layers/conv2/samples/zarr.json",
            "discriminator/zarr.json", "discriminator/file/zarr.json", "discriminator/file/c/0", "realism/zarr.json",
            "manifest/zarr.json", "layers/conv2/unit/zarr.json"} <= files
    assert sum(f.startswith("manifest/parts/") for f in files) == 3
    for seed in range(3):
        got = bench.flip_every_file(swept[1], tmp_path, seed=seed)
        assert got["files"] == len(files) and got["silent"] == 0, {k: v for k, v in got["outcome"].items() if v != "found"}
        assert got["found"] >= len(files) - 2  # a flip in JSON whitespace may be harmless; data flips never are


def test_a_realism_record_whose_seal_key_is_damaged_is_not_read_as_an_old_unsealed_one(copy):
    """A flipped byte in the seal's key name leaves a record with no seal: in a layout-2 store every
    record was written sealed, so verify names it and readers ignore it (it was once silent)."""
    path = Path(copy) / "realism" / "zarr.json"
    meta = json.loads(path.read_text())
    assert "sha256" in meta["attributes"]
    meta["attributes"]["sha2r6"] = meta["attributes"].pop("sha256")
    path.write_text(json.dumps(meta))
    res = invoke("verify", copy, "--json")
    assert res.exit_code != 0 and "realism record is damaged" in res.output
    assert ls.open_store(copy).realism() is None


def test_a_discriminator_killed_before_its_record_is_incomplete(swept, tmp_path):
    """A D SIGKILLed between its bytes and its record (real run) is never trusted, and verify names it.

    SIGKILL after the discriminator's bytes, before its record (the commit): no reader trusts
    it, and verify names it."""
    spec, original, env = swept
    url = tmp_path / "k.zarr"
    out = cli("run", spec, "--store", url, env=env, cwd=tmp_path, **{FAILPOINTS: "discriminator.before-record=kill"})
    assert out.returncode == -9, out.stderr
    out = invoke("verify", url)
    assert out.exit_code == 1 and "the stored discriminator is incomplete" in out.output
    assert ls.open_store(str(url)).discriminator_info() is None  # the next run makes it again: see the full-disk test


def test_a_flipped_discriminator_bit_is_found_and_repair_plus_run_restores_the_sweep(swept, copy, tmp_path):
    """A flipped bit in the stored D and a corrupt block are found; verify --repair plus run restores the sweep.

    Case 2 of the issue: a flipped bit in the discriminator's bytes and a corrupt activation block."""
    spec, original, env = swept
    flip(Path(copy, "discriminator", "file", "c", "0"))
    st = ls.open_store(copy)
    assert st.discriminator_state()[0] == "corrupt"
    with pytest.raises(ls.StoreError, match="discriminator.*corrupt.*ldam-sweep run SPEC"):
        st.discriminator_bytes()  # every load checks it: workers, find, compare
    flip(Path(copy, "layers", "conv2", "activation", "c", "1", "0", "0"))
    out = invoke("verify", copy)
    assert out.exit_code == 1
    assert "discriminator: the stored discriminator is corrupt: its bytes do not match" in out.output
    assert "layer 'conv2' block 1: checksum mismatch" in out.output
    out = invoke("verify", copy, "--repair")
    assert out.exit_code == 1 and "repaired: discriminator: removed" in out.output and "4 units marked corrupt" in out.output
    out = cli("run", spec, "--store", copy, "--no-realism", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "the stored discriminator is absent" not in out.stderr and "2 of 3 blocks already committed, 1 to run" in out.stderr
    assert invoke("verify", copy).exit_code == 0
    assert_equal_stores(original, copy)
    # made again where it comes out different (another machine, thread count): refused, naming --fresh
    flip(Path(copy, "discriminator", "file", "c", "0"))
    torch.set_num_threads(1)  # the fixture trained on 2 (conftest restores the pool after the test)
    out = invoke("run", spec, "--store", copy)  # in-process: refused in stage 1, before Ray would start
    if "is not the one the committed units" not in out.output:
        pytest.skip("training on 1 thread gave the same weights here")
    assert out.exit_code == 1 and "the stored discriminator is corrupt" in out.output
    line = one_line_error(out.output)
    assert "--fresh" in line and "cannot be completed consistently" in line


def test_damaged_metadata_and_parts_are_rebuilt_and_repair_is_one_commit(swept, copy, tmp_path):
    """Damaged zarr.json files and a flipped manifest part are found, refused by run, and rebuilt in one repair commit.

    Cases 3 and 4: garbage in the root's, the layers group's, a layer group's and an array's
    zarr.json, a flipped manifest part (conv2 block 1's rows) and corrupt blocks in two layers.
    verify finds each; `run` refuses in one line; a repair SIGKILLed before its commit publishes
    nothing; the next repair rebuilds the metadata from the plan (the root from its copy), sets the
    part aside, and publishes both layers' tombstones in one part; run then redoes the rest."""
    spec, original, env = swept
    for rel in ("zarr.json", "layers/zarr.json", "layers/conv2/zarr.json", "layers/conv2/samples/zarr.json"):
        Path(copy, rel).write_text("garbage{")
    block1 = [p for p in Path(copy, "manifest", "parts", "layer=conv2").glob("part-*.parquet")
              if set(pq.read_table(p)["block"].to_pylist()) == {1}]
    assert len(block1) == 1
    flip(block1[0], at=0.3)
    flip(Path(copy, "layers", "conv2", "samples", "c", "0", "0", "0", "0", "0", "0"), at=0.3)
    flip(Path(copy, "layers", "fc2", "activation", "c", "0", "0", "0"), at=0.4)

    out = invoke("status", copy)  # readers refuse a damaged root and say what repairs it
    assert out.exit_code == 1 and "verify" in out.output and "--repair" in out.output
    out = invoke("run", spec, "--store", copy)
    assert out.exit_code == 1 and "damaged" in one_line_error(out.output) and "--repair" in out.output
    out = invoke("verify", copy)
    assert out.exit_code == 1 and "zarr.json: the root metadata is damaged" in out.output

    def parts() -> set[str]:
        return {str(p) for p in Path(copy, "manifest", "parts").rglob("part-*.parquet")}

    before = parts()
    out = cli("verify", copy, "--repair", env=env, cwd=tmp_path, **{FAILPOINTS: "repair.before-commit=kill"})
    assert out.returncode == -9
    assert parts() == before - {str(block1[0])}  # the damaged part was set aside; no tombstone was published
    assert {r["status"] for r in ls.open_store(copy).units(status=None).to_pylist()} == {"ok"}
    out = invoke("verify", copy, "--repair")
    assert out.exit_code == 1, out.output
    for rel in ("zarr.json: restored from its copy", "layers/zarr.json: rebuilt from the plan",
                "layers/conv2/zarr.json: rebuilt", "layers/conv2/samples/zarr.json: rebuilt"):
        assert f"repaired: {rel}" in out.output or "problem: " + rel.split(":")[0] not in out.output, out.output
    assert "8 units marked corrupt (one commit)" in out.output
    assert list(Path(copy, "quarantine").rglob("part-*.parquet")) and not block1[0].exists()
    new = parts() - before
    assert len(new) == 1 and "/layer=" not in new.pop()  # one part, at the top: both layers' rows
    assert {d["name"]: d["corrupt"] for d in ls.open_store(copy).layers()} == {"conv2": 4, "fc2": 4}
    out = cli("run", spec, "--store", copy, "--no-realism", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "0 of 3 blocks already committed, 3 to run" in out.stderr
    assert invoke("verify", copy).exit_code == 0
    assert_equal_stores(original, copy)


def test_readers_mark_corrupt_and_unverified_units(swept, copy, tmp_path):
    """Case 5: query, status and the atlas never show a corrupt block's stale scores as plain ok."""
    from ldam_sweep.atlas.site import slug

    before = invoke("query", copy, "--json")
    assert {u["integrity"] for u in json.loads(before.output)["units"]} == {"unverified"}
    assert "not been verified" in invoke("status", copy).output
    flip(Path(copy, "layers", "fc2", "activation", "c", "0", "0", "0"), at=0.4)
    assert invoke("verify", copy).exit_code == 1  # writes what it found for readers (verify.json)
    units = json.loads(invoke("query", copy, "--json").output)["units"]
    marks = {(u["layer"], u["unit"]): u["integrity"] for u in units}
    assert {m for (layer, _), m in marks.items() if layer == "fc2"} == {"corrupt"}
    assert {m for (layer, _), m in marks.items() if layer == "conv2"} == {"verified"}
    table = invoke("query", copy, "--layer", "fc2").output
    assert "corrupt" in table and "verify" in table
    status = invoke("status", copy)
    assert "4 units in corrupt blocks" in " ".join(status.output.split()), status.output
    out = invoke("atlas", copy, "-o", tmp_path / "atlas")
    assert out.exit_code == 0, out.output
    page = (tmp_path / "atlas" / "units" / slug("fc2") / "1.html").read_text()
    assert "corrupt" in page and "--repair" in page
    # a reader that finds a corrupt block marks it at once, before any verify
    other = tmp_path / "other.zarr"
    shutil.copytree(swept[1], other)
    flip(other / "layers" / "conv2" / "activation" / "c" / "0" / "0" / "0", at=0.4)
    st = ls.open_store(str(other))
    with pytest.raises(ls.StoreError):
        st.samples("conv2", 1)
    assert st.units("conv2")["integrity"].to_pylist() == ["corrupt"] * 4 + ["unverified"] * 4  # block 0, block 1


@pytest.mark.fast
def test_spec_errors_are_one_line_with_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {zoo: digits-cnn\nlayers: [fc2]\n")
    out = invoke("run", bad, "--store", tmp_path / "s.zarr")
    assert out.exit_code == 2
    assert "is not valid YAML: line 3, column 7: expected ',' or '}'" in one_line_error(out.output)
    for field, value, allowed in (("chains", 0, "greater than or equal to 1"), ("steps", -1, "greater than or equal to 1"),
                                  ("lam", 2, "less than or equal to 1")):
        doc = json.loads(json.dumps(SWEEP_SPEC))
        doc["sampler"][field] = value
        bad.write_text(yaml.safe_dump(doc))
        out = invoke("run", bad, "--store", tmp_path / "s.zarr")
        assert out.exit_code == 2
        assert f"sampler.{field}: Input should be {allowed} (got {value})" in one_line_error(out.output)
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 216 KiB tmpfs (needs root and a sandbox that allows mounts): the store's metadata fits
    (180 KiB of tmpfs pages for SWEEP_SPEC's store, coordinates included), the discriminator (56 KiB) does not."""
    with mounted_tmpfs(tmp_path / "fs", "216k") as mnt:
        yield mnt


def test_a_full_disk_in_stage_1_exits_4_and_the_next_run_makes_the_discriminator_again(swept, tiny_fs, tmp_path):
    """A disk that fills while stage 1 writes the D exits 4; the next run makes the D again (real tmpfs).

    Case 1 of the issue on a real tmpfs: exit 4 (not 2) with one line, no stray temp file; after
    the disk grows, verify names the half-written discriminator, and the next run neither trusts it
    nor fails on it: it makes it again, and the store equals an uninterrupted run."""
    spec, original, env = swept
    url = tiny_fs / "s.zarr"
    out = invoke("run", spec, "--store", url)  # in-process: stage 1 fails before Ray would start
    assert out.exit_code == 4, out.output
    line = one_line_error(out.output)
    assert "No space left on device" in line and "discriminator (stage 1)" in line and "rerun the same command" in line
    assert not [p for p in tiny_fs.rglob("*") if p.name.endswith(".tmp")]
    assert ls.open_store(str(url)).discriminator_info() is None
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_fs)], check=True)
    out = invoke("verify", url)
    assert out.exit_code == 1 and "the stored discriminator is incomplete" in out.output
    out = cli("run", spec, "--store", url, "--no-realism", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "the stored discriminator is incomplete" in out.stderr and "UnpicklingError" not in out.stderr
    assert invoke("verify", url).exit_code == 0
    assert_equal_stores(original, str(url))


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_ray_head_that_disappears_mid_run_exits_3_and_leaves_nothing_running(swept, tmp_path):
    """A Ray head that dies mid-run: the driver exits 3 in one line, releases the lease, leaves no Ray process.

    Case 5: the GCS killed while a block runs. Ray's client would end the driver after 60 s with
    exit 1 and its own message; the driver stops first: one line, exit 3, the lease released, none
    of the Ray processes it started still running (resuming is the same as after any stop)."""
    import os
    import signal
    import tempfile
    import time

    from ldam_sweep.failpoints import HOLD_BLOCKS_ENV, SIGNAL_DIR_ENV
    from ldam_sweep.store.lease import read_lease

    spec, _, env = swept
    signals, ray_tmp = tmp_path / "signals", Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    signals.mkdir()
    url = tmp_path / "h.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "ldam_sweep.cli", "run", str(spec), "--store", str(url)], cwd=tmp_path,
                            env={**env, "COLUMNS": "400", "RAY_TMPDIR": str(ray_tmp), "LDAM_SWEEP_HEAD_LOST_AFTER": "3",
                                 HOLD_BLOCKS_ENV: "conv2:1", SIGNAL_DIR_ENV: str(signals)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (signals / "held-conv2-1").exists():  # a block is running: Ray is up and working
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        ours = descendants(proc.pid)
        gcs = [p for p in ours if b"gcs_server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(gcs) == 1 and read_lease(str(url)) is not None
        os.kill(gcs[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 3, err
    line = one_line_error(err)
    assert "the Ray head" in line and "rerun the same command" in line and "Failed to connect to GCS" not in err
    assert read_lease(str(url)) is None
    assert not [p for p in ours if alive(p)]
