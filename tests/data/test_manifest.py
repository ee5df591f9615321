"""Manifest policy without Great Expectations: what each kind of file becomes."""

from __future__ import annotations

import os

import pytest

from tasks.config import ValidateConfig
from tasks.errors import StageError
from tasks.ml.manifest import (
    COLUMNS,
    OK,
    QUARANTINED,
    Reason,
    build_manifest,
    carve_test_split,
    scan_raw,
    worker_count,
)
from tests.data.images import (
    config_for,
    jpeg_bytes,
    make_raw,
    split_dir,
    write_blank,
    write_converted,
    write_truncated_jpeg,
)

MAX_PIXELS = 100_000  # small, so a bomb is a few kB
SETTINGS = ValidateConfig(min_side=16, max_pixels=MAX_PIXELS, workers=1)

# file (under train/cats) -> (status, reason prefix, format, mode)
FAULTS = {
    "truncated.jpg": (QUARANTINED, Reason.CORRUPT, "JPEG", "RGB"),
    "zero.jpg": (QUARANTINED, Reason.EMPTY, "", ""),
    "notes.txt": (QUARANTINED, Reason.NOT_IMAGE, "", ""),
    "html.jpg": (QUARANTINED, Reason.NOT_IMAGE, "", ""),
    "tiny.jpg": (QUARANTINED, Reason.TOO_SMALL, "JPEG", "RGB"),
    "bomb_warn.png": (QUARANTINED, Reason.TOO_MANY_PIXELS, "PNG", "L"),
    "bomb_error.png": (QUARANTINED, Reason.TOO_MANY_PIXELS, "PNG", "L"),
    "scan.tif": (QUARANTINED, Reason.UNSUPPORTED, "TIFF", "RGB"),
    "png_named.jpg": (OK, "", "PNG", "RGB"),
    "gray.jpg": (OK, "", "JPEG", "L"),
    "cmyk.jpg": (OK, "", "JPEG", "CMYK"),
    "rgba.png": (OK, "", "PNG", "RGBA"),
    "palette.png": (OK, "", "PNG", "P"),
    "palette.gif": (OK, "", "GIF", "P"),
}
JUNK = ("train/cats/.DS_Store", "train/cats/._cats.0.jpg", "train/Thumbs.db", "train/.hidden/x.jpg")


def write_faults(folder) -> None:
    write_truncated_jpeg(folder / "truncated.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / "html.jpg").write_text("<html><body>404 Not Found</body></html>")
    write_converted(folder / "tiny.jpg", "RGB")
    from PIL import Image

    with Image.open(folder / "tiny.jpg") as img:
        img.resize((3, 3)).save(folder / "tiny.jpg")
    write_blank(folder / "bomb_warn.png", 400, 400)  # 1.6x the limit: Pillow warns
    write_blank(folder / "bomb_error.png", 1000, 1000)  # 10x: Pillow raises
    write_converted(folder / "scan.tif", "RGB", "TIFF")
    write_converted(folder / "png_named.jpg", "RGB", "PNG")
    write_converted(folder / "gray.jpg", "L")
    write_converted(folder / "cmyk.jpg", "CMYK")
    write_converted(folder / "rgba.png", "RGBA", "PNG")
    write_converted(folder / "palette.png", "P", "PNG")
    write_converted(folder / "palette.gif", "P", "GIF")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """One tree holding every fault (decoded once), plus junk and a stray file."""
    paths, top = make_raw(tmp_path_factory.mktemp("faulty"))
    write_faults(top / "train" / "cats")
    for junk in JUNK:
        (top / junk).parent.mkdir(parents=True, exist_ok=True)
        (top / junk).write_bytes(jpeg_bytes())
    (top / "__MACOSX" / "train").mkdir(parents=True)
    (top / "train" / "README").write_text("stray file directly in a split folder")
    dataset = config_for().dataset("cats_vs_dogs")
    scan = scan_raw(paths.raw, dataset)
    return paths, top, build_manifest(scan, SETTINGS)


def row(manifest, name):
    found = manifest[manifest["path"] == f"cats_and_dogs_filtered/train/cats/{name}"]
    assert len(found) == 1, f"{name}: {len(found)} rows"
    return found.iloc[0]


@pytest.mark.parametrize("name", FAULTS)
def test_each_fault_gets_its_status_and_reason(faulty, name):
    status, reason, fmt, mode = FAULTS[name]
    got = row(faulty[2], name)
    assert (got["status"], got["format"], got["mode"]) == (status, fmt, mode)
    if status == OK:
        assert got["reason"] == ""
    else:
        assert got["reason"].startswith(reason), got["reason"]


def test_reasons_name_the_particulars(faulty):
    manifest = faulty[2]
    assert "3x3" in row(manifest, "tiny.jpg")["reason"]
    assert "truncated" in row(manifest, "truncated.jpg")["reason"]
    bomb = row(manifest, "bomb_error.png")
    assert (bomb["width"], bomb["height"]) == (1000, 1000)
    assert f"> {MAX_PIXELS}" in bomb["reason"]
    assert row(manifest, "zero.jpg")["bytes"] == 0


def test_clean_images_are_ok_with_their_facts(faulty):
    manifest = faulty[2]
    clean = manifest[manifest["path"].str.contains(r"/cats\.\d+\.jpg$|/dogs\.\d+\.jpg$")]
    assert len(clean) == 18
    assert set(clean["status"]) == {OK}
    assert set(clean["format"]) == {"JPEG"}
    assert set(clean["width"]) == {48} and set(clean["height"]) == {48}
    assert clean["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    path = faulty[0].raw / clean.iloc[0]["path"]
    assert clean.iloc[0]["bytes"] == path.stat().st_size


def test_junk_is_ignored_and_stray_files_quarantined(faulty):
    manifest = faulty[2]
    assert not manifest["path"].str.contains(r"DS_Store|Thumbs|/\._|\.hidden|MACOSX").any()
    stray = manifest[manifest["path"] == "cats_and_dogs_filtered/train/README"].iloc[0]
    assert stray["label"] == "" and stray["status"] == QUARANTINED
    assert stray["reason"].startswith(Reason.NO_CLASS)
    expected_rows = 18 + len(FAULTS) + 1
    assert len(manifest) == expected_rows


def test_manifest_shape(faulty):
    manifest = faulty[2]
    assert tuple(manifest.columns) == COLUMNS
    assert manifest["path"].is_monotonic_increasing
    assert set(manifest["split"]) == {"train", "validation"}
    assert set(manifest["label"]) == {"cats", "dogs", ""}


def test_quarantined_files_stay_on_disk(faulty):
    paths, _, manifest = faulty
    for path in manifest.loc[manifest["status"] == QUARANTINED, "path"]:
        assert (paths.raw / path).exists(), path


def test_process_pool_gives_the_same_manifest(faulty):
    paths, _, inline = faulty
    scan = scan_raw(paths.raw, config_for().dataset("cats_vs_dogs"))
    pooled = build_manifest(scan, SETTINGS.model_copy(update={"workers": 2}))
    assert pooled.equals(inline)


def test_workers_zero_means_one_per_core():
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_split_is_the_logical_name_for_renamed_folders(tmp_path):
    paths, top = make_raw(tmp_path, "ants_vs_bees")
    assert split_dir(top, "ants_vs_bees", "validation").name == "val"
    scan = scan_raw(paths.raw, config_for("ants_vs_bees").dataset("ants_vs_bees"))
    manifest = build_manifest(scan, SETTINGS)
    val = manifest[manifest["path"].str.startswith("hymenoptera_data/val/")]
    assert len(val) == 6 and set(val["split"]) == {"validation"}
    assert set(manifest["label"]) == {"ants", "bees"}
    assert scan.class_folders == {"train": ["ants", "bees"], "validation": ["ants", "bees"]}


def test_missing_raw_folder_says_run_download_first(tmp_path):
    dataset = config_for().dataset("cats_vs_dogs")
    with pytest.raises(StageError) as error:
        scan_raw(tmp_path / "data" / "raw" / "cats_vs_dogs", dataset)
    message = str(error.value)
    assert "python -m tasks download cats_vs_dogs" in message
    assert "\n" not in message


def test_missing_layout_root_names_it(tmp_path):
    raw = tmp_path / "raw"
    (raw / "something_else").mkdir(parents=True)
    with pytest.raises(StageError, match="no cats_and_dogs_filtered/ folder"):
        scan_raw(raw, config_for().dataset("cats_vs_dogs"))


def test_carving_is_stratified_by_class_and_leaves_quarantined_rows_alone(tmp_path):
    import pandas as pd

    rows = [
        {
            "path": f"v/{label}/{n}.jpg",
            "split": "validation",
            "label": label,
            "sha256": f"{(n * 7919) % 1000:064d}",
            "status": OK,
        }
        for label, count in (("cats", 10), ("dogs", 4))
        for n in range(count)
    ]
    rows.append(
        {
            "path": "v/cats/bad.jpg",
            "split": "validation",
            "label": "cats",
            "sha256": "0" * 64,
            "status": QUARANTINED,
        }
    )
    rows.append(
        {
            "path": "t/cats/0.jpg",
            "split": "train",
            "label": "cats",
            "sha256": "f" * 64,
            "status": OK,
        }
    )
    frame = pd.DataFrame(rows)
    carved = carve_test_split(frame, 0.2)
    test = carved[carved["split"] == "test"]
    assert test.groupby("label").size().to_dict() == {"cats": 2, "dogs": 1}
    # the smallest hashes of each class are held out, whatever the row order
    cats = frame[
        (frame["label"] == "cats") & (frame["status"] == OK) & (frame["split"] == "validation")
    ]
    assert set(test.loc[test["label"] == "cats", "sha256"]) == set(sorted(cats["sha256"])[:2])
    shuffled = carve_test_split(frame.sample(frac=1, random_state=3), 0.2)
    assert set(shuffled.loc[shuffled["split"] == "test", "path"]) == set(test["path"])
    assert carved.loc[carved["path"] == "v/cats/bad.jpg", "split"].item() == "validation"
    assert carved.loc[carved["path"] == "t/cats/0.jpg", "split"].item() == "train"
    assert frame["split"].eq("test").sum() == 0  # the input frame is not modified
