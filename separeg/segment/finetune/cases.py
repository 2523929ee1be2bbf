"""The cases of a fine-tune: found in a folder or read from a case list, loaded with the label table (and the
synonym table for DICOM cases), and split into training and validation cases (drawn with the seed, or a fixed
validation set given with ``--validation``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.segment.finetune.config import FinetuneConfig, FinetuneJob

__all__ = ["load_cases", "case_list", "split_cases", "require_annotated_organs"]


def load_cases(job: FinetuneJob, cfg: FinetuneConfig, table, events: Events):
    """All cases, the training and validation split, and the synonym table used to read DICOM cases."""
    from separeg.segment.case_loading import load_case

    synonyms = None
    if job.synonyms is not None:
        from separeg.rt.dicom_cases import load_synonyms

        synonyms = load_synonyms(job.synonyms)
    cases = [load_case(c, table, synonyms=synonyms) for c in case_list(job.data, events)]
    require_annotated_organs(cases, table, synonyms_given=synonyms is not None)
    if job.validation_data is not None:  # a fixed validation set (the experiment protocol)
        train_cases, val_cases = cases, [load_case(c, table, synonyms=synonyms)
                                         for c in case_list(job.validation_data, events)]
        clash = {c.name for c in train_cases} & {c.name for c in val_cases}
        if clash:
            raise InputError(f"case(s) {', '.join(sorted(clash))} are both training and validation cases; "
                             "a validation case must be unseen in training")
    else:
        train_cases, val_cases = split_cases(cases, cfg)
    for case in cases + (val_cases if job.validation_data is not None else []):
        for note in case.warnings:
            events.warning(note, stage="finetune")
    return cases, train_cases, val_cases, synonyms


def case_list(data: Path, events: Events) -> list:
    """The cases of a case list (a JSON/CSV file) or of a folder (volumes without a partner left out, with a
    warning)."""
    from separeg.segment.cases import find_cases, read_case_list

    if Path(data).is_file():
        return read_case_list(data)
    found, unpaired = find_cases(data)
    if unpaired:
        events.warning(f"{len(unpaired)} volume(s) without a partner are not used: "
                       + ", ".join(p.name for p in unpaired[:5]), stage="finetune")
    return found


def split_cases(cases: list, cfg: FinetuneConfig) -> tuple[list, list]:
    """Training and validation cases: ``cfg.validation_cases`` (default 20 %) drawn with ``cfg.seed``."""
    n_val = cfg.validation_cases if cfg.validation_cases is not None else (max(1, round(0.2 * len(cases)))
                                                                            if len(cases) >= 2 else 0)
    if n_val >= len(cases):
        raise InputError(f"{len(cases)} case(s) cannot give {n_val} validation case(s) and a training case")
    order = np.random.default_rng(cfg.seed).permutation(len(cases))
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


def require_annotated_organs(cases: list, table, *, synonyms_given: bool = False, shown: int = 5) -> None:
    """Refuse a training set in which no case annotates any organ of the label table: a model trained on it learns
    only background (it was trained and saved, "train longer" advised). Checked before the run folder is written.

    Raises:
        InputError: naming the cases, what their labels held instead, and how to map the names.
    """
    if any(case.annotated for case in cases):
        return
    details = [f"{case.name}: " + ("; ".join(case.unused[:shown]) + (" ..." if len(case.unused) > shown else "")
                                   if case.unused else "no organ voxel in its labels") for case in cases[:shown]]
    more = f" (and {len(cases) - shown} more)" if len(cases) > shown else ""
    synonyms = "check the names in your synonym table (--synonyms)" if synonyms_given else \
        "map their names to the table's with --synonyms (a CSV of 'their name,TG263name' rows)"
    raise InputError(
        f"no organ of the label table ({', '.join(table.names)}) is annotated in any of the {len(cases)} case(s), so "
        f"there is nothing to train on. Found instead: {' | '.join(details)}{more}. For ROI names the table does "
        f"not know, {synonyms} or give a label table with their names (--labels); ROIs drawn in another Frame of "
        "Reference belong to another scan: pair each RTSTRUCT with the CT series it was drawn on")
