"""``datasets create`` on bad and awkward input (issue #30): one clear line and exit 2, or a right dataset.

The invariants every created dataset keeps: each accepted source image is in exactly one split,
byte-identical, under its own class; no two classes share a folder (ignoring case); at least two
classes. The property tests generate trees and CSVs (punctuation, case, unicode, spaces, repeated
file names, nesting, links) and check them, or that the input is refused with one line and the
data root is left as it was.
"""

import contextlib
import csv
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alignednorm.cli import main
from alignednorm.data import catalog, custom
from alignednorm.data.custom import CATALOG_FILE, IMAGE_SUFFIXES, SPLITS, _normalise, create_dataset
from alignednorm.errors import DataError


@contextlib.contextmanager
def _fresh_registry():
    """Datasets created here register in the process-wide catalog: put it back as it was."""
    saved = dict(catalog._REGISTRY)
    try:
        yield
    finally:
        catalog._REGISTRY.clear()
        catalog._REGISTRY.update(saved)


@pytest.fixture(autouse=True)
def _restore_catalog():
    with _fresh_registry():
        yield


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the console entry point as a user would: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["alignednorm", *[str(a) for a in args]])
    with pytest.raises(SystemExit) as stop:
        main()
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def _refused(monkeypatch, capsys, *args) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    code, out, err = _cli(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    return lines[0]


def _images(folder: Path, names, start=0) -> list[bytes]:
    """Write distinct small "images" (the command copies bytes; it never decodes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for k, name in enumerate(names, start=start):
        content = f"image {folder / name} {k}".encode()
        (folder / name).write_bytes(content)
        data.append(content)
    return data


def _dataset(data: Path, name: str) -> dict[str, list]:
    return json.loads((data / name / f"split_{name}.json").read_text())


def _contents(data: Path, name: str) -> Counter:
    """(bytes, class name, split) of every listed image, counted."""
    split = _dataset(data, name)
    return Counter((((data / name / "images" / rel).read_bytes(), cls, s)) for s in SPLITS for rel, _, cls in split[s])


def _two_classes(src: Path) -> dict[str, set[bytes]]:
    return {c: set(_images(src / c, [f"{i}.png" for i in range(4)])) for c in ("cat", "dog")}


# --- 1. re-creating a dataset from its own images ----------------------------------------------------


def test_recreate_from_own_images_keeps_everything(tmp_path, monkeypatch, capsys):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    expected = _two_classes(src)
    assert _cli(monkeypatch, capsys, "datasets", "create", "selfre", "--from", src, "--data-root", data)[0] == 0
    code, out, err = _cli(monkeypatch, capsys, "datasets", "create", "selfre", "--from", data / "selfre" / "images",
                          "--force", "--data-root", data, "--seed", 2)
    assert code == 0 and "2 classes (train 4, val 2, test 2 images)" in out, err
    assert sorted(os.listdir(data)) == [CATALOG_FILE, "selfre"]  # no build or old folder left behind
    got = _contents(data, "selfre")
    assert {(content, cls) for content, cls, _ in got} == {(b, c) for c, bs in expected.items() for b in bs}
    assert max(got.values()) == 1
    entries = json.loads((data / CATALOG_FILE).read_text())["datasets"]
    assert [e["name"] for e in entries] == ["selfre"]


def test_recreate_keeps_the_recorded_class_names(tmp_path):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    for name in ("C++", "golden retriever"):
        _images(src / name, [f"{i}.png" for i in range(3)])
    create_dataset("names", data, source=src)
    report = create_dataset("names", data, source=data / "names" / "images", overwrite=True)
    assert {cls for s in SPLITS for _, _, cls in _dataset(data, "names")[s]} == {"C++", "golden retriever"}
    assert report.notes == [f"class names as recorded in {data / 'names' / 'split_names.json'}"]


def test_failed_rebuild_leaves_the_old_dataset(tmp_path, monkeypatch):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    _two_classes(src)
    create_dataset("mine", data, source=src)
    before = {p: p.read_bytes() for p in (data / "mine").rglob("*") if p.is_file()}
    calls, place = [], custom._place

    def disk_full_after_three(image, target):
        calls.append(image)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        place(image, target)

    monkeypatch.setattr(custom, "_place", disk_full_after_three)
    with pytest.raises(DataError, match=r"could not write the dataset .*No space left.*nothing was replaced"):
        create_dataset("mine", data, source=data / "mine" / "images", overwrite=True, seed=3)
    assert {p: p.read_bytes() for p in (data / "mine").rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(data)) == [CATALOG_FILE, "mine"]


def test_a_folder_not_made_by_create_is_never_replaced(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    _two_classes(data / "photos")
    line = _refused(monkeypatch, capsys, "datasets", "create", "photos", "--from", data / "photos", "--force",
                    "--data-root", data)
    assert "photos already exists and is not a dataset recorded in" in line
    assert len(list((data / "photos").rglob("*.png"))) == 8


# --- 2. silently wrong datasets -----------------------------------------------------------------------


def test_same_file_names_in_sub_folders_stay_apart(tmp_path, monkeypatch, capsys):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    expected = set()
    for cls in ("cat", "dog"):
        for sub in ("2020", "2021", "2022"):
            expected |= {(b, cls) for b in _images(src / cls / sub, ["x.png"], start=int(sub))}
    code, _, err = _cli(monkeypatch, capsys, "datasets", "create", "years", "--from", src, "--data-root", data)
    assert code == 0, err
    assert "note: class 'cat' includes the images of its sub-folders 2020, 2021, 2022 as one class" in err
    got = _contents(data, "years")
    assert {(b, c) for b, c, _ in got} == expected and sum(got.values()) == 6 and max(got.values()) == 1


def test_symlink_loop_is_skipped_and_said(tmp_path, monkeypatch, capsys):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    expected = _two_classes(src)
    (src / "all").symlink_to(".")
    code, _, err = _cli(monkeypatch, capsys, "datasets", "create", "looped", "--from", src, "--data-root", data)
    assert code == 0 and "all: a link to" in err and "would read images twice or loop" in err
    assert _dataset(data, "looped")["train"] and {c for _, c, _ in _contents(data, "looped")} == set(expected)


def test_one_file_in_two_classes_is_refused(tmp_path, monkeypatch, capsys):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    _two_classes(src)
    (src / "kitty").symlink_to("cat")
    line = _refused(monkeypatch, capsys, "datasets", "create", "twice", "--from", src, "--data-root", data)
    assert "kitty/0.png is the same file as" in line and "class 'kitty' and in class 'cat'" in line
    assert os.listdir(data) == []


def test_nested_class_folders_are_said_and_one_class_is_refused(tmp_path, monkeypatch, capsys):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    _two_classes(src / "animals")
    line = _refused(monkeypatch, capsys, "datasets", "create", "nested", "--from", src, "--data-root", data)
    assert "found 1 class ('animals'); a classifier needs at least 2 classes" in line
    assert f"if the sub-folders of 'animals' (cat, dog) are the classes, pass --from {src / 'animals'}" in line


def test_class_names_that_clean_to_one_folder_get_two(tmp_path):
    src, data = tmp_path / "photos", tmp_path / "data"
    data.mkdir()
    names = ("C++", "C#", "a,b", "a b!", "猫", "犬")
    for name in names:
        _images(src / name, [f"{i}.png" for i in range(3)])
    create_dataset("odd", data, source=src)
    split = _dataset(data, "odd")
    folders = {cls: {rel.split("/")[0] for s in SPLITS for rel, _, c in split[s] if c == cls} for cls in names}
    assert all(len(f) == 1 for f in folders.values())
    assert len({next(iter(f)).casefold() for f in folders.values()}) == len(names)
    assert {next(iter(folders["猫"])), next(iter(folders["犬"]))} == {"猫", "犬"}


def test_csv_repeated_rows_count_once_and_conflicts_are_refused(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _two_classes(tmp_path / "photos")
    rows = [f"photos/{c}/{i}.png,{c}" for c in ("cat", "dog") for i in range(4)]
    (tmp_path / "list.csv").write_text("\n".join(["path,label", *rows, "./photos/cat/0.png,cat"]) + "\n")
    code, out, err = _cli(monkeypatch, capsys, "datasets", "create", "rep", "--from-csv", tmp_path / "list.csv",
                          "--data-root", data)
    assert code == 0 and "line 10: repeats line 2" in err and "train 4, val 2, test 2" in out
    (tmp_path / "bad.csv").write_text("path,label,split\nphotos/cat/0.png,cat,train\nphotos/cat/0.png,cat,test\n")
    line = _refused(monkeypatch, capsys, "datasets", "create", "rep2", "--from-csv", tmp_path / "bad.csv",
                    "--data-root", data)
    assert "bad.csv line 3:" in line and "same image as on line 2" in line and "one class and one split" in line


def test_csv_with_an_unquoted_comma_is_refused(tmp_path, monkeypatch, capsys):
    _two_classes(tmp_path / "photos")
    (tmp_path / "list.csv").write_text("path,label\nphotos/cat/0.png,golden, retriever\n")
    line = _refused(monkeypatch, capsys, "datasets", "create", "comma", "--from-csv", tmp_path / "list.csv",
                    "--data-root", tmp_path)
    assert "list.csv line 2: 3 fields where the header has 2 columns; quote a value that holds a comma" in line


# --- 4. one class; 5. byte-order mark -----------------------------------------------------------------


@pytest.mark.parametrize("from_csv", [False, True])
def test_one_class_is_refused_up_front(tmp_path, monkeypatch, capsys, from_csv):
    _images(tmp_path / "photos" / "cat", [f"{i}.png" for i in range(5)])
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"photos/cat/{i}.png,cat\n" for i in range(5)))
    source = ["--from-csv", tmp_path / "list.csv"] if from_csv else ["--from", tmp_path / "photos"]
    line = _refused(monkeypatch, capsys, "datasets", "create", "solo", *source, "--data-root", tmp_path)
    assert "found 1 class ('cat'); a classifier needs at least 2 classes, and base-to-new at least 2" in line
    assert not (tmp_path / CATALOG_FILE).exists() and not (tmp_path / "solo").exists()


def test_csv_with_byte_order_mark(tmp_path):
    expected = _two_classes(tmp_path / "photos")
    rows = "".join(f"photos/{c}/{i}.png,{c}\r\n" for c in expected for i in range(4))
    (tmp_path / "list.csv").write_bytes("\ufeffPath, Label\r\n".encode() + rows.encode())
    report = create_dataset("bom", tmp_path, csv_file=tmp_path / "list.csv")
    assert report.counts == {"train": 4, "val": 2, "test": 2}


# --- 3. properties ------------------------------------------------------------------------------------

NAME = st.text(st.sampled_from("aAbB _-.,!é猫"), min_size=1, max_size=5).filter(lambda s: s not in (".", ".."))
CLASS = st.one_of(st.sampled_from(["cat", "Dog", "golden retriever", "猫", "C++", "C#", "a,b", "a b!", ".hidden"]),
                  NAME)
LABEL = st.one_of(st.sampled_from(["cat", " Dog ", "golden retriever", "猫", "C++", "C#", "a,b", 'say "hi"']),
                  st.text(st.sampled_from("aAbB _-.,'\"é猫"), min_size=1, max_size=5))
RARELY = st.sampled_from([False, False, False, True])
FILES = ("x.png", "X.png", "y.JPG", "z.jpeg", "notes.txt", ".hidden.png")
SUBS = ("", "sub", "Sub", "a/b")
REFUSALS = ("same image", "same file", "empty label", "a classifier needs", "after normalisation", "no images",
            "the split needs", "no train image", "leaves")
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_result(data: Path, expected: dict[bytes, tuple], valid: bool, run) -> None:
    """Either the dataset holds exactly ``expected`` (bytes -> (class, split or None)) or a one-line refusal."""
    try:
        run()
    except DataError as exc:
        event("refused: " + next((k for k in REFUSALS if k in str(exc)), "other"))
        assert "\n" not in str(exc) and not valid, str(exc)
        assert os.listdir(data) == [], "a refused input must leave the data root as it was"
        return
    event("created")
    assert valid, "accepted an input the model says is bad"
    split = _dataset(data, "prop")
    rels = [rel for s in SPLITS for rel, _, _ in split[s]]
    assert len(rels) == len(set(rels)) == len(expected)
    got = _contents(data, "prop")
    assert max(got.values()) == 1 and {b for b, _, _ in got} == set(expected)
    assert {b: (c, expected[b][1] and s) for b, c, s in got} == expected  # byte-identical, one class, one split
    classes = sorted({c for c, _ in expected.values()})
    assert len(classes) >= 2
    folders = {}
    for s in SPLITS:
        for rel, label, cls in split[s]:
            assert classes[label] == cls
            folders.setdefault(rel.split("/")[0].casefold(), set()).add(cls)
    assert all(len(owners) == 1 for owners in folders.values())  # two classes never share a folder


@st.composite
def trees(draw):
    classes = draw(st.lists(CLASS, min_size=draw(st.sampled_from([1, 2, 2, 2])), max_size=4, unique=True))
    files = {c: draw(st.lists(st.tuples(st.sampled_from(SUBS), st.sampled_from(FILES)), unique=True, max_size=9,
                              min_size=draw(st.sampled_from([0, 5, 5, 5])))) for c in classes}
    extras = draw(st.fixed_dictionaries({k: st.booleans() for k in ("loop", "same", "outside", "loose")}))
    extras["cross"] = draw(RARELY)
    return classes, files, extras


def _build_tree(root: Path, classes, files, extras) -> tuple[dict[bytes, tuple], bool]:
    """Write the tree under root/src and return what a right dataset holds and whether the input is good."""
    src, expected = root / "src", {}
    per_class = {cls: [] for cls in classes if not cls.startswith(".")}
    for cls in classes:
        (src / cls).mkdir(parents=True)
        for sub, name in files[cls]:
            (content,) = _images(src / cls / sub, [name])
            if cls in per_class and not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                expected[content] = (cls, None)
                per_class[cls].append(src / cls / sub / name)
    cross = False
    if extras["same"] and any(per_class.values()):
        cls, paths = next((c, p) for c, p in per_class.items() if p)
        (src / cls / "link.png").symlink_to(paths[0])
    if extras["cross"] and len(per_class) >= 2 and any(per_class.values()):
        owner, paths = next((c, p) for c, p in per_class.items() if p)
        other = next(c for c in per_class if c != owner)
        (src / other / "cross.png").symlink_to(paths[0])
        cross = True
    if extras["loop"]:
        (src / "every").symlink_to(".")
    if extras["outside"]:
        for content in _images(root / "elsewhere", ["1.png", "2.png", "3.png"]):
            expected[content] = ("outside", None)
        (src / "outside").symlink_to(root / "elsewhere")
        per_class["outside"] = [1, 2, 3]
    if extras["loose"]:
        _images(src, ["loose.png"])
    return expected, _good(per_class, 3) and not cross


def _good(per_class: dict, need: int) -> bool:
    names = [_normalise(c) for c in per_class]
    return len(per_class) >= 2 and all(len(p) >= need for p in per_class.values()) and len(set(names)) == len(names)


@PROPERTY
@given(trees())
def test_property_folder_trees(tree):
    with tempfile.TemporaryDirectory() as tmp, _fresh_registry():
        root, data = Path(tmp), Path(tmp) / "data"
        data.mkdir()
        expected, valid = _build_tree(root, *tree)
        _check_result(data, expected, valid, lambda: create_dataset("prop", data, source=root / "src"))


@st.composite
def csv_inputs(draw):
    labels = draw(st.lists(LABEL, min_size=draw(st.sampled_from([1, 2, 2, 2])), max_size=4))
    n = draw(st.integers(2, 16))
    with_split = draw(st.booleans())
    rows = [(i, draw(st.sampled_from(labels)), draw(st.sampled_from(SPLITS)) if with_split else "") for i in range(n)]
    forms = st.sampled_from(("./", "imgs/../", "abs"))
    repeats = draw(st.lists(st.tuples(st.integers(0, n - 1), RARELY.map(lambda r: not r), forms), max_size=3))
    for i, same, form in repeats:
        label, split = rows[i][1:]
        if not same:
            label, split = draw(st.sampled_from(labels)), draw(st.sampled_from(SPLITS)) if with_split else ""
        rows.append((i, label, split, form))
    return rows, with_split, draw(st.booleans())


def _csv_model(rows, with_split) -> tuple[dict[int, tuple], bool]:
    """image index -> (class, split or None) of a right dataset, and whether the CSV is good."""
    first, good = {}, all(row[1].strip() for row in rows)
    for i, label, split, *_ in rows:
        seen = first.setdefault(i, (label.strip(), split or None))
        good &= seen == (label.strip(), split or None)
    per_class = {}
    for i, (cls, split) in first.items():
        per_class.setdefault(cls, []).append(split)
    if with_split:
        good &= {split for _, split in first.values()} == set(SPLITS)
        good &= all("train" in splits for splits in per_class.values())
    return first, good and _good(per_class, 1 if with_split else 3)


@PROPERTY
@given(csv_inputs())
def test_property_csv_files(case):
    rows, with_split, bom = case
    with tempfile.TemporaryDirectory() as tmp, _fresh_registry():
        src, data = Path(tmp) / "src", Path(tmp) / "data"
        data.mkdir()
        paths = [f"imgs/{i % 2}/x{i // 2}.png" for i in range(max(row[0] for row in rows) + 1)]  # x0.png twice
        contents = [_images(src / Path(p).parent, [Path(p).name])[0] for p in paths]
        with open(src / "list.csv", "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split"] if with_split else ["path", "label"])
            for i, label, split, *form in rows:
                path = paths[i] if not form else str(src / paths[i]) if form[0] == "abs" else form[0] + paths[i]
                writer.writerow([path, label, split] if with_split else [path, label])
        model, valid = _csv_model(rows, with_split)
        expected = {contents[i]: v for i, v in model.items()}
        _check_result(data, expected, valid, lambda: create_dataset("prop", data, csv_file=src / "list.csv"))
