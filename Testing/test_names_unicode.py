"""Structure names in any script: Cyrillic, Greek and CJK ROI names stay distinct, synonym tables keep every entry,
and a name that matches two labels is refused, never silently mislabelled training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from separeg.io.dicom_ct import Algorithm, read_ct_series
from separeg.io.dicom_write import write_ct_series
from separeg.rt.dicom_cases import load_synonyms
from separeg.rt.labels import Label, LabelTable, load_label_table
from separeg.rt.organs import normalise_name
from separeg.rt.rtstruct import read_rtstruct
from separeg.rt.rtstruct_write import write_rtstruct_masks
from separeg.runtime.errors import InputError

# A clinic's names: Russian, Greek, Chinese and Japanese, plus one that is punctuation alone.
ROIS = {"Спинной мозг": "SpinalCord", "Сердце": "Heart", "Левое лёгкое": "Lung_L", "Καρδιά-2": "Esophagus",
        "脊髓 (PRV)": "Larynx", "肝臓": "Liver"}


def test_normalise_name_keeps_every_script() -> None:
    assert normalise_name("Parotid L") == normalise_name("parotid_l") == "parotidl"
    assert normalise_name("Спинной мозг") == "спинноймозг" != normalise_name("Сердце")
    assert normalise_name("ΚΑΡΔΙΆ") == normalise_name("καρδιά")  # case-folded in Greek too
    assert normalise_name("ＧＴＶ－１") == "gtv1"  # NFKC: full-width forms of CJK input methods
    assert normalise_name("脊髓 (PRV)") == "脊髓prv" and normalise_name("***") == ""


def test_cyrillic_greek_and_cjk_rois_are_imported_and_matched_by_a_synonym_table(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.full((6, 40, 40), -1000, np.int16))
    ct = read_ct_series(write_ct_series(image, tmp_path / "ct").folder)
    masks = {}
    for i, name in enumerate(ROIS):
        mask = np.zeros(ct.shape, bool)
        mask[i, 5 + 4 * i:8 + 4 * i, 5:30] = True
        masks[name] = mask
    path = write_rtstruct_masks(tmp_path / "rt.dcm", masks, ct, algorithm=Algorithm("x", "1"))
    imported = read_rtstruct(path, ct)
    # Before: every name normalised to "", so ROIs 2-6 were "duplicates" renamed "<name> [ROI n]".
    assert [r.name for r in imported.rois] == list(ROIS) and imported.warnings == []
    (tmp_path / "synonyms.csv").write_text("their name,tg263\n" + "".join(f"{k},{v}\n" for k, v in ROIS.items()),
                                           encoding="utf-8")
    synonyms = load_synonyms(tmp_path / "synonyms.csv")
    assert synonyms == ROIS  # before: all keys collapsed to the last entry
    table = LabelTable.from_names(list(ROIS.values()))
    match = imported.match(table, synonyms=synonyms)
    assert match.unmatched == [] and match.warnings == []
    for name, tg263 in ROIS.items():
        label = table.by_name(tg263)
        assert np.array_equal(match.labelmap == label.value, masks[name]), name
    # Without the synonym table nothing matches: no organ is trained on the wrong structure.
    assert imported.match(table).unmatched == list(ROIS)


def test_ambiguous_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dup.csv").write_text("their name,tg263\nСердце,Heart\nсердце,Liver\n", encoding="utf-8")
    with pytest.raises(InputError, match="same name ignoring case"):
        load_synonyms(tmp_path / "dup.csv")
    (tmp_path / "empty.csv").write_text("their name,tg263\n***,Heart\n", encoding="utf-8")
    with pytest.raises(InputError, match="no letter or digit"):
        load_synonyms(tmp_path / "empty.csv")
    # Two labels whose names differ only in case or punctuation cannot both be matched by name.
    (tmp_path / "labels.csv").write_text("value,name\n1,Лёгкое левое\n2,лёгкое-левое\n", encoding="utf-8")
    with pytest.raises(InputError, match="same name ignoring case, spaces and punctuation"):
        load_label_table(tmp_path / "labels.csv")
    # A name that is one label's name and another label's TG-263 synonym goes to the label with that name.
    table = LabelTable((Label(1, "Cord", "", (1, 2, 3)), Label(2, "Spinal canal", "SpinalCord", (4, 5, 6))))
    assert table.by_name("cord").value == 1


def test_registry_names_with_a_translation_still_match() -> None:
    from separeg.rt.organs import to_tg263

    assert to_tg263("Parotid L (腮腺)") == to_tg263("Parotid L") == "Parotid_L"
    assert to_tg263("Parotid L (PRV)") is None and to_tg263("Спинной мозг") is None
