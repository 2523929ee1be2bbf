from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from separeg.rt.labels import CodedConcept, Label, LabelTable, Terminology, display_name, load_label_table, terminology
from separeg.rt.organs import ORGAN_COLORS, SYNONYMS, default_color, to_tg263
from separeg.runtime.errors import InputError

REQUIRED = (
    "Brainstem SpinalCord Parotid_L Parotid_R Glnd_Submand_L Glnd_Submand_R Esophagus Larynx Bone_Mandible "
    "OpticNrv_L OpticNrv_R OpticChiasm Eye_L Eye_R Lens_L Lens_R Cochlea_L Cochlea_R Lung_L Lung_R Heart Liver "
    "Kidney_L Kidney_R Spleen Stomach Bladder Rectum Femur_Head_L Femur_Head_R GTV CTV PTV"
).split()


def test_openkbp_labels_json(openkbp: Path) -> None:
    table = load_label_table(openkbp / "labels.json")
    assert table.values == (1, 2, 3, 4, 5, 6, 7)  # background (0) is implicit
    assert table.names == ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
    assert [label.tg263 for label in table] == [
        "Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Bone_Mandible"]
    assert table.by_value(3).tg263 == "Parotid_R" and table.by_value(7).tg263 == "Bone_Mandible"
    for label in table:
        assert label.color == ORGAN_COLORS[label.tg263]
    assert len({label.color for label in table}) == 7
    assert LabelTable.load(openkbp / "labels.json") == table


def test_openkbp_names_alone_give_the_same_tg263_names(openkbp: Path, tmp_path: Path) -> None:
    data = json.loads((openkbp / "labels.json").read_text())
    del data["index_to_tg263"]
    (tmp_path / "names.json").write_text(json.dumps(data))
    assert load_label_table(tmp_path / "names.json") == load_label_table(openkbp / "labels.json")


def test_registry_has_the_common_organs_with_distinct_colours() -> None:
    for name in REQUIRED:
        assert name in ORGAN_COLORS, name
        assert to_tg263(name) == name
    for name, color in ORGAN_COLORS.items():
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color), name
    assert len(set(ORGAN_COLORS.values())) == len(ORGAN_COLORS)
    assert ORGAN_COLORS["SpinalCord"] == (244, 214, 49)  # Slicer GenericAnatomyColors "spinal cord"
    assert ORGAN_COLORS["GTV"] == (255, 0, 0)
    assert set(SYNONYMS.values()) == set(ORGAN_COLORS)


@pytest.mark.parametrize(("name", "expected"), [
    ("Parotid L", "Parotid_L"), ("L_Parotid", "Parotid_L"), ("parotid_lt", "Parotid_L"),
    ("LeftParotid", "Parotid_L"), ("Left Parotid", "Parotid_L"), ("PAROTID-LEFT", "Parotid_L"),
    ("RightParotid", "Parotid_R"), ("Parotid_R", "Parotid_R"), ("rt parotid gland", "Parotid_R"),
    ("Mandible", "Bone_Mandible"), ("Spinal-Cord", "SpinalCord"), ("Cord", "SpinalCord"),
    ("spinal cord", "SpinalCord"), ("Lung-Left", "Lung_L"), ("Left Lung", "Lung_L"), ("lung_lt", "Lung_L"),
    ("Lung-Right", "Lung_R"), ("Submandibular_L", "Glnd_Submand_L"), ("brain stem", "Brainstem"),
    ("Optic Nerve R", "OpticNrv_R"), ("chiasm", "OpticChiasm"), ("kidney_right", "Kidney_R"),
    ("femoral head left", "Femur_Head_L"), ("urinary_bladder", "Bladder"), ("oesophagus", "Esophagus"),
    ("ptv", "PTV"), ("Tumour bed", None), ("", None),
])
def test_synonyms(name: str, expected: str | None) -> None:
    assert to_tg263(name) == expected


def test_numbered_targets_merge_only_when_asked() -> None:
    # GTV-1 and GTV-2 are two structures of one patient: by default they keep their own names.
    assert to_tg263("GTV-1") is None and to_tg263("PTV_5040") is None
    assert to_tg263("GTV-1", merge_numbered_targets=True) == "GTV"
    assert to_tg263("ptv_5040", merge_numbered_targets=True) == "PTV"
    assert to_tg263("Lung-Left", merge_numbered_targets=True) == "Lung_L"
    names = ["GTV-1", "Spinal-Cord", "Lung-Left", "Lung-Right"]  # the LUNG1 RTSTRUCT's ROIs
    assert [label.tg263 for label in LabelTable.from_names(names)] == ["", "SpinalCord", "Lung_L", "Lung_R"]
    merged = LabelTable.from_names(names, merge_numbered_targets=True)
    assert merged.by_value(1).tg263 == "GTV" and merged.by_value(1).name == "GTV-1"
    assert merged.by_value(1).color == ORGAN_COLORS["GTV"]


def test_dict_and_file_round_trip(openkbp: Path, tmp_path: Path) -> None:
    table = load_label_table(openkbp / "labels.json")
    data = json.loads(json.dumps(table.to_dict()))
    assert data["schema"] == 1 and data["labels"][2] == {
        "value": 3, "name": "RightParotid", "tg263": "Parotid_R", "color": list(ORGAN_COLORS["Parotid_R"])}
    assert LabelTable.from_dict(data) == table
    saved = table.save(tmp_path / "sub" / "labels.json")
    assert saved.exists() and not list(saved.parent.glob(".*"))  # no temporary file left behind
    assert LabelTable.load(saved) == table
    assert load_label_table(saved) == table


def test_saved_table_keeps_given_names_and_colours(tmp_path: Path) -> None:
    table = LabelTable((Label(5, "Tumour bed", "", (1, 2, 3)), Label(2, "Left Parotid", "Parotid_L", (9, 9, 9))))
    assert table.values == (2, 5)  # ordered by value
    assert LabelTable.load(table.save(tmp_path / "t.json")) == table


def test_csv_with_all_columns(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("value,name,tg263,r,g,b\n1,Left Parotid,,10,20,30\n2,Cord,SpinalCord,,,\n"
                    "4,Tumour bed,,,,\n3,Mandible,mandible,1,2,3\n")
    table = load_label_table(path)
    assert table.values == (1, 2, 3, 4)
    assert table.by_value(1) == Label(1, "Left Parotid", "Parotid_L", (10, 20, 30))
    assert table.by_value(2) == Label(2, "Cord", "SpinalCord", ORGAN_COLORS["SpinalCord"])
    assert table.by_value(3) == Label(3, "Mandible", "Bone_Mandible", (1, 2, 3))  # synonym written as TG-263
    unknown = table.by_value(4)
    assert unknown.tg263 == "" and unknown.color == default_color("", 4)
    assert LabelTable.load(table.save(tmp_path / "t.json")) == table


def test_csv_minimal_and_other_delimiters(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("# organs of the study\nValue;Name\n1;Brainstem\n2;Structure A\n3;Structure B\n")
    (tmp_path / "b.tsv").write_text("value\tname\n1\tBrainstem\n2\tStructure A\n3\tStructure B\n")
    a, b = load_label_table(tmp_path / "a.csv"), load_label_table(tmp_path / "b.tsv")
    assert a == b and a.names == ("Brainstem", "Structure A", "Structure B")
    assert a.by_value(1).color == ORGAN_COLORS["Brainstem"]
    assert a.by_value(2).color != a.by_value(3).color  # unknown organs: distinct, deterministic colours
    assert a == load_label_table(tmp_path / "a.csv")


def test_default_colours_of_unknown_organs_are_distinct() -> None:
    colors = [default_color("", v) for v in range(1, 21)]
    assert len(set(colors)) == 20
    assert min(sum(abs(x - y) for x, y in zip(c1, c2, strict=True))
               for c1, c2 in itertools.combinations(colors[:8], 2)) > 30
    assert default_color("Heart", 99) == ORGAN_COLORS["Heart"]


def test_plain_value_to_name_mapping(shared_data: Path) -> None:
    table = load_label_table(shared_data / "totalseg" / "labels_mr.json")
    assert table.by_value(10).name == "lung_left" and table.by_value(10).tg263 == "Lung_L"
    assert table.by_value(1).tg263 == "Spleen"
    total = load_label_table(shared_data / "totalseg" / "labels.json")  # index_to_name without TG-263 names
    assert total.by_value(2).tg263 == "Kidney_R" and 0 not in total.values


def test_lookups(openkbp: Path) -> None:
    table = load_label_table(openkbp / "labels.json")
    assert table.by_name("Left Parotid") is table.by_value(4)
    assert table.by_name("mandible") is table.by_value(7)
    assert table.by_name("Heart") is None and table.by_name("--") is None
    with pytest.raises(KeyError, match="values 1, 2, 3, 4, 5, 6, 7"):
        table.by_value(9)
    assert len(table) == 7


@pytest.mark.parametrize(("text", "match"), [
    ("value,name\n1,Brainstem\n1,SpinalCord\n", "value 1 is listed twice"),
    ("value,name\n1,Brainstem\n01,SpinalCord\n", "value 1 is listed twice"),
    ("value,name\n0,Brainstem\n", "0 is the implicit background"),
    ("value,name\n-2,Brainstem\n", "number the organs from 1"),
    ("value,name\n1.5,Brainstem\n", "'1.5' is not an integer"),
    ("value,name\nbrainstem,1\n", "is not an integer"),
    ("value,name\n1,\n", "has no name"),
    ("value,name\n1,Brainstem\n2,Brainstem\n", "same name"),
    ("value,name\n1,Parotid L\n2,LeftParotid\n", "same TG-263 name 'Parotid_L'"),
    ("value,name,r,g,b\n1,Brainstem,300,0,0\n", "not three integers 0-255"),
    ("value,name,r\n1,Brainstem,3\n", "all three colour columns"),
    ("id,label\n1,Brainstem\n", "lacks 'value' and 'name'"),
    ("value,name\n1,Brainstem,extra\n", "row 2 has 3 fields"),
    ("value,name\n0,background\n", "lists no organs"),
    ("", "is empty"),
])
def test_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_label_table(path)


@pytest.mark.parametrize(("text", "match"), [
    ('{"index_to_name": {"1": "Brainstem", "1": "SpinalCord"}}', "key '1' twice"),
    ('{"index_to_name": {"1": "Brainstem", "01": "SpinalCord"}}', "value 1 is listed twice"),
    ('{"index_to_name": {"0": "Brainstem"}}', "0 is the implicit background"),
    ('{"index_to_name": {"one": "Brainstem"}}', "'one' is not an integer"),
    ('{"labels": [{"value": 2.5, "name": "Brainstem"}]}', "2.5 is not an integer"),
    ('{"labels": [{"value": true, "name": "Brainstem"}]}', "True is not an integer"),
    ('{"labels": [{"name": "Brainstem"}]}', "no 'value'"),
    ('{"labels": [{"value": 1, "name": "Brainstem", "color": [1, 2]}]}', "not three integers"),
    ('{"labels": [{"value": 1, "name": "Brainstem", "color": [1.5, 2, 3]}]}', "not three integers"),
    ('{"labels": [{"value": 1, "name": "Brainstem"},', "not valid JSON"),
    ('[1, 2, 3]', "is not a label table"),
    ('{"model": "x", "epochs": 3}', "is not a label table"),
])
def test_json_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_label_table(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_label_table(tmp_path / "missing.json")
    with pytest.raises(InputError, match="is a folder"):
        load_label_table(tmp_path)
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(InputError, match="could not be read"):
        load_label_table(tmp_path / "binary.csv")
    (tmp_path / "labels.xml").write_text("<labels/>")
    with pytest.raises(InputError, match="unknown format"):
        load_label_table(tmp_path / "labels.xml")


def test_label_checks_its_fields() -> None:
    with pytest.raises(InputError, match="implicit background"):
        Label(0, "Brainstem", "Brainstem", (1, 2, 3))
    with pytest.raises(InputError, match="not an integer"):
        Label(1.0, "Brainstem", "Brainstem", (1, 2, 3))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no name"):
        Label(1, " ", "", (1, 2, 3))
    with pytest.raises(InputError, match="three integers"):
        Label(1, "Brainstem", "", (1, 2, 256))
    assert Label(1, "Brainstem", "", [1, 2, 3]).color == (1, 2, 3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="same value"):
        LabelTable((Label(1, "A", "", (1, 2, 3)), Label(1, "B", "", (1, 2, 3))))


# ----------------------------------------------------------------------------------------------- terminology


def _dictionary_meanings(concept) -> set[str]:
    """Meanings pydicom's bundled DICOM code dictionary gives this (scheme, value), lower case."""
    from pydicom.sr._concepts_dict import concepts

    return {meaning.lower() for entries in concepts.get(concept.scheme, {}).values()
            for value, (meaning, _cids) in entries.items() if value == concept.value}


def test_every_registry_organ_has_a_display_name_and_the_table_no_other_names() -> None:
    from separeg.rt.terminology import registry_terminologies

    assert set(registry_terminologies()) == set(ORGAN_COLORS)
    for tg263 in ORGAN_COLORS:
        assert display_name(tg263), tg263
    assert display_name("Parotid_L") == "Left parotid gland" and display_name("Femur_Head_R") == "Right femoral head"
    assert display_name("Bone_Mandible") == "Mandible" and display_name("Pancreas") is None


def test_every_code_is_in_pydicoms_code_dictionary_with_its_meaning() -> None:
    from separeg.rt.terminology import ANATOMICAL_STRUCTURE, GENERIC_CATEGORY, LEFT, RIGHT, registry_terminologies

    coded = {name: t for name, t in registry_terminologies().items() if t is not None}
    assert set(ORGAN_COLORS) - set(coded) == {"Cochlea_L", "Cochlea_R"}  # no confirmed code: dropped, not guessed
    for name, term in coded.items():
        for concept in (term.category, term.type, term.modifier):
            if concept == ANATOMICAL_STRUCTURE:
                # pydicom names 123037004 by its SNOMED name "Body structure"; DICOM CID 7150, Slicer and dcmqi call it
                # "Anatomical Structure" (pydicom's CID 7150 still lists the inactivated 91723000).
                assert "body structure (body structure)" in _dictionary_meanings(concept)
            elif concept is not None:
                assert concept.meaning.lower() in _dictionary_meanings(concept), (name, concept)
    for concept in (GENERIC_CATEGORY, LEFT, RIGHT):
        assert concept.meaning.lower() in _dictionary_meanings(concept)


def test_terminology_codes_sides_and_targets() -> None:
    from separeg.rt.terminology import generic_terminology

    parotid = terminology("Parotid_R")
    assert parotid.category == CodedConcept("123037004", "SCT", "Anatomical Structure")
    assert parotid.type == ("45289007", "SCT", "Parotid gland") and parotid.modifier.meaning == "Right"
    assert terminology("Brainstem").modifier is None
    gtv = terminology("GTV")
    assert gtv.category == ("130041", "DCM", "RT Target") and gtv.type.value == "228791009"
    assert terminology("Cochlea_L") is None and terminology("Pancreas") is None
    entry = parotid.slicer_entry().split("~")
    assert len(entry) == 7 and entry[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^45289007^Parotid gland",
                                              "SCT^24028007^Right"]
    fallback = generic_terminology("Tumour bed")
    assert not fallback.coded and fallback.name == "Tumour bed" and fallback.type.meaning == "Tissue"
    assert isinstance(fallback, Terminology)
