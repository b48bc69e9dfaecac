"""The study's answer crosses modules typed and is stored as the JSON it always was."""

from components.answer import StudyAnswer

STORED = {
    "budget": 3,
    "max_order": 2,
    "objective": 3.5,
    "roots": ["autoencoding", "normal"],
    "transfers": {"curvature": ["normal"], "reshading": ["autoencoding", "normal"]},
    "stability": {
        "roots": {"autoencoding": 0.99, "normal": 0.8, "curvature": 0.2},
        "transfers": {"curvature": {"normal": 0.7, "self": 0.2}, "reshading": {"autoencoding+normal": 0.95}},
        "taxonomy": 0.4,
        "resamples": 200,
    },
    "verdict": {
        "replicates": 3,
        "training_noise_measured": True,
        "networks": 3,
        "network_noise_measured": True,
        "ties": {"curvature": [["normal", 0.7], ["edge_texture", 0.2]]},
        "alternatives": {"curvature": [["normal", 0.7], ["self", 0.2]]},
        "no_gain": {"curvature": {"sources": "normal", "loses_to": {"pixels": 0.93}}},
    },
    "pruned": {"transfers": ["edge->curvature"], "audited": 1, "shared": []},
}


def test_the_answer_reads_and_writes_the_stored_json_unchanged():
    answer = StudyAnswer.from_json(STORED, "/root/taxonomy/abc")
    assert answer.to_json() == STORED
    assert answer.roots == ("autoencoding", "normal") and answer.transfers["reshading"] == (
        "autoencoding",
        "normal",
    )
    assert answer.stability.root("curvature") == 0.2 and answer.stability.root("depth") == 0.0
    assert answer.stability.edge("curvature", "self") == 0.2 and answer.stability.edge("depth", "x") == 0.0
    assert answer.verdict.network_noise_measured and answer.verdict.no_gain["curvature"].loses_to == {
        "pixels": 0.93
    }
    assert answer.path == "/root/taxonomy/abc"


def test_an_answer_without_a_bootstrap_or_pruning_has_neither():
    plain = {k: v for k, v in STORED.items() if k not in ("stability", "pruned")}
    plain["verdict"] = {**STORED["verdict"], "ties": {}, "alternatives": {}, "no_gain": {}}
    answer = StudyAnswer.from_json(plain)
    assert answer.stability is None and answer.pruned is None
    assert answer.to_json() == plain


def test_a_position_answer_round_trips_through_its_json():
    from components.position import Candidate
    from pipelines.position.answer import PositionAnswer, RegisteredModel

    nan = float("nan")
    a = Candidate(("normal",), 0.61234567, 0.5, 0.7, 0.8, 0.9, 0.95, nan)
    b = Candidate(("edge", "normal"), 0.3, 0.2, 0.4, 0.2, 0.7, 0.9, nan)
    r = Candidate(("random",), 0.09, nan, nan, nan, 0.4, 0.5, nan)
    answer = PositionAnswer(
        "edges", "v1", 40, 20, 3, (a, b, r), (a, b), (("normal", 0.8), ("depth", -0.1)), ("normal",),
        a, (("edge", b, 0.0),), RegisteredModel("m", "2", ("normal",)), a,
    )  # fmt: skip
    stored = answer.to_json()
    again = PositionAnswer.from_json(stored)
    assert again.to_json() == stored  # what a rerun reads back is what was written
    assert stored["candidates"][0]["affinity"] == 0.6123 and stored["candidates"][0]["quality"] is None
    assert stored["best"] == [
        {"sources": ["normal"], "p_best": 0.8},
        {"sources": ["edge", "normal"], "p_best": 0.2},
    ]
    assert stored["model"] == "m" and stored["model_version"] == "2" and stored["model_sources"] == ["normal"]
    assert (
        again.chosen.sources == ("normal",)
        and again.model == answer.model
        and again.from_roots.name == "normal"
    )
