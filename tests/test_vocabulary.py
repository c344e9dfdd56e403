"""Vocabularies: built-ins, files, lists, CLI parsing and every validation error."""
import json
from pathlib import Path

import pytest

from sed_fast.data.vocabulary import (BUILTIN_VOCABULARIES, builtin_vocabulary_path, display_name, load_vocabulary,
                                 parse_vocabulary_arg, validate_names)

EXPECTED_SIZES = {"ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20, "voc20b": 59, "coco": 171}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_builtin_sizes(name):
    names = load_vocabulary(name)
    assert len(names) == EXPECTED_SIZES[name]
    assert all(isinstance(n, str) and n.strip() for n in names)
    assert names == json.loads(builtin_vocabulary_path(name).read_text(encoding="utf-8"))  # verbatim


def test_builtin_list_complete_and_case_insensitive():
    assert set(BUILTIN_VOCABULARIES) == set(EXPECTED_SIZES)
    assert load_vocabulary("ADE150") == load_vocabulary("ade150")
    assert "bed " in load_vocabulary("ade150")  # official names are kept exactly, trailing space included
    assert sum(", " in n for n in load_vocabulary("ade847")) == 217


def test_list_and_tuple():
    assert load_vocabulary(["cat", "dog"]) == ["cat", "dog"]
    assert load_vocabulary(("cat", "person, individual")) == ["cat", "person, individual"]
    names = ["a"]
    assert load_vocabulary(names) is not names  # a new list


def test_json_file(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps(["cat", "person, individual, someone"]), encoding="utf-8")
    assert load_vocabulary(path) == ["cat", "person, individual, someone"]
    assert load_vocabulary(str(path)) == ["cat", "person, individual, someone"]


def test_text_file(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("  cat \n\n dog\n   \nperson, individual\n", encoding="utf-8")
    assert load_vocabulary(path) == ["cat", "dog", "person, individual"]
    other = tmp_path / "names"  # any suffix other than .json is a text file
    other.write_text("a\nb", encoding="utf-8")
    assert load_vocabulary(str(other)) == ["a", "b"]


@pytest.mark.parametrize("names, error, match", [
    ([], ValueError, "empty"),
    (["cat", 3], TypeError, "index 1"),
    (["cat", None], TypeError, "index 1"),
    (["cat", ""], ValueError, "index 1"),
    (["cat", "   "], ValueError, "index 1.*whitespace"),
    (["cat", "dog, "], ValueError, "index 1.*empty synonym"),
    (["cat", "dog", "cat", "dog", "x"], ValueError, r"duplicate.*'cat' at indices 0, 2.*'dog' at indices 1, 3"),
])
def test_bad_lists(names, error, match):
    with pytest.raises(error, match=match):
        load_vocabulary(names)


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="neither a known built-in vocabulary.*ade150"):
        load_vocabulary("nosuchvocab")
    with pytest.raises(ValueError, match="did you mean 'ade150'"):
        load_vocabulary("ade15O")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vocabulary(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vocabulary(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="empty string"):
        load_vocabulary("  ")
    with pytest.raises(TypeError):
        load_vocabulary(42)
    with pytest.raises(TypeError):
        load_vocabulary(b"ade150")
    with pytest.raises(ValueError, match="not a file"):
        load_vocabulary(tmp_path)
    with pytest.raises(ValueError, match="unknown built-in"):
        builtin_vocabulary_path("nope")


@pytest.mark.parametrize("content, match", [
    ("[\"cat\", ", "invalid JSON"),
    ("{\"a\": 1}", "holds a dict"),
    ("\"cat\"", "holds a str"),
    ("[\"cat\", 1]", "index 1"),
    ("[\"cat\", [\"dog\"]]", "index 1"),
    ("[]", "empty"),
    ("[\"cat\", \"cat\"]", "duplicate"),
])
def test_bad_json_files(tmp_path, content, match):
    path = tmp_path / "v.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        load_vocabulary(path)
    assert str(path) in str(info.value)


def test_bad_text_files(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_vocabulary(path)
    path.write_text("cat\ndog\n cat \n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate.*'cat' at indices 0, 2"):
        load_vocabulary(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        load_vocabulary(path)


def test_display_name():
    assert display_name("person, individual, someone") == "person"
    assert display_name("traffic light") == "traffic light"
    assert display_name("a,b") == "a,b"  # only ", " separates synonyms
    with pytest.raises(TypeError):
        display_name(3)


def test_parse_vocabulary_arg(tmp_path):
    assert parse_vocabulary_arg("ade150") == load_vocabulary("ade150")
    assert parse_vocabulary_arg(" coco ") == load_vocabulary("coco")
    assert parse_vocabulary_arg("cat,dog, traffic light ") == ["cat", "dog", "traffic light"]
    assert parse_vocabulary_arg("person, individual") == ["person", "individual"]  # commas split classes
    assert parse_vocabulary_arg("cat,") == ["cat"]
    assert parse_vocabulary_arg("cat") == ["cat"]
    assert parse_vocabulary_arg("ade15O,") == ["ade15O"]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(["person, individual", "cat"]), encoding="utf-8")
    assert parse_vocabulary_arg(str(path)) == ["person, individual", "cat"]  # files keep synonym lists
    with pytest.raises(ValueError, match="did you mean 'ade150'"):
        parse_vocabulary_arg("ade15O")
    with pytest.raises(FileNotFoundError):
        parse_vocabulary_arg(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="duplicate"):
        parse_vocabulary_arg("cat,dog,cat")
    with pytest.raises(ValueError, match="empty"):
        parse_vocabulary_arg(" , ,")
    with pytest.raises(ValueError, match="empty"):
        parse_vocabulary_arg("")
    with pytest.raises(TypeError):
        parse_vocabulary_arg(["cat"])


def test_validate_names_source_in_message():
    with pytest.raises(ValueError, match="^my.txt: "):
        validate_names(["a", "a"], source="my.txt")
    with pytest.raises(TypeError):
        validate_names("cat")
    assert isinstance(Path(builtin_vocabulary_path("voc20")), Path)


def test_long_comma_separated_list_is_not_taken_for_a_path():
    names = [f"class number {i}" for i in range(100)]
    assert parse_vocabulary_arg(",".join(names)) == names


@pytest.mark.parametrize("bad", ["\ud800", "cat\udcff", "\udfff dog"])
def test_names_that_are_not_utf8_encodable_are_refused_with_their_index(bad):
    with pytest.raises(ValueError, match=r"index 1 is not valid Unicode text"):
        validate_names(["cat", bad])
    with pytest.raises(ValueError, match=r"index 1"):
        load_vocabulary(["sky", bad])
