"""The answer in words: a shaky edge leads with the chosen sources, then its alternatives."""

from components.answer import Stability, Verdict
from components.verdict import edge_text

VERDICT = Verdict.from_json(
    {
        "alternatives": {
            "autoencoding": [["self", 0.5], ["depth_euclidean", 0.22], ["normal", 0.105]],
            "curvature": [["reshading", 0.6], ["normal", 0.3]],
        },
        "no_gain": {},
    }
)
STABILITY = Stability.from_json(
    {"roots": {}, "transfers": {"curvature": {"edge_texture": 0.04, "reshading": 0.6}}, "taxonomy": 0.0}
)


def test_a_shaky_edge_is_read_chosen_first_even_where_resamples_prefer_another():
    # regression: 'autoencoding <- self (0.50) or depth_euclidean (0.22)' hid the chosen source
    assert edge_text("autoencoding", ["depth_euclidean"], VERDICT, STABILITY) == (
        "autoencoding <- depth_euclidean (0.22) or self (0.50) or normal (0.10)"
    )
    # chosen below the alternatives' floor: its share comes from the stability table
    assert edge_text("curvature", ["edge_texture"], VERDICT, STABILITY) == (
        "curvature <- edge_texture (0.04) or reshading (0.60) or normal (0.30)"
    )


def test_a_stable_edge_is_one_source_and_its_share():
    stable = Stability.from_json({"roots": {}, "transfers": {"reshading": {"normal": 0.97}}, "taxonomy": 0.0})
    assert edge_text("reshading", ["normal"], Verdict(3), stable) == "reshading <- normal (0.97)"
