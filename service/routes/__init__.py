"""HTTP routes: each translates HTTP <-> schemas <-> engine and nothing more."""
