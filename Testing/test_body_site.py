"""Issue 30 B: a head-and-neck model on a chest CT warns (the organs it finds are far from their training volumes);
on a head-and-neck CT it does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from separeg.rt.labels import LabelTable
from separeg.segment.contour import LABELS_FILE, ContourJob, run_contour


def test_hn_oar_7_on_a_thoracic_ct_warns(lung1: Path, tmp_path: Path) -> None:
    """v2 warned by its organs (3 of 6 found off); v3 finds no brainstem there, and the body cross-section warns."""
    result = run_contour(ContourJob(volume=lung1 / "ct", model="hn-oar-7", out_dir=tmp_path, device="cpu"))
    site = [w for w in result.warnings if w.startswith("body site: ")]
    assert len(site) == 1, result.warnings  # before: "warnings": []
    assert "(training data: OpenKBP head and neck, " in site[0]
    assert site[0] in json.loads((tmp_path / LABELS_FILE).read_text())["warnings"]


def test_hn_oar_7_on_a_head_and_neck_ct_does_not_warn(openkbp: Path, tmp_path: Path) -> None:
    """pt_203 is hard for hn-oar-7 (it misses 3 of 7 organs): organs not found do not make it another body site."""
    result = run_contour(ContourJob(volume=openkbp / "pt_203_ct.nii.gz", model="hn-oar-7", out_dir=tmp_path,
                                    device="cpu"))
    assert not [w for w in result.warnings if w.startswith("body site")], result.warnings


def test_the_rule_counts_found_organs_only() -> None:
    from separeg.segment.body_site import OPENKBP_VOLUMES_CC, body_site_warning

    table = LabelTable.from_names(list(OPENKBP_VOLUMES_CC))
    expected = {lb.value: OPENKBP_VOLUMES_CC[lb.name] for lb in table}
    typical = {v: (lo + hi) / 2 for v, (lo, hi) in expected.items()}
    assert body_site_warning(typical, expected, table) is None
    assert body_site_warning({**typical, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}, expected, table) is None  # misses only
    odd = {**typical, 1: 0.03, 4: 0.8, 7: 4.0}  # LUNG1's Brainstem, Parotid_L, Bone_Mandible; 3 of 7 found off
    assert body_site_warning({**odd, 5: 0.0}, expected, table).startswith("body site: 3 of 6 organs found")
    assert body_site_warning(odd, expected, table) is None  # 3 of 7: most organs look right


def test_the_body_cross_section_tells_a_chest_from_a_neck(openkbp: Path, lung1: Path) -> None:
    """The second rule needs no organ: LUNG1's chest (619 cm²) is far above OpenKBP's head-and-neck scans."""
    import SimpleITK as sitk

    from separeg.io.volumes import read_volume
    from separeg.segment.body_site import (
        OPENKBP_BODY_AREA_CM2,
        body_area_cm2,
        body_area_warning,
        expected_body_area,
    )

    def area(image) -> float:
        return body_area_cm2(sitk.GetArrayViewFromImage(image), image.GetSpacing())

    table = LabelTable.from_names(["Brainstem", "Parotid_L"])
    expected, source = expected_body_area({}, table)  # no recorded areas: OpenKBP's, for OpenKBP's organs
    assert expected == OPENKBP_BODY_AREA_CM2 and source == "OpenKBP head and neck"
    assert expected_body_area({}, LabelTable.from_names(["Liver"])) == (None, "")
    assert expected_body_area({"data": {"body_area_cm2": [400.0, 500.0, 600.0]}}, table) == ((400.0, 600.0), "")
    chest = area(read_volume(lung1 / "ct"))
    assert 600 < chest < 640
    assert body_area_warning(chest, expected, source).startswith("body site: the body's median cross-section")
    for case in ("pt_203", "pt_209", "pt_22"):
        assert body_area_warning(area(sitk.ReadImage(str(openkbp / f"{case}_ct.nii.gz"))), expected, source) is None
    assert body_area_cm2(np.full((3, 4, 4), -1000.0), (1.0, 1.0)) is None  # no body slice: no verdict
