"""The normalisation-confound table (experiments/confound.py) on hand-made analysis summaries."""

import json

from experiments import confound


def _summary(si, si_t0, hat=None, purity=None):
    layer = {"suppression_index": si, "suppression_index_t0": si_t0, "heavy_tail": "lognormal", "kurtosis": 3.0}
    if purity is not None:
        layer.update(purity=purity, mexican_hat=hat)
    return {"lateral_0": layer, "lateral_1": {**layer, "suppression_index": si + 0.2, "mexican_hat": False}}


def test_each_property_is_the_mean_over_seeds_of_its_layer_average(tmp_path):
    analyses = {}
    for preset, si in (("stable", 0.6), ("paper", 0.1)):
        for seed in (0, 1):
            summary = {
                f"contour_fcnn_seed{seed}": _summary(si + 0.1 * seed, si + 0.1 * seed),
                f"contour_lccnn_T4_k7_seed{seed}": _summary(si, si + 0.3, hat=seed == 0, purity=0.2),
            }
            path = tmp_path / f"{preset}_seed{seed}" / "analysis.json"
            path.parent.mkdir()
            path.write_text(json.dumps({"summary": summary}))
            analyses[preset, seed] = path
    text = confound.table(confound.collect(analyses))
    header = "| property | fcnn (stable) | fcnn (paper) | lccnn_T4_k7 (stable) | lccnn_T4_k7 (paper) |"
    assert header in text
    # F-CNN: seeds 0.7 and 0.8 (layer means of 0.6/0.8 and 0.7/0.9); the loop model shows loop 0 → T
    assert "| mean suppression index (loop 0 → T) | 0.75 ± 0.07 | 0.25 ± 0.07 | 0.90 ± 0.00 → 0.70 ± 0.00 |" in text
    assert "| Mexican-hat profile (layers × seeds) | – | – | 1 / 4 | 1 / 4 |" in text
    assert "| response tails (layers × seeds) | lognormal 4 |" in text
    assert text.endswith("Seeds: stable 2, paper 2.\n")
