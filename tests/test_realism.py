"""The realism table: data figures computed right on data whose answers are known, OOF figures on made-up OOF."""

import numpy as np
import polars as pl
import pytest

import cv
import main
from metric import GESTURES
from tools import realism


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return main.stage_synth(tmp_path_factory.mktemp("data"), subjects=4, seed=11, test_subjects=None)


def test_data_facts_of_a_generated_set(small_data):
    facts = realism.data_facts(small_data)
    train = pl.read_csv(small_data / "train.csv", infer_schema_length=10_000)
    lengths = train.group_by("sequence_id").len()["len"].to_numpy()
    assert facts["len_median"] == float(np.median(lengths)) and facts["len_max"] == lengths.max()
    assert facts["seq_per_subject"] == train["sequence_id"].n_unique() / 4
    assert facts["pairs"] == train.select("orientation", "gesture").unique().height
    assert facts["behaviour_values"] == 4
    share = (train["behavior"] == realism.GESTURE_BEHAVIOUR).mean()
    assert facts["gesture_row_share"] == pytest.approx(share)
    assert 0 <= facts["tof_minus1_share"] <= 1 and 0 <= facts["slots_once"] <= 1


def test_segment_lengths_and_slots_on_a_hand_made_file(tmp_path):
    # one subject, two sequences of the same pair: each starts with another initial behaviour (two slots, once each)
    rows = []
    for sid, initial, n_move in (
        ("SEQ_1", realism.INITIAL_BEHAVIOURS[0], 5),
        ("SEQ_2", realism.INITIAL_BEHAVIOURS[1], 3),
    ):
        plan = [initial] * n_move + [realism.PAUSE_BEHAVIOUR] * 2 + [realism.GESTURE_BEHAVIOUR] * 4
        for i, b in enumerate(plan):
            rows.append(
                {
                    "sequence_id": sid,
                    "sequence_counter": i,
                    "subject": "SUBJ_1",
                    "orientation": "Seated Straight",
                    "behavior": b,
                    "gesture": GESTURES[0],
                    "acc_x": 0.0,
                    "acc_y": 0.0,
                    "acc_z": 9.81,
                    "rot_w": 1.0,
                    "rot_x": 0.0,
                    "rot_y": 0.0,
                    "rot_z": 0.0,
                }
            )
    pl.DataFrame(rows).write_csv(tmp_path / "train.csv")
    facts = realism.data_facts(tmp_path)
    assert facts["pairs"] == 1 and facts["slots_once"] == 1.0
    assert facts["gesture_rows_mean"] == 4 and facts["pause_rows_median"] == 2
    assert facts["move_rows_median"] == 5 and facts["relax_rows_median"] == 3
    assert facts["len_min"] == 9 and facts["len_max"] == 11
    assert facts["acc_norm_mean"] == pytest.approx(9.81)


def _oof(tmp_path, member, pred_imu, pred_full, y):
    n = len(y)
    eye = np.eye(len(GESTURES), dtype=np.float32)
    cv.write_member_oof(
        tmp_path / "oof",
        member,
        np.array([f"S{i:03d}" for i in range(n)]),
        y,
        np.arange(n) % 2,
        eye[pred_full],
        eye[pred_imu],
        "h",
    )


def test_run_facts_from_oof(tmp_path):
    i = {g: k for k, g in enumerate(GESTURES)}
    brow, lash, npinch, nscr = (
        i["Eyebrow - pull hair"],
        i["Eyelash - pull hair"],
        i["Neck - pinch skin"],
        i["Neck - scratch"],
    )
    glasses = i["Glasses on/off"]
    y = np.array([brow] * 4 + [lash] * 4 + [npinch] * 4 + [nscr] * 4 + [glasses] * 4)
    net = y.copy()
    net[[0, 1, 4]] = [lash, lash, brow]  # 3 Eyebrow <-> Eyelash confusions
    net[8] = nscr  # 1 neck confusion
    net[16] = brow  # one non-target taken for a target (1 of 4)
    _oof(tmp_path, "lgbm", np.full_like(y, brow), y, y)
    _oof(tmp_path, "branchnet", net, y, y)
    facts = realism.run_facts(tmp_path)
    assert facts["best_network"] == "branchnet"
    assert facts["top_confusion"] == "Eyebrow ↔ Eyelash" and facts["neck_pair_rank"] == 2
    assert facts["nt_as_target"] == 0.25
    assert facts["net_tof_gain"] == pytest.approx(facts["net_full_score"] - facts["net_imu_score"])
    assert facts["net_minus_lgbm_imu"] > 0
    rows = realism.realism_rows({}, facts)
    verdicts = {r.fact.key: r.verdict for r in rows}
    assert verdicts["neck_pair_rank"] == "in range" and verdicts["nt_as_target"] == "MISS"


def test_realism_command_writes_the_table(small_data, tmp_path, capsys):
    main.main(["realism", "--data-dir", str(small_data), "--out", str(tmp_path / "r.md")])
    text = (tmp_path / "r.md").read_text()
    assert "| (orientation, gesture) pairs present |" in text and (tmp_path / "r.json").is_file()
    with pytest.raises(SystemExit, match="train.csv"):
        main.main(["realism", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x.md")])
