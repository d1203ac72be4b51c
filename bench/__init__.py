"""Tools that drive the whole pipeline to measure it (benches, the scale simulation): above what they drive."""
