"""Issue 30 B: a head-and-neck model on a chest CT warns (the organs it finds are far from their training volumes);
on a head-and-neck CT it does not."""

from __future__ import annotations

import json
from pathlib import Path

from separeg.rt.labels import LabelTable
from separeg.segment.contour import LABELS_FILE, ContourJob, run_contour


def test_hn_oar_7_on_a_thoracic_ct_warns(lung1: Path, tmp_path: Path) -> None:
    result = run_contour(ContourJob(volume=lung1 / "ct", model="hn-oar-7", out_dir=tmp_path, device="cpu"))
    site = [w for w in result.warnings if w.startswith("body site: ")]
    assert len(site) == 1, result.warnings  # before: "warnings": []
    assert "Brainstem" in site[0] and "(training data: OpenKBP head and neck, " in site[0]
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
