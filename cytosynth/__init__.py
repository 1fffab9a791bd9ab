"""The synthetic lung-cytology data set the demo and most tests run on (challenge layout, with masks).

Kept out of :mod:`cytocore` (the shared core every stage imports): nothing but the demo, the tests,
the benchmarks and ``cytofuse synth`` needs it. :mod:`cytosynth.cells` draws single cells,
:mod:`cytosynth.scene` composes fields and writes the data set (:func:`cytosynth.scene.generate`).
"""
