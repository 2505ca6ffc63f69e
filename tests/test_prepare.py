"""ivpt data prepare / check: VTAB-1k, FGVC and ADE20K folders laid out here in their real formats, at the
published split sizes where sizes are checked (8x8 images), from a Hub cache, archives and folders."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import lay_out_hub_repo

from ivpt.cli import main
from ivpt.data import fgvc
from ivpt.data.check import (ADE20K_SIZES, FGVC_SPLIT_SIZES, VTAB_TEST_SIZES, VTAB_TRAIN_SIZES, check_folder,
                             check_vtab_task)
from ivpt.data.datasets import DataError
from ivpt.data.prepare import prepare_fgvc, prepare_vtab, vtab_task_for
from ivpt.data.vtab import VTAB_TASKS

TASKS = ("dtd", "kitti")  # 47 and 4 classes; the smallest test splits (1,880 and 711)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


BASES = [_jpeg(seed) for seed in range(16)]


def unique_jpeg(number: int) -> bytes:
    """A real 8x8 JPEG whose bytes no other file shares: a comment segment (COM) numbered after SOI."""
    base, note = BASES[number % len(BASES)], f"file {number}".encode()
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


def vtab_task_files(task: str, folder: str, start: int = 0) -> dict[str, bytes]:
    """One task in the processed layout at VTAB-1k's real sizes: list files and images/<split>/NNNNNN.jpg."""
    classes = VTAB_TASKS[task][0]
    files, lists, number = {}, {}, start
    for split, count in (("train800", 800), ("val200", 200), ("test", VTAB_TEST_SIZES[task])):
        lines = []
        for i in range(count):
            rel = f"images/{split}/{i:06d}.jpg"
            files[f"{folder}/{rel}"] = unique_jpeg(number)
            lines.append(f"{rel} {i % classes}")
            number += 1
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        files[f"{folder}/{split}.txt"] = ("\n".join(lines) + "\n").encode()
    return files


@pytest.fixture(scope="module")
def vtab_files() -> dict[str, bytes]:
    """dtd and kitti as the shared archive holds them (top vtab-1k/ folder), in memory; tests write variants."""
    files = {}
    for offset, task in enumerate(TASKS):
        files.update(vtab_task_files(task, f"vtab-1k/{task}", start=100_000 * offset))
    return files


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def only(files: dict, task: str) -> dict:
    return {k: v for k, v in files.items() if k.startswith(f"vtab-1k/{task}/")}


# -- VTAB-1k -------------------------------------------------------------------------------------
def test_default_hub_source_read_offline_from_the_cache(vtab_files, tmp_path):
    """No --from: the default dataset repository's vtab-1k.zip, read from a Hub cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    archive = write_zip(tmp_path / "vtab-1k.zip", vtab_files).read_bytes()
    commit = lay_out_hub_repo(cache, "XiN0919/VTAB-1k", {"vtab-1k.zip": archive, "README.md": b"# VTAB-1k\n"},
                              "vtab", ["main"], repo_type="dataset")
    env = {**ENV, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "data"
    calls = [["data", "prepare", "vtab-1k", "--out", str(out), "--tasks", "dtd,kitti", "--workers", "1"],
             ["data", "prepare", "vtab-1k", "--from", "hf-hub:someone/absent", "--out", str(tmp_path / "x")]]
    code = f"import sys; from ivpt.cli import main; print([main(a) for a in {calls!r}])"  # one interpreter for both
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[0, 1]", done.stderr[-3000:]
    assert "someone/absent" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    manifest = json.loads((out / "ivpt-data.json").read_text())
    assert manifest["kind"] == "vtab-1k" and manifest["source"] == "hf-hub:XiN0919/VTAB-1k"
    assert manifest["revision"] == [commit]
    for task in TASKS:
        record = manifest["tasks"][task]
        assert record["counts"] == {**VTAB_TRAIN_SIZES, "test": VTAB_TEST_SIZES[task]}
        assert record["formats"] == ["JPEG"] and record["lossless"] is False
        assert record["list_sha256"]["test.txt"] == hashlib.sha256(vtab_files[f"vtab-1k/{task}/test.txt"]).hexdigest()
        assert (out / task / "images" / "test" / "000000.jpg").read_bytes() == \
            vtab_files[f"vtab-1k/{task}/images/test/000000.jpg"]
    assert sorted(manifest["missing"]) == sorted(set(VTAB_TASKS) - set(TASKS))
    assert not (out / ".partial" / "dtd").exists()


def test_spellings_of_other_codebases_in_a_tar_gz(vtab_files, tmp_path):
    """PETL_Vision's processed_vtab-<task> folders at the archive's top, in a .tar.gz, become ivpt's names."""
    renamed = {k.replace("vtab-1k/", "processed_vtab-"): v for k, v in vtab_files.items()}
    manifest = prepare_vtab(str(write_tar(tmp_path / "vtab.tar.gz", renamed)), tmp_path / "out", TASKS, workers=1)
    assert sorted(manifest["tasks"]) == sorted(TASKS)
    assert manifest["tasks"]["kitti"]["folder_in_source"] == "processed_vtab-kitti"
    assert all(r.ok for r in check_folder(tmp_path / "out", workers=2))  # decoded in two processes
    assert vtab_task_for("cifar100") == vtab_task_for("processed_vtab-cifar") == "cifar"
    assert vtab_task_for("smallnorb-azi") == "smallnorb_azi" and vtab_task_for("imagenet") is None


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_truncated_archive_is_named_and_nothing_is_placed(vtab_files, tmp_path, kind):
    writer = write_zip if kind == "zip" else write_tar
    path = writer(tmp_path / f"vtab.{kind}", only(vtab_files, "kitti"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match=r"vtab\.(zip|tar\.gz) is incomplete or damaged.*download it again"):
        prepare_vtab(str(path), tmp_path / "out", ["kitti"], workers=1)
    assert not (tmp_path / "out" / "kitti").exists()


def test_a_missing_task_is_named_and_a_rerun_adds_it(vtab_files, tmp_path):
    out = tmp_path / "out"
    partial = write_zip(tmp_path / "some.zip", only(vtab_files, "dtd"))
    with pytest.raises(DataError, match=r"lacks 1 of the 2 tasks asked for: kitti"):
        prepare_vtab(str(partial), out, TASKS, workers=1)
    manifest = json.loads((out / "ivpt-data.json").read_text())
    assert list(manifest["tasks"]) == ["dtd"] and "kitti" in manifest["missing"] and "kitti" in manifest["incomplete"]
    kept = (out / "dtd" / "ivpt-task.json").stat().st_mtime_ns
    manifest = prepare_vtab(str(write_zip(tmp_path / "rest.zip", only(vtab_files, "kitti"))), out, TASKS, workers=1)
    assert sorted(manifest["tasks"]) == sorted(TASKS) and not manifest["incomplete"]
    assert (out / "dtd" / "ivpt-task.json").stat().st_mtime_ns == kept  # verified once, never redone


def _prepare_kitti(files: dict, tmp_path: Path, **options) -> str:
    """Prepare kitti from a folder source holding ``files``; the DataError's text (the test expects one)."""
    source = write_folder(tmp_path / "src", only(files, "kitti"))
    with pytest.raises(DataError) as err:
        prepare_vtab(str(source / "vtab-1k"), tmp_path / "out", ["kitti"], workers=1, **options)
    assert not (tmp_path / "out" / "kitti").exists()  # a task that failed never reads as whole
    return str(err.value)


def test_a_list_line_naming_a_missing_file(vtab_files, tmp_path):
    files = dict(vtab_files)
    del files["vtab-1k/kitti/images/val200/000007.jpg"]
    message = _prepare_kitti(files, tmp_path)
    assert "kitti [val200]" in message and "images/val200/000007.jpg" in message and "does not exist" in message


def test_an_undecodable_image(vtab_files, tmp_path):
    files = dict(vtab_files)
    files["vtab-1k/kitti/images/test/000100.jpg"] = files["vtab-1k/kitti/images/test/000100.jpg"][:300]
    message = _prepare_kitti(files, tmp_path)
    assert "kitti [test]" in message and "images/test/000100.jpg" in message and "cannot be decoded" in message


def test_a_test_image_duplicated_in_train(vtab_files, tmp_path):
    files = dict(vtab_files)
    files["vtab-1k/kitti/images/test/000042.jpg"] = files["vtab-1k/kitti/images/train800/000003.jpg"]
    message = _prepare_kitti(files, tmp_path)
    assert "images/test/000042.jpg" in message and "same bytes as images/train800/000003.jpg" in message
    assert "--allow-duplicates kitti" in message
    manifest = prepare_vtab(str(tmp_path / "src" / "vtab-1k"), tmp_path / "out", ["kitti"], workers=1,
                            allow_duplicates=["kitti"])
    assert manifest["tasks"]["kitti"]["duplicates_with_train"] == 1
    assert check_folder(tmp_path / "out")[0].ok  # let through when prepared, so let through when checked again
    assert not check_folder(tmp_path / "src" / "vtab-1k")[0].ok  # the same files, never let through


def test_a_class_absent_from_train800val200(vtab_files, tmp_path):
    files = dict(vtab_files)
    for split in ("train800", "val200", "train800val200"):  # class 3 relabelled 2 wherever it is trained on
        text = files[f"vtab-1k/kitti/{split}.txt"].decode()
        files[f"vtab-1k/kitti/{split}.txt"] = text.replace(" 3\n", " 2\n").encode()
    message = _prepare_kitti(files, tmp_path)
    assert "kitti [train800val200]" in message and "class(es) 3 never occur" in message


def test_sun397_records_its_class_coverage_instead_of_requiring_it(tmp_path):
    """1,000 images drawn from 397 unevenly sized classes miss some by chance (about 32 on average): the
    genuine split would fail a 'every class' rule, so SUN397 records how many classes it trains on."""
    files = {}
    for split, count in (("train800", 800), ("val200", 200), ("test", 10)):
        lines = [f"images/{split}/{i:06d}.jpg {i % 300}" for i in range(count)]
        first = {"train800": 0, "val200": 800, "test": 1000}[split]
        files.update({f"sun397/{line.split()[0]}": unique_jpeg(first + i) for i, line in enumerate(lines)})
        files[f"sun397/{split}.txt"] = ("\n".join(lines) + "\n").encode()
        if split == "val200":
            files["sun397/train800val200.txt"] = files["sun397/train800.txt"] + files["sun397/val200.txt"]
    root = write_folder(tmp_path, files)
    report = check_vtab_task(root / "sun397", "sun397", expect={("sun397", "test"): 10})
    assert report.ok and report.classes_trained == 300 and report.record()["classes_in_train"] == 300
    assert not check_vtab_task(root / "sun397", "sun397").ok  # the real test size is still required


def test_a_split_of_another_size_is_refused_with_the_way_forward(vtab_files, tmp_path):
    files = dict(vtab_files)
    lines = files["vtab-1k/kitti/test.txt"].decode().splitlines()[:500]
    files["vtab-1k/kitti/test.txt"] = ("\n".join(lines) + "\n").encode()
    message = _prepare_kitti(files, tmp_path)
    assert "500 images, expected 711" in message and "--expect kitti:test=500" in message
    manifest = prepare_vtab(str(tmp_path / "src" / "vtab-1k"), tmp_path / "out", ["kitti"], workers=1,
                            expect={("kitti", "test"): 500})
    assert manifest["tasks"]["kitti"]["counts"]["test"] == 500


def test_a_killed_preparation_never_leaves_a_half_task_and_a_rerun_finishes(vtab_files, tmp_path):
    source, out = write_zip(tmp_path / "vtab-1k.zip", vtab_files), tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "ivpt.cli", "data", "prepare", "vtab-1k", "--from", str(source),
                                "--out", str(out), "--tasks", "dtd", "kitti", "--workers", "1"], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "dtd").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # the first task is in place, the second under way
    assert process.wait() == -signal.SIGKILL, "the preparation ended before it could be killed"
    assert not (out / "ivpt-data.json").exists() and not (out / "kitti").exists()
    assert check_vtab_task(out / "dtd", "dtd").ok
    first = (out / "dtd" / "ivpt-task.json").stat().st_mtime_ns
    manifest = prepare_vtab(str(source), out, TASKS, workers=1)
    assert sorted(manifest["tasks"]) == sorted(TASKS)
    assert (out / "dtd" / "ivpt-task.json").stat().st_mtime_ns == first
    assert not (out / ".partial" / "kitti").exists()


# -- data check ----------------------------------------------------------------------------------
def test_data_check_on_a_prepared_folder_and_after_an_edit(vtab_files, tmp_path, capsys):
    source = write_folder(tmp_path / "src", vtab_files) / "vtab-1k"
    out = tmp_path / "out"
    assert main(["data", "prepare", "vtab-1k", "--from", str(source), "--out", str(out), "--workers", "1",
                 "--tasks", "kitti"]) == 0
    assert main(["data", "check", str(out), "--workers", "1"]) == 0
    table = capsys.readouterr().out
    assert "kitti" in table and "711" in table and "ok" in table
    with open(out / "kitti" / "val200.txt", "a") as handle:  # an edit after preparation
        handle.write("images/train800/000001.jpg 1\n")
    assert main(["data", "check", str(out), "--workers", "1"]) == 1
    errors = capsys.readouterr().err
    assert "FAIL kitti [val200]" in errors and "201 images, expected 200" in errors
    assert "changed since ivpt data prepare verified it" in errors


def test_data_check_on_a_hand_made_vtab_folder(vtab_files, tmp_path, capsys):
    files = {k.replace("vtab-1k/", ""): v for k, v in only(vtab_files, "kitti").items()}
    del files["kitti/images/train800/000011.jpg"]
    root = write_folder(tmp_path / "mine", files)
    assert main(["data", "check", str(root), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert f"FAIL kitti [train800] {root / 'kitti' / 'images/train800/000011.jpg'}" in captured.err
    (root / "kitti").rename(root / "cifar100")  # another codebase's spelling: ivpt reads its own names
    assert main(["data", "check", str(root), "--workers", "1"]) == 1
    assert "rename it to cifar" in capsys.readouterr().err


def ade20k_layout(root: Path, counts: dict[str, int], bad_label: bool = False) -> Path:
    base = root / "ADEChallengeData2016"
    for split, count in counts.items():
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            name = f"ADE_{split[:5]}_{i:08d}"
            (base / "images" / split / f"{name}.jpg").write_bytes(unique_jpeg(i))
            labels = (np.arange(64).reshape(8, 8) + 64 * i) % 151  # 0 (other) .. 150: every class in training
            if bad_label and i == 1:
                labels[0, 0] = 200
            Image.fromarray(labels.astype(np.uint8)).save(base / "annotations" / split / f"{name}.png")
    return root


def test_data_check_on_ade20k(tmp_path, capsys):
    root = ade20k_layout(tmp_path / "ade", {"training": 6, "validation": 2})
    assert main(["data", "check", str(root), "--workers", "1"]) == 1
    errors = capsys.readouterr().err
    assert f"6 images, expected {ADE20K_SIZES['training']:,}" in errors and "--expect ade20k:training=6" in errors
    small = ["--expect", "ade20k:training=6", "--expect", "ade20k:validation=2"]
    assert main(["data", "check", str(root), "--workers", "1", *small]) == 0
    assert "ade20k" in capsys.readouterr().out
    bad = ade20k_layout(tmp_path / "bad", {"training": 6, "validation": 2}, bad_label=True)
    (bad / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_valid_00000000.png").unlink()
    assert main(["data", "check", str(bad), "--workers", "1", *small]) == 1
    errors = capsys.readouterr().err
    assert "ADE_train_00000001.png: holds label 200, expected 0 (other) to 150" in errors
    assert "ADE_valid_00000000.jpg: has no annotation" in errors


# -- FGVC ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """Oxford Flowers at VPT's real split sizes: the original archive (102flowers.tgz, jpg/image_NNNNN.jpg) and
    the re-hosted split files (json.zip with one folder per dataset), labels 1-based as in the split files."""
    root = tmp_path_factory.mktemp("flowers")
    sizes = FGVC_SPLIT_SIZES["OxfordFlower"]
    images, splits, number = {}, {}, 0
    for split in ("train", "val", "test"):
        splits[split] = {}
        for i in range(sizes[split]):
            number += 1
            images[f"102flowers/jpg/image_{number:05d}.jpg"] = unique_jpeg(number)
            splits[split][f"jpg/image_{number:05d}.jpg"] = 1 + i % 102
    archive = write_tar(root / "102flowers.tgz", images)
    return archive, splits


def json_zip(path: Path, splits: dict) -> Path:
    return write_zip(path, {f"json/OxfordFlower/{s}.json": json.dumps(items).encode() for s, items in splits.items()}
                     | {"json/CUB_200_2011/train.json": b"{}"})


def test_fgvc_prepared_from_its_archive_and_the_split_files(flowers, tmp_path):
    archive, splits = flowers
    assert main(["data", "prepare", "fgvc", "--dataset", "flowers", "--from", str(archive), "--splits",
                 str(json_zip(tmp_path / "json.zip", splits)), "--out", str(tmp_path / "fgvc"), "--workers", "1"]) == 0
    record = json.loads((tmp_path / "fgvc" / "ivpt-data.json").read_text())["tasks"]["OxfordFlower"]
    assert record["counts"] == FGVC_SPLIT_SIZES["OxfordFlower"] and record["classes"] == 102
    assert (tmp_path / "fgvc" / "OxfordFlower" / "jpg" / "image_00001.jpg").is_file()  # Flowers: images at the root
    test = fgvc(tmp_path / "fgvc", "OxfordFlower", "test")
    assert test.items[5][1] == splits["test"][test.items[5][0]] - 1  # train's ids, never renumbered per split
    assert check_folder(tmp_path / "fgvc")[0].ok


def test_fgvc_split_with_a_label_absent_from_train(flowers, tmp_path):
    archive, splits = flowers
    val = dict(splits["val"])
    val[next(iter(val))] = 500
    bad = json_zip(tmp_path / "json.zip", {**splits, "val": val})
    with pytest.raises(DataError, match=r"OxfordFlower \[val\] .*val\.json: label 500 does not occur in train\.json"):
        prepare_fgvc("OxfordFlower", [str(archive)], str(bad), tmp_path / "fgvc", workers=1)
    assert not (tmp_path / "fgvc" / "OxfordFlower").exists()


def test_the_fgvc_loader_keeps_train_ids_for_a_split_missing_a_class(tmp_path):
    """VPT's loader numbered each split's labels by those present in it; ivpt maps every split through train's."""
    base = tmp_path / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    train = {f"c{c}/a.jpg": c + 1 for c in range(200)}
    test = {f"c{c}/a.jpg": c + 1 for c in range(1, 200)}  # class 1 (the first) absent from test
    for name, items in (("train", train), ("val", train), ("test", test)):
        (base / f"{name}.json").write_text(json.dumps(items))
    labels = [label for _, label in fgvc(tmp_path, "CUB_200_2011", "test").items]
    assert labels == list(range(1, 200))


def test_unknown_names_are_bad_input_and_nothing_is_written(tmp_path, capsys):
    assert main(["data", "prepare", "vtab-1k", "--out", str(tmp_path / "v"), "--tasks", "dtd,imagenet"]) == 2
    assert "unknown VTAB-1k task 'imagenet'" in capsys.readouterr().err
    assert main(["data", "prepare", "vtab-1k", "--out", str(tmp_path / "v"), "--tasks", "cifar100", "cifar"]) == 2
    assert "cifar is asked for twice" in capsys.readouterr().err
    assert main(["data", "prepare", "fgvc", "--dataset", "birds", "--from", "x.tgz", "--out", str(tmp_path / "f")]) == 2
    assert "unknown FGVC dataset 'birds'" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "f").exists()


def test_a_second_preparation_into_the_same_folder_is_refused(vtab_files, tmp_path):
    from ivpt.engine.runlock import RunLock, RunLockedError

    with RunLock(tmp_path / "out"):  # another process preparing into it
        with pytest.raises(RunLockedError, match="in use by another ivpt process"):
            prepare_vtab(str(tmp_path / "none.zip"), tmp_path / "out", ["kitti"], workers=1)
