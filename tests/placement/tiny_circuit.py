"""A tiny hand-checked Bookshelf circuit (canvas 10 x 10, rows 1 high) shared by the tests.

Nodes (lower-left, size):  A macro (0, 0) 2x2, centre (1, 1);  B macro (5, 5) 2x3, centre
(6, 6.5);  c cell (3, 0) 1x1, centre (3.5, 0.5);  P pad (9, 9) 1x1, centre (9.5, 9.5).

Nets and pin positions (centre + offset):
  n0: A O (+1, 0) -> (2, 1);  B I (-1, +1.5) -> (5, 8);  c I -> (3.5, 0.5)
      full 3 + 7.5 = 10.5;  macro-only (A, B) 3 + 7 = 10
  n1: B O -> (6, 6.5);  P I -> (9.5, 9.5)           full 3.5 + 3 = 6.5;  macro-only dropped
  n2: c O -> (3.5, 0.5);  P I -> (9.5, 9.5)          full 6 + 9 = 15;   macro-only dropped
  n3: A B -> (1, 1);  A B (+1, +1) -> (2, 2)         full 1 + 1 = 2;    macro-only 2
Full HPWL 34, macro-only HPWL 12. The macro view (A, B, P) keeps n0 (A, B), n1, n3: its
full HPWL is 10 + 6.5 + 2 = 18.5, i.e. 3.7 normalised (scale 2 / 10).
"""
from __future__ import annotations

import gzip
from pathlib import Path

FULL_HPWL = 34.0
MACRO_HPWL = 12.0
VIEW_NORMALISED_HPWL = 3.7

FILES = {
    "tiny.aux": "RowBasedPlacement : tiny.nodes tiny.nets tiny.pl tiny.scl\n",
    "tiny.nodes": """UCLA nodes 1.0
# tiny
NumNodes : 4
NumTerminals : 1
A 2 2
B 2 3
c 1 1
P 1 1 terminal
""",
    "tiny.nets": """UCLA nets 1.0

NumNets : 4
NumPins : 9
NetDegree : 3 n0
  A O : 1 0
  B I : -1 1.5
  c I
NetDegree : 2 n1
  B O
  P I
NetDegree : 2 n2
  c O : 0 0
  P I
NetDegree : 2 n3
  A B
  A B : 1 1
""",
    "tiny.pl": """UCLA pl 1.0

A 0 0 : N
B 5 5 : N
c 3 0 : N
P 9 9 : N /FIXED
""",
    "tiny.scl": "UCLA scl 1.0\nNumRows : 10\n"
    + "".join(
        f"CoreRow Horizontal\n Coordinate : {y}\n Height : 1\n Sitewidth : 1\n Sitespacing : 1\n"
        f" Siteorient : N\n Sitesymmetry : Y\n SubrowOrigin : 0 Numsites : 10\nEnd\n"
        for y in range(10)
    ),
}


def write_tiny(directory: Path, gz: bool = False, **replace: str) -> Path:
    """Write the tiny circuit (file texts overridable by name, e.g. tiny_nets=...); returns the .aux."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in FILES.items():
        text = replace.get(name.replace(".", "_"), text)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (directory / name).write_text(text)
    return directory / "tiny.aux"
