"""The paper's published numbers (ICLR 2022 CDA² paper), as data, for the tables of ``cda2 reproduce``.

Every value is copied from the paper's text (accuracies in %); where the paper gives a figure
without numbers (Fig. 4) the entry says what the figure claims. Keys are what the experiments
measure, so a table row is ``paper[key]`` beside the measured value.
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["EPS", "FIG4", "TABLE1", "TABLE2", "TABLE3", "TABLE4", "TABLE5", "TABLE6", "TABLE7"]

#: The radii of Tables 1, 2 and 5.
EPS: Tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)

#: Fig. 4 (Sec. 4.2) has no numbers: what it shows.
FIG4: Dict[str, str] = {
    "ensemble": "linear: cannot solve XOR (Fig. 4a)",
    "collaboration": "solves XOR, each sub-model takes a part (Fig. 4b)",
}

#: Table 1: white-box PGD (50 steps, 5 starts, step eps/5), adversarially trained (eps 0.03).
TABLE1: Dict[str, Dict[str, float]] = {
    "gal": {"clean": 81.2, "0.01": 49.5, "0.02": 31.4, "0.03": 25.4, "0.04": 22.7, "0.05": 18.4,
            "0.06": 13.4, "0.07": 9.0},
    "dverge": {"clean": 79.7, "0.01": 67.3, "0.02": 52.3, "0.03": 41.1, "0.04": 29.9,
               "0.05": 22.5, "0.06": 14.2, "0.07": 10.0},
    "adp": {"clean": 85.4, "0.01": 67.7, "0.02": 52.9, "0.03": 40.8, "0.04": 30.8, "0.05": 25.8,
            "0.06": 23.4, "0.07": 20.3},
    "cda2": {"clean": 80.2, "0.01": 72.0, "0.02": 57.5, "0.03": 47.8, "0.04": 38.7, "0.05": 30.4,
             "0.06": 24.3, "0.07": 24.0},
}

#: Table 2: transfer attacks from hold-out 3 x ResNet-20 ensembles (3 variants per sample).
TABLE2: Dict[str, Dict[str, float]] = {
    "gal": dict(zip(map(str, EPS), (65.1, 49.9, 49.7, 47.3, 53.4, 51.1, 42.2))),
    "adp": dict(zip(map(str, EPS), (85.6, 83.0, 79.3, 79.0, 69.6, 60.4, 57.4))),
    "dverge": dict(zip(map(str, EPS), (83.4, 80.1, 77.3, 72.4, 71.9, 68.8, 66.2))),
    "cda2": dict(zip(map(str, EPS), (85.4, 83.4, 79.3, 77.0, 74.2, 72.3, 70.2))),
}

#: Table 3: Square attack, 5000 queries, eps 0.03.
TABLE3: Dict[str, float] = {"gal": 25.0, "adp": 47.2, "dverge": 48.5, "cda2": 53.0}

#: Table 4: wall time of 100 epochs on one GeForce RTX 2080 Ti, in minutes.
TABLE4: Dict[str, float] = {"gal": 6 * 60 + 36, "dverge": 11 * 60 + 40, "adp": 6 * 60 + 35,
                            "cda2": 7 * 60 + 23}

#: Table 5: transfer attacks with 30 variants per sample (3/5/8-model surrogates, CE and CW).
TABLE5: Dict[str, Dict[str, float]] = {
    "gal": dict(zip(map(str, EPS), (57.8, 64.1, 46.3, 56.0, 43.9, 44.5, 41.4))),
    "adp": dict(zip(map(str, EPS), (84.2, 80.1, 73.9, 69.6, 65.3, 56.0, 60.7))),
    "dverge": dict(zip(map(str, EPS), (81.5, 78.1, 73.5, 68.4, 67.2, 63.8, 57.1))),
    "cda2": dict(zip(map(str, EPS), (83.2, 80.4, 75.0, 71.0, 69.1, 62.8, 61.4))),
}

#: Table 6 (Appendix E.1): clean accuracy of standard training, single model vs collaboration.
#: As printed: at depth 14 the paper's gain (0.9) is not its own difference (91.6 - 90.5 = 1.1).
TABLE6: Dict[int, Dict[str, float]] = {
    2: {"single": 65.0, "collaboration": 67.0, "gain": 2.0},
    8: {"single": 88.3, "collaboration": 89.5, "gain": 1.2},
    14: {"single": 90.5, "collaboration": 91.6, "gain": 0.9},
    20: {"single": 91.9, "collaboration": 92.5, "gain": 0.6},
}

#: Table 7 (Appendix E.3): clean accuracy of CDA² and its sub-models (the paper's header names
#: "sub-model A" twice; the three values are in the order printed).
TABLE7: Dict[str, float] = {"cda2": 85.6, "sub-model 1": 83.9, "sub-model 2": 84.2,
                            "sub-model 3": 83.9}
