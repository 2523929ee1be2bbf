"""Pack the shipped ``hn-oar-7`` v3: one bundle holding v2 and the v3 candidate (MODELS.md), whose contours average
the two networks' probabilities (``separeg pack --ensemble``; ``separeg/segment/ensemble.py``).

The release metadata is written from the members' own bundles and the post-processing ablation of the packed model on
the 10 OpenKBP validation patients (``Testing/experiments/postprocessing_ablation.py``, which nothing in either
member's training or model selection saw): ``release.validation`` is the table without test-time mirroring (as every
earlier release), ``test_time_mirroring.how`` records the figure as shipped.

    python Testing/experiments/postprocessing_ablation.py --model ENSEMBLE --out ABLATION \\
        --config Testing/experiments/openkbp_random_cpu.json
    python Resources/StarterModels/pack_ensemble_release.py --members V2 V3 --ablation ABLATION \\
        --out separeg/models/hn-oar-7.separeg

V2: the hn-oar-7 v2 bundle (git history of ``separeg/models/hn-oar-7.separeg`` before 2026-12-08); V3: the pool build
``build_starter_models.py --init separeg-encoder-hn-ct --data POOL --split Testing/experiments/openkbp_pool_split.json
--epochs 120 --patience 15`` (``WORK/finetune/model.separeg``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_starter_models import table  # noqa: E402

from separeg.runtime.bundle import load_bundle  # noqa: E402
from separeg.segment.ensemble import pack_ensemble  # noqa: E402


def arm_mean(ablation: Path, arm: str) -> float:
    """All-organ mean DSC % of one ablation arm (its evaluation summary)."""
    summary = json.loads((ablation / "runs" / arm / "n0_d0" / "evaluation" / "summary.json").read_text())
    return table(summary)["All organs"]["dsc_mean_percent"]


def release(v2, v3, ablation: Path) -> dict:
    r2, r3 = v2.metadata["release"], v3.metadata["release"]
    summary = json.loads((ablation / "runs" / "no mirroring" / "n0_d0" / "evaluation" / "summary.json").read_text())
    seconds = json.loads((ablation / "postprocessing.json").read_text())["seconds_per_case"]
    return {**r2, "version": 3,
            "data": "two networks, each on OpenKBP (Babier et al. 2021, MIT licence; TCIA head-and-neck CTs at 128 x "
                    "128 x 128): v2 fine-tuned on 36 training patients (4 held out for model selection), v3 on 160 "
                    "patients of the OpenKBP pool's training split (10 held out); 10 validation patients for this "
                    "report only, which neither saw",
            "intended_use": r2["intended_use"] + "; an ensemble of two networks (their probabilities averaged)",
            "commands": [*r2["commands"], *r3["commands"],
                         "separeg pack V2 --ensemble V3 --fp16 --metadata META --out hn-oar-7.separeg"],
            "budget": f"v2: {r2['budget']}; v3: {r3['budget']}",
            "holdout_patients": sorted({*r2["holdout_patients"], *r3["holdout_patients"]}),
            "members": [{"name": "v2", "training_cases": v2.metadata["training"]["training_cases"],
                         "weights_sha256": v2.weights_sha256},
                        {"name": "v3", "training_cases": v3.metadata["training"]["training_cases"],
                         "weights_sha256": v3.weights_sha256}],
            "validation": {"patients": json.loads((ablation / "postprocessing.json").read_text())["test"],
                           "per_organ": table(summary), "mirroring": False,
                           "contour_seconds_per_ct": seconds}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", nargs=2, type=Path, required=True, metavar=("V2", "V3"))
    parser.add_argument("--ablation", type=Path, required=True, help="postprocessing_ablation.py's output folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    v2, v3 = (load_bundle(p, expected_kind="segmentation") for p in args.members)
    shipped, plain = arm_mean(args.ablation, "as shipped"), arm_mean(args.ablation, "no mirroring")
    mirroring = {**v2.metadata["test_time_mirroring"],
                 "how": f"chosen for v2 on its 4 held-out training patients (67.0 -> 68.1 %) and kept for the v3 "
                        f"ensemble; on the 10 validation patients: {plain:.1f} -> {shipped:.1f} % (release.validation "
                        f"holds the numbers without mirroring)"}
    metadata = {"release": release(v2, v3, args.ablation), "test_time_mirroring": mirroring}
    path = pack_ensemble([args.members[0], args.members[1]], args.out, half=True, metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {shipped:.1f} % all-OAR DSC as shipped, "
          f"{plain:.1f} % without mirroring")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
